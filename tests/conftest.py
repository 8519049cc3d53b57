import gc
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's top-level modules
torch.set_num_threads(int(os.environ.get("SCD_TEST_THREADS", 2)))  # the mutation check runs two suites at once

import data  # noqa: E402


def pytest_configure(config):  # the course handout grades each part alone: pytest -m part1
    for n, what in ((1, "the distillation KL, per-example means, gold CE"), (2, "Adaptive Weighting and the mixed loss"),
                    (3, "the checkpoint schedule and the SFS/TFS decomposition")):
        config.addinivalue_line("markers", f"part{n}: part {n} of the course handout, {what}")


@pytest.fixture(scope="session")
def tiny_domain(tmp_path_factory):
    """A folder of JSONL cut from the default domain: small enough for seconds of training."""
    folder = tmp_path_factory.mktemp("domain")
    d = data.load_domain("default")
    for split, n in (("train", 96), ("val", 24), ("test", 24)):
        data.write_jsonl(d[split][::len(d[split]) // n][:n], folder / f"{split}.jsonl")
    return folder


def pytest_collection_finish(session):
    """What collection imported (torch, matplotlib, every test module) lives until the end: frozen,
    the runs' gc.collect() calls (one per stage switch) skip it, 0.2 s each otherwise."""
    gc.freeze()
