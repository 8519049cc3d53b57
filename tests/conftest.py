import gc
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's top-level modules
if "PYTEST_XDIST_WORKER" in os.environ:  # -n 2: two files at once, each process on one thread, and what it starts too
    os.environ.update(SCD_TEST_THREADS="1", SCD_THREADS="1", OMP_NUM_THREADS="1")
torch.set_num_threads(int(os.environ.get("SCD_TEST_THREADS", 2)))  # 1 in the mutation check's runs (two at once)

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


# The files that take longest (seconds at one thread: 120, 75, 70, 60, 50, 50, 45, 30, 30, 25), in that order
SLOWEST = ("test_reproduce.py", "test_mutants.py", "test_scale.py", "test_ddp.py", "test_exercise.py", "test_train.py",
           "test_notebook.py", "test_llama.py", "test_distill.py", "test_plumbing.py")


def pytest_collection_modifyitems(items):
    """The slowest files first, each file's tests in their order: with -n 2 no long file is left
    to run alone at the end."""
    items.sort(key=lambda item: SLOWEST.index(item.path.name) if item.path.name in SLOWEST else len(SLOWEST))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """With -n (pytest-xdist): each file goes whole to one process, in the order above, so a
    file's module fixtures (the mutation check's runs among them) are made once."""
    from xdist.scheduler import LoadFileScheduling
    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)
