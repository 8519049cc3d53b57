"""
Speed of one training step, measured, not asserted: SFT, the teacher's forward pass, and a
distillation step (METHOD.md section 2.4 with AW), plus an estimate of the schedule's share
of a distillation run and the peak memory. Prints a table and one JSON line at the end.

    python bench.py                                         # the CPU presets at the default domain's shape
    python bench.py --teacher gpt2-medium --student gpt2 --seq_len 512 --answer_len 128 \\
        --batch_size 8 --device cuda --dtype bfloat16

Batches are random tokens of --seq_len with the last --answer_len positions scored, so
the figures depend only on shapes. Target: distillation step / (SFT step + teacher forward)
<= 1.10, i.e. distillation adds nothing beyond the teacher's forward pass.
"""
import json
import os
import resource
import time
from dataclasses import asdict, dataclass

import torch

import scd
from model import GPT, GPTConfig, PRESETS
from train_teacher import arg, optimizer_step, parse_config, setup_device

PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L4": 121, "A10": 125, "4090": 165}  # dense bf16, datasheets


@dataclass
class BenchConfig:
    teacher: str = arg("teacher", "teacher preset")
    student: str = arg("student", "student preset")
    vocab_size: int = arg(0, "0: 384 (the default domain's compact vocabulary) for the CPU presets, 50257 for GPT-2 presets")
    batch_size: int = arg(16, "examples per step")
    seq_len: int = arg(32, "tokens per example (the default domain averages 31)")
    answer_len: int = arg(9, "scored tokens at the end of each example (the default domain averages 9)")
    steps: int = arg(30, "timed steps per measurement, after 5 warm-up steps")
    pool: int = arg(32, "teacher checkpoints in the schedule's candidate pool")
    probe_size: int = arg(256, "probe examples")
    stages: int = arg(4, "K stages ...")
    steps_per_stage: int = arg(480, "... of T steps: the run the schedule's share is taken of")
    compile: bool = arg(False, "torch.compile the student and the teacher")
    estimate: bool = arg(False, "only print the estimated GPU memory of each GPT-2 size (no timing)")
    device: str = arg("auto", "cpu, cuda, ...")
    dtype: str = arg("auto", "float32, bfloat16 or float16 autocast")


def timed(fn, steps, device):
    for _ in range(5):
        fn()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t) / steps


def memory_estimate(preset, batch, seq, answer_len, vocab=50257):
    """GiB for training one model with AdamW under bf16 autocast, from counts (an estimate):
    fp32 weights, gradients and two Adam moments (16 bytes per parameter); activations kept
    for backward about 34 * tokens * width bytes per layer (flash attention stores no
    T x T matrix); answer-position logits in bf16 and their float32 copy (6 bytes each)."""
    p = PRESETS[preset]
    n = GPT(GPTConfig(**{**p, "vocab_size": vocab, "n_layer": 1})).num_params()  # embeddings + one block
    block = 12 * p["n_embd"] ** 2 + 13 * p["n_embd"]
    params = n + (p["n_layer"] - 1) * block
    act = 34 * batch * seq * p["n_embd"] * p["n_layer"]
    logits = 6 * batch * answer_len * vocab
    return params, (16 * params + act + logits) / 2**30


def estimates(cfg):
    """A table: memory to train each GPT-2 size, and to hold it as a frozen bf16-autocast teacher."""
    print(f"estimated GiB at batch {cfg.batch_size} x {cfg.seq_len} tokens, {cfg.answer_len} answer tokens per example")
    print("| model | parameters | train (SFT / student), GiB | frozen teacher (fp32 weights + forward), GiB |\n| --- | --- | --- | --- |")
    for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
        params, train = memory_estimate(name, cfg.batch_size, cfg.seq_len, cfg.answer_len)
        p = PRESETS[name]
        teacher = (4 * params + 2 * 4 * cfg.batch_size * cfg.seq_len * p["n_embd"]
                   + 6 * cfg.batch_size * cfg.answer_len * 50257) / 2**30  # weights + a few live activations
        print(f"| {name} | {params / 1e6:.0f}M | {train:.1f} | {teacher:.1f} |")


def main(cfg):
    if cfg.estimate:
        return estimates(cfg)
    device, dtype, ctx, scaler, _, _ = setup_device(cfg.device, cfg.dtype)
    vocab = cfg.vocab_size or (50257 if cfg.student.startswith("gpt2") else 384)
    build = lambda name: GPT(GPTConfig(**{**dict(block_size=cfg.seq_len), **PRESETS[name], "vocab_size": vocab})).to(device)
    torch.manual_seed(0)
    teacher, student = build(cfg.teacher).eval(), build(cfg.student)
    opt = student.configure_optimizer(1e-4, 0.1, (0.9, 0.95), device.split(":")[0])
    t_net, s_net = (torch.compile(m) if cfg.compile else m for m in (teacher, student))
    B, T = cfg.batch_size, cfg.seq_len
    x = torch.randint(0, vocab, (B, T), device=device)
    y = torch.randint(0, vocab, (B, T), device=device)
    mask = torch.zeros(B, T, dtype=torch.bool, device=device)
    mask[:, -cfg.answer_len:] = True
    anchor = torch.rand(B, device=device) + 0.5

    def sft_step():
        with ctx:
            loss = scd.gold_ce(s_net(x, positions=mask), y, mask).mean()
        optimizer_step(student, opt, scaler, loss, 1.0)

    @torch.no_grad()
    def teacher_forward():
        with ctx:
            return t_net(x, positions=mask)

    def distill_step():
        with ctx:
            s_logits = s_net(x, positions=mask)
            with torch.no_grad():
                t_logits = t_net(x, positions=mask)
            kl = scd.per_example(scd.distill_kl(t_logits, s_logits), mask)
            w = scd.aw_weights(anchor, scd.gold_ce(t_logits, y, mask))
            loss = scd.scd_loss(kl, scd.gold_ce(s_logits, y, mask), w)
        optimizer_step(student, opt, scaler, loss, 1.0)

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t_sft, t_fwd, t_dist = (timed(f, cfg.steps, device) for f in (sft_step, teacher_forward, distill_step))

    # the schedule: each pool checkpoint's forward pass over the probe once, then per stage the
    # student's forward pass and one KL per candidate (loading checkpoints from disk not counted)
    chunks = -(-cfg.probe_size // B)
    lp = torch.log_softmax(teacher_forward().float(), -1)
    t_kl = timed(lambda: scd.token_kl(lp, lp).mean().item(), cfg.steps, device) * chunks
    t_sched = cfg.pool * chunks * t_fwd + cfg.stages * (chunks * t_fwd * student.num_params() / teacher.num_params()
                                                        + cfg.pool * t_kl)
    t_run = cfg.stages * cfg.steps_per_stage * t_dist
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    out = dict(device=torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu x{torch.get_num_threads()} threads",
               dtype=dtype, **{k: v for k, v in asdict(cfg).items() if k not in ("device", "dtype")}, vocab=vocab,
               teacher_params_M=round(teacher.num_params() / 1e6, 2), student_params_M=round(student.num_params() / 1e6, 2),
               sft_ms=round(1e3 * t_sft, 2), teacher_fwd_ms=round(1e3 * t_fwd, 2), distill_ms=round(1e3 * t_dist, 2),
               sft_tok_s=round(B * T / t_sft), distill_tok_s=round(B * T / t_dist),
               ratio=round(t_dist / (t_sft + t_fwd), 3), schedule_share=round(t_sched / (t_sched + t_run), 4),
               peak_mem_GiB=round(peak, 2))
    if device.startswith("cuda"):  # model FLOPs utilisation: 6N per trained token, 2N per teacher token
        flops = (6 * student.num_params() + 2 * teacher.num_params()) * B * T / t_dist
        peak_tf = next((v for k, v in PEAK_TFLOPS.items() if k in out["device"]), None)
        out["mfu"] = round(flops / (peak_tf * 1e12), 3) if peak_tf else None
    print(f"SFT step {out['sft_ms']} ms ({out['sft_tok_s']:,} tok/s) | teacher forward {out['teacher_fwd_ms']} ms | "
          f"distillation step {out['distill_ms']} ms ({out['distill_tok_s']:,} tok/s)")
    print(f"distillation / (SFT + teacher forward) = {out['ratio']} (target <= 1.10) | schedule share of a "
          f"{cfg.stages} x {cfg.steps_per_stage}-step run, estimated: {100 * out['schedule_share']:.1f}% (target <= 5%) | "
          f"peak memory {out['peak_mem_GiB']} GiB")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    torch.set_num_threads(min(os.cpu_count() or 1, 8))
    main(parse_config(BenchConfig))
