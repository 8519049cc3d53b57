"""Running on one GPU: the memory plan said before the first step, activation checkpointing,
dense checkpoints in bf16, and a run folder that one process holds at a time."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lab import bench
import plumbing
import scale
import scd
import train_teacher as tt
from model import GPTConfig, add_lora, build
from test_train import cfg

ROOT = Path(__file__).resolve().parent.parent


def test_the_memory_plan_counts_each_part_and_refuses_what_cannot_fit(capsys):
    with torch.device("meta"):  # shapes only: nothing is allocated
        small = build(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128, vocab_size=1000))
        big = build(GPTConfig(**bench.SHAPES["llama-3.2-3b"]))
    assert round(big.num_params() / 1e9, 2) == 3.21  # Llama 3.2 3B
    P = small.num_params()
    parts = scale.memory_plan(small, small, batch_size=4, seq_len=10, answer_len=3, dtype="float32", grad_ckpt=False,
                               device="cpu", n_ckpt=24)
    c = small.config  # 1 layer x 32, 4 x MLP: 7 * 32 + 2 * 32 + 4 * 128 = 800 values per token and layer
    assert parts == dict(weights=4 * P, gradients=4 * P, AdamW=8 * P, teacher=4 * P, activations=4 * 10 * 4 * 800,
                         logits=4 * 3 * 1000 * 4 * 4)
    out = capsys.readouterr().out
    assert c.n_layer == 1 and "disk: 24 dense checkpoints" in out
    phases = scale.plan_phases(small, small, 4, 10, 3, "float32", False)  # distill.py's: the largest is printed
    top = max(phases, key=phases.get)
    assert f"largest phase: {top} {phases[top] / 2**30:.2f}" in out and phases["distillation step"] == sum(parts.values())
    ckpt = scale.memory_plan(small, None, 4, 10, 3, "bfloat16", True, "cpu")
    assert ckpt["activations"] == 4 * 10 * 2 * (32 + 800) and "teacher" not in {k for k, v in ckpt.items() if v}
    with pytest.raises(plumbing.RunError, match=r"the run does not fit: step: weights 11\.97 \| gradients 11\.97 \| AdamW 23\.94"):
        scale.memory_plan(big, None, batch_size=512, seq_len=2048, answer_len=512, dtype="bfloat16", grad_ckpt=False, device="cpu")


def test_the_plan_table_says_an_8b_teacher_fits_one_gpu_only_with_adapters():
    from lab import gpu_check
    rows = {tuple(c.strip() for c in r.split("|")[1:4]): r.split("|") for r in gpu_check.plans().splitlines()[2:]}
    pair = "llama-3.1-8b -> llama-3.2-3b"
    assert rows[pair, "teacher SFT", "all weights"][10].strip() == "none"
    assert rows[pair, "teacher SFT", "LoRA r16"][10].strip() == "24, 48, 80"
    assert rows[pair, "teacher SFT", "all weights"][11].strip() == "359.0 GiB"  # 24 x 8.03B x 2 bytes
    assert rows[pair, "teacher SFT", "LoRA r16"][11].strip() == "3.8 GiB"  # 24 x 41.9M adapter weights x 4 bytes
    assert rows["qwen2.5-1.5b -> qwen2.5-0.5b", "distillation", "all weights"][10].strip() == "24, 48, 80"


def test_the_memory_plan_of_adapters_counts_the_frozen_base_in_the_autocast_dtype():
    with torch.device("meta"):
        model = build(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128, vocab_size=1000))
        P = model.num_params()
        add_lora(model, rank=2)
    A = model.num_params() - P  # c_attn (32 -> 96), c_proj (32 -> 32), c_fc (32 -> 128), c_proj (128 -> 32), rank 2
    assert A == 2 * (32 + 96) + 2 * (32 + 32) + 2 * (32 + 128) + 2 * (128 + 32)
    parts = scale.plan_parts(model, None, 4, 10, 3, "bfloat16", False)
    assert (parts["weights"], parts["gradients"], parts["AdamW"]) == (4 * A + 2 * P, 4 * A, 8 * A)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_activation_checkpointing_gives_the_same_gradients(arch):
    torch.manual_seed(0)
    model = build(GPTConfig(arch=arch, n_layer=2, n_head=4, n_kv_head=2 if arch == "llama" else 0, n_embd=32,
                            vocab_size=50, block_size=16)).train()
    x, y = torch.randint(0, 50, (3, 12)), torch.randint(0, 50, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.bool)
    grads = []
    for on in (False, True):
        model.grad_checkpointing = on
        model.zero_grad()
        scd.gold_ce(model(x, positions=mask), y, mask).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_dense_checkpoints_trained_in_bf16_are_stored_in_bf16(tiny_domain, tmp_path):
    tt.train(cfg(tiny_domain, tmp_path, dtype="bfloat16", epochs=1))
    m = json.loads((tmp_path / "manifest.json").read_text())
    ck = torch.load(tmp_path / m["checkpoints"][0]["file"], weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in ck["model"].values())
    model, _ = plumbing.load_checkpoint(tmp_path / m["checkpoints"][0]["file"])
    assert next(model.parameters()).dtype == torch.float32  # trained on in float32 (autocast does the rest)


def test_a_run_folder_is_held_by_one_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"import plumbing, time; plumbing.out_folder({str(tmp_path)!r}); "
                               "print('held', flush=True); time.sleep(120)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(plumbing.RunError, match=f"{tmp_path} is in use by process {holder.pid}; wait for it"):
            plumbing.out_folder(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    plumbing.out_folder(tmp_path)  # the holder died: its lock does not block a resume
    assert (tmp_path / "run.lock").read_text() == str(__import__("os").getpid())
