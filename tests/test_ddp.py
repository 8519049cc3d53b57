"""Two CPU processes (gloo) against one process with the same global batch. The NaN test
launches through torchrun itself; the others start the two processes torchrun would start
(tests/forked.py: its variables, forked from one Python that imported torch once)."""
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import distill
import forked
import plumbing
import train_teacher as tt
from test_train import cfg

ROOT = Path(__file__).resolve().parent.parent


def torchrun(*launches):
    """Each launch (a script and its flags) in two processes, one launch after the other -> what
    each launch's processes printed, [(rank 0, rank 1)]."""
    runs = forked.run([j for launch in launches for j in forked.two_processes(ROOT, *launch)])
    for code, _, err in runs:
        assert code == 0, err[-3000:]
    return [(runs[i][1], runs[i + 1][1]) for i in range(0, len(runs), 2)]


def max_diff(a, b):
    wa, wb = (torch.load(p, weights_only=True)["model"] for p in (a, b))
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def test_two_processes_train_and_distil_like_one(tiny_domain, tmp_path):
    # teacher SFT: 2 epochs of 6 steps, 16 examples per step = 8 per process; then SCD+AW distillation from the
    # one-process teacher, where rank 0 chooses each stage's checkpoint and shares it
    one, two = tmp_path / "one", tmp_path / "two"
    tt.train(cfg(tiny_domain, one, ckpt_per_epoch=1))
    files = sorted(p.name for p in one.iterdir())  # before the distillation stores its probes there
    kw = dict(data=str(tiny_domain), teacher_dir=str(one), anchor_dir=str(one), stages=2, steps_per_stage=3,
              probe_size=16, log_every=1000, method="scd", aw=True)
    distill.main(distill.DistillConfig(**kw, out_dir=str(tmp_path / "d1")))
    teacher = ["train_teacher.py", f"--data={tiny_domain}", "--preset=student", f"--out_dir={two}", "--epochs=2",
               "--batch_size=16", "--ckpt_per_epoch=1", "--log_every=1000", "--probe_size=16", "--probe_resamples=0"]
    (out, out1), _ = torchrun(teacher, ["distill.py", *(f"--{k}={v}" for k, v in kw.items()), f"--out_dir={tmp_path / 'd2'}"])
    assert sum(line.startswith("checkpoint ckpt_") for line in out.splitlines()) == 2 and out1 == ""  # rank 0 alone prints
    assert files == sorted(p.name for p in two.iterdir())  # one set of files
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    for c1, c2 in zip(m1["checkpoints"], m2["checkpoints"]):
        assert abs(c1["val_loss"] - c2["val_loss"]) < 1e-4 and abs(c1["train_loss"] - c2["train_loss"]) < 1e-4
        assert max_diff(one / c1["file"], two / c2["file"]) < 1e-4  # sums in another order: not bit-equal
    s1, s2 = (json.loads((tmp_path / d / "schedule.json").read_text()) for d in ("d1", "d2"))
    assert [s["ckpt"] for s in s1["stages"]] == [s["ckpt"] for s in s2["stages"]]
    # Adam divides by the gradient's running scale, so sums taken in another order move a weight by more than in
    # SFT; a step in another direction would move it by the LR, 6e-3
    assert max_diff(tmp_path / "d1" / "final.pt", tmp_path / "d2" / "final.pt") < 5e-4


def test_shards_split_the_global_batch():
    idx = list(range(100, 116))
    parts = [tt.shard(idx, r, 4) for r in range(4)]
    assert sorted(sum(parts, [])) == idx and all(len(p) == 4 for p in parts)


# FSDP2 on CPU processes (gloo) uses torch.cpu.Stream.record_event, which torch 2.7 added; on GPUs 2.6 has what it needs
cpu_fsdp = pytest.mark.skipif(not hasattr(torch.cpu.Stream, "record_event"), reason="FSDP2 on CPU processes needs torch >= 2.7")


@cpu_fsdp
def test_fsdp_shards_and_trains_like_one_process_resumed_with_adapters_and_in_bf16(tiny_domain, tmp_path):
    """--fsdp true (FSDP2's fully_shard, 2 gloo processes): the same dense checkpoints as one
    process with the same global batch, gathered to whole plain weights, also when interrupted
    after the first checkpoint and resumed (AdamW's state gathered and sharded again); with
    adapters, the checkpoints hold the adapters alone. With --dtype bfloat16, FSDP2's
    MixedPrecisionPolicy gathers each block's weights in bf16 (half the traffic of float32) and
    reduces gradients in float32; the validation loss stays within bf16's rounding of one
    process's under autocast."""
    one, two = tmp_path / "one", tmp_path / "two"
    tt.train(cfg(tiny_domain, one, ckpt_per_epoch=1))
    base = one / "ckpt_000006.pt"  # adapters on a base of full weights
    tt.train(cfg(tiny_domain, tmp_path / "lora1", ckpt_per_epoch=1, init_from=str(base), lora_rank=4))
    tt.train(cfg(tiny_domain, tmp_path / "bf16_1", epochs=1, ckpt_per_epoch=1, dtype="bfloat16"))
    flags = ["train_teacher.py", f"--data={tiny_domain}", "--preset=student", "--epochs=2", "--batch_size=16",
             "--ckpt_per_epoch=1", "--log_every=1000", "--fsdp=true", "--probe_size=16", "--probe_resamples=0"]
    (first, _), (resumed, _), _, (bf16, _) = torchrun(
        [*flags, f"--out_dir={two}", "--stop_at_step=6"], [*flags, f"--out_dir={two}"],
        [*flags, f"--out_dir={tmp_path / 'lora2'}", f"--init_from={base}", "--lora_rank=4"],
        [*flags, f"--out_dir={tmp_path / 'bf16_2'}", "--epochs=1", "--dtype=bfloat16"])
    assert "FSDP2: 2 blocks and the rest of the model sharded over 2 processes" in first and "resuming" in resumed
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for c in json.loads((one / "manifest.json").read_text())["checkpoints"]:
        a, b = (torch.load(d / c["file"], weights_only=True)["model"] for d in (one, two))
        assert set(a) == set(b) and all(type(v) is torch.Tensor and v.shape == a[k].shape for k, v in b.items())
        assert max_diff(one / c["file"], two / c["file"]) < 1e-4
    a, b = (torch.load(tmp_path / d / "ckpt_000012.pt", weights_only=True) for d in ("lora1", "lora2"))
    assert set(a["model"]) == set(b["model"]) and all(".lora_" in k for k in b["model"]) and b["lora"] == a["lora"]
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) < 1e-4
    assert "the blocks gathered in bfloat16" in bf16
    losses = [json.loads((tmp_path / d / "manifest.json").read_text())["checkpoints"][0]["val_loss"]
              for d in ("bf16_1", "bf16_2")]
    assert abs(losses[0] - losses[1]) < 1e-2, losses


NAN_ON_ONE = """
import sys
sys.path.insert(0, sys.argv[1])
import torch, plumbing
_, _, _, _, rank, world = plumbing.setup_device("cpu", "float32")
def step(cfg):
    plumbing.check_finite("step 3", loss=torch.tensor(float("nan") if rank == 1 else 1.0), grad_norm=torch.tensor(2.0))
    print("past the check", file=sys.stderr)
plumbing.run_main(step, None)
"""


def test_a_nan_on_one_process_stops_every_process_with_one_message(tmp_path):
    """Two gloo processes, the loss NaN on process 1 alone: both stop at the check (none waits in
    the next collective), each saying where, which term, and on which process."""
    (tmp_path / "nan.py").write_text(NAN_ON_ONE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "nan.py"), str(ROOT)]
    r = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "past the check" not in r.stderr
    assert r.stderr.count("error: non-finite loss at step 3 (on process 1 of 2); stopped before the optimizer step") == 2


def test_processes_wait_for_each_other_as_long_as_the_flag_says(monkeypatch):
    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(plumbing.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(plumbing.dist, "init_process_group", lambda backend, timeout: seen.update(backend=backend, timeout=timeout))
    monkeypatch.setattr(plumbing.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(plumbing.dist, "get_world_size", lambda: 2)
    plumbing.setup_device("cpu", "float32", tt.TrainConfig(dist_timeout=240).dist_timeout)
    assert seen == dict(backend="gloo", timeout=timedelta(minutes=240))
    assert tt.TrainConfig().dist_timeout == distill.DistillConfig().dist_timeout == 180  # NCCL's own 10 minutes would not do
