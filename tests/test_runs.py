"""Running on one GPU: the memory plan said before the first step, activation checkpointing,
dense checkpoints in bf16, and a run folder that one process holds at a time."""
import json
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

from lab import bench
import data
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


def test_the_refusal_reads_the_largest_phase_with_what_stays_alive_against_free_memory_less_the_margin(monkeypatch, capsys):
    """A distillation whose step fits but whose pass that caches the teacher's logits does not
    is refused, naming the free memory and the margin; with 1 MiB more than that phase, it runs.
    The probes' stored log-probs, the cache and DDP's buckets are in every phase they live in."""
    with torch.device("meta"):
        small = build(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128, vocab_size=1000))
    held, cache, buckets = 3 * 2**20, 40 * 2**20, 4 * small.num_params()
    step = sum(scale.plan_parts(small, small, 4, 10, 3, "float32", False).values())
    phases = scale.plan_phases(small, small, 4, 10, 3, "float32", False, held=held, cache=cache)
    assert phases["distillation step"] == step + held and phases["distillation step, cached logits"] == step + held + cache
    top = max(phases.values()) + buckets
    free_for = lambda usable: next(f for f in range(usable, 2 * usable + 2**31, 2**16) if f - scale.margin(f) >= usable)
    kw = dict(batch_size=4, seq_len=10, answer_len=3, dtype="float32", grad_ckpt=False, device="cpu", held=held, cache=cache,
              buckets=buckets)
    monkeypatch.setattr(scale, "free_memory", lambda device: free_for(step + held + buckets + 2**20))  # the step alone fits
    with pytest.raises(plumbing.RunError, match=r"the run does not fit: .*largest phase: teacher's cached logits "
                                                r".* free on cpu less 1\.\d\d of margin"):
        scale.memory_plan(small, small, **kw)
    monkeypatch.setattr(scale, "free_memory", lambda device: free_for(top + 2**20))
    scale.memory_plan(small, small, **kw)
    assert f"needs {top / 2**30:.2f} of" in capsys.readouterr().out
    assert scale.margin(22 * 2**30) == 2**30 + 22 * 2**30 // 20 and not scale.card_fits(20 * 2**30, 24)


def test_the_teacher_cache_is_kept_only_within_its_budget_and_passes_fit_their_batch():
    torch.manual_seed(0)
    model = build(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=50)).eval()
    enc = [([1, 2, 3], [4, 5])] * 6  # 6 x 3 answer positions (with the end token) x 50 logits x 4 bytes = 3,600 bytes
    rows = scale.teacher_logits(model, enc, 0, "cpu", nullcontext(), max_gib=3600 / 2**30)
    assert [r.shape for r in rows] == [(3, 50)] * 6
    assert scale.teacher_logits(model, enc, 0, "cpu", nullcontext(), max_gib=3599 / 2**30) is None  # over budget: none kept
    long = [([1] * 4000, [2] * 95)] * 300  # 4,095 tokens each: 8 fit in 2^15
    assert data.fit_batch(256, long) == 8 and data.fit_batch(4, long) == 4 and data.fit_batch(256, [([1] * 40000, [2])]) == 1


def test_a_saved_student_read_back_into_the_live_model_is_in_eval_mode(tmp_path):
    """The test pass and the anchor losses read best.pt into the live student: adapter dropout
    (and any other) must be off there, whatever mode training left the model in."""
    torch.manual_seed(0)
    model = build(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=50, dropout=0.5))
    add_lora(model, rank=2, dropout=0.5).train()
    tok = data.Tokenizer([data.GPT2_EOT, data.UNK] + list(range(1, 49)))
    plumbing.atomic_save(plumbing.checkpoint_dict(model, tok), tmp_path / "best.pt")
    back, _ = plumbing.load_weights(tmp_path / "best.pt", model.train())
    assert back is model and not any(m.training for m in model.modules())
    x = torch.randint(0, 50, (2, 12))
    assert torch.equal(model(x), model(x))  # no dropout draws


def test_fsdp_gathers_blocks_in_the_autocast_dtype_and_reduces_gradients_in_float32(monkeypatch):
    seen = []
    monkeypatch.setattr(scale, "fully_shard", lambda module, mp_policy=None: seen.append(mp_policy) or module)
    model = build(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=50))
    scale.wrap(model, tt.TrainConfig(fsdp=True), world=2, dtype="bfloat16")
    assert len(seen) == 3 and all(mp.param_dtype == torch.bfloat16 and mp.reduce_dtype == torch.float32 for mp in seen[:2])
    seen.clear()
    scale.wrap(model, tt.TrainConfig(fsdp=True), world=2, dtype="float32")
    assert all(mp.param_dtype is None and mp.reduce_dtype is None for mp in seen[:2])  # float32 throughout
