"""
A check for a machine with one CUDA GPU, in under 8 minutes: nothing is downloaded.

1. Distillation steps from random initialisation, batch 8 x 512 tokens with 128 scored: GPT-2
   shapes (a gpt2-medium teacher, a gpt2 student, 50,257 tokens) under bf16 autocast and
   under fp16 with the gradient scaler, and the paper's family under bf16 (128,256 tokens):
   Llama 3.2 3B -> 1B with the student's weights trained and with rank-16 adapters, and the
   3B's own SFT step with adapters. Step times (SFT, teacher forward, distillation with the
   teacher in the loop, from cached logits and from the offline top-k signal), tokens/s,
   model FLOPs utilisation against the card's peak, peak memory (bench.measure).
2. The main pipeline end to end on CUDA at a small budget (reproduce.py with bf16): every
   phase, the probe, the teacher-logit cache and the report.

    python -m lab.gpu_check --out_dir runs/gpu_check     # on the GPU machine
    python -m lab.gpu_check --small true                 # CPU-sized shapes: what the tests run
    python -m lab.gpu_check --plan true                  # the memory plans of the paper's pairs (no GPU needed)

Writes gpu_check.json (every figure) and gpu_check.md (a table) to --out_dir.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lab import bench
from lab import reproduce
from data import logit_chunk
from plumbing import arg, parse_config, run_main
from scale import plan_parts
from model import GPTConfig, add_lora, build


@dataclass
class GpuCheckConfig:
    out_dir: str = arg("runs/gpu_check", "where the figures and the end-to-end run go")
    small: bool = arg(False, "CPU-sized shapes and budget (to keep this script tested without a GPU)")
    data: str = arg("default", "the end-to-end run's data")
    device: str = arg("auto", "cuda, cuda:1, ... (auto: cuda if available)")
    plan: bool = arg(False, "only print the memory plans of the paper's pairs at batch 8 x 512 (no GPU needed)")


PAIRS = [("llama-3.1-8b", "llama-3.2-3b"), ("llama-3.2-3b", "llama-3.2-1b"), ("qwen2.5-1.5b", "qwen2.5-0.5b")]


def plans(batch_size=8, seq_len=512, answer_len=128, cards=(24, 48, 80), rank=16):
    """Markdown: what each phase of each pair needs on one GPU (scale.plan_parts, bf16
    autocast, the losses in pieces of data.logit_chunk), full fine-tuning and with rank-16
    adapters on every projection (the frozen base in bf16; weights, gradients and AdamW state
    in float32 for the adapters alone), without and with activation checkpointing, on which
    cards it fits (within 95% of the card; the teacher-logit cache, up to --teacher_cache_gib,
    comes on top), and the disk of a trail of 24 checkpoints (bf16 weights, or float32 adapters)."""
    gib = lambda x: f"{x / 2**30:.1f}"
    rows = ["| pair | phase | trained | weights + grads + AdamW | frozen teacher | activations (ckpt off / on) | logits | "
            "total (off / on) | fits (GB card, ckpt on) | a trail of 24 checkpoints |", "|" + " --- |" * 10]
    for t, s in PAIRS:
        for lora in (0, rank):
            with torch.device("meta"):  # shapes only
                T, S = (build(GPTConfig(**bench.SHAPES[n])) for n in (t, s))
                teacher = build(GPTConfig(**bench.SHAPES[t]))  # frozen in distillation: base (+ adapters) in bf16
                if lora:
                    add_lora(T, lora), add_lora(S, lora), add_lora(teacher, lora)
            for phase, model, frozen in (("teacher SFT", T, None), ("SFT student", S, None), ("distillation", S, teacher)):
                chunk = logit_chunk(model.config.vocab_size)
                off, on = (plan_parts(model, frozen, batch_size, seq_len, answer_len, "bfloat16", c, chunk) for c in (False, True))
                fits = [f"{g}" for g in cards if sum(on.values()) <= 0.95 * g * 1e9] or ["none"]  # 5% for CUDA's own use
                trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
                disk = gib(24 * (4 * trained if lora else 2 * model.num_params())) + " GiB" if phase == "teacher SFT" else ""
                rows.append(f"| {t} -> {s} | {phase} | {f'LoRA r{lora}' if lora else 'all weights'} | "
                            f"{gib(off['weights'] + off['gradients'] + off['AdamW'])} | "
                            f"{gib(off['teacher']) if frozen else '-'} | {gib(off['activations'])} / {gib(on['activations'])} | "
                            f"{gib(off['logits'])} | {gib(sum(off.values()))} / {gib(sum(on.values()))} | {', '.join(fits)} | {disk} |")
    return "\n".join(rows)


def main(cfg):
    if cfg.plan:
        print(plans())
        return None
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    gpt2 = dict(teacher="gpt2-medium", student="gpt2", batch_size=8, seq_len=512, answer_len=128, steps=10, rounds=3)
    llama = dict(gpt2, teacher="llama-3.2-3b", student="llama-3.2-1b", dtype="bfloat16", steps=5)
    runs = ([dict(teacher="teacher", student="student", batch_size=4, seq_len=0, steps=2, rounds=1, dtype=d, lora_rank=r)
             for d, r in (("bfloat16", 0), ("float16", 0), ("bfloat16", 4))] if cfg.small else
            [dict(gpt2, dtype="bfloat16"), dict(gpt2, dtype="float16"),  # and the paper's family, Llama 3.2 3B -> 1B,
             llama, dict(llama, lora_rank=16), dict(llama, student="llama-3.2-3b", lora_rank=16)])  # the 3B's own SFT
    rows, log = [], open(out / "rows.jsonl", "a")  # each row written as soon as it is measured
    for shapes in runs:
        t = time.time()
        try:
            r = bench.measure(bench.BenchConfig(**shapes, device=dev))
        except torch.cuda.OutOfMemoryError as e:  # a row that does not fit says so; the next rows still run
            r = dict(shapes, device=torch.cuda.get_device_name() if dev.startswith("cuda") else dev, error=f"out of memory: {e}"[:300])
            torch.cuda.empty_cache()
        r["wall_s"] = round(time.time() - t, 1)
        rows.append(r)
        log.write(json.dumps(r) + "\n")
        log.flush()
        print(json.dumps(r), flush=True)
    t = time.time()
    e2e = out / "e2e"
    budget = dict(teacher_epochs=1, ckpt_per_epoch=1, stage_epochs=1, stages=2, probe_size=16) if cfg.small else \
        dict(teacher_epochs=4, ckpt_per_epoch=1, stage_epochs=1, stages=2, probe_size=64)
    reproduce.main(reproduce.ReproduceConfig(data=cfg.data, out_dir=str(e2e), report_dir=str(e2e / "report"),
                                             device=dev, dtype="bfloat16", **budget), "gpu_check.py end to end")
    results = json.loads(next((e2e / "seed0").glob("scd_aw*/results.json")).read_text())  # scd_aw_k4 by default
    summary = dict(device=rows[0]["device"], steps=rows, e2e=dict(wall_s=round(time.time() - t, 1), scd_aw_test_acc=results["best"]["acc"],
                                                                   report=str(e2e / "report" / "results.md")))
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# gpu_check.py on {summary['device']}", "",
             f"Random init, batch {rows[0]['batch_size']} x {rows[0]['seq_len'] or 'default-domain'} tokens, medians of "
             f"{rows[0]['rounds']} rounds of {rows[0]['steps']} steps; the losses in pieces (data.logit_chunk).", "",
             "| teacher -> student | autocast | student trains | SFT ms | SFT MFU | teacher fwd ms | distill ms | "
             "distill, cached teacher ms | distill, offline top-k ms | distill tok/s | ratio | distill MFU | peak GiB |",
             "|" + " --- |" * 13]
    for r in rows:
        trains = f"LoRA r{r['lora_rank']}" if r.get("lora_rank") else "all"
        if "error" in r:
            lines.append(f"| {r['teacher']} -> {r['student']} | {r.get('dtype')} | {trains} | " + r["error"][:60] + " |" * 11)
            continue
        lines.append(f"| {r['teacher']} -> {r['student']} | {r['dtype']} | {trains} | {r['sft_ms']} | {r.get('sft_mfu')} | "
                     f"{r['teacher_forward_ms']} | {r['distill_ms']} | {r['distill_cached_ms']} | {r['distill_offline_ms']} | "
                     f"{r['distill_tok_s']:,} | {r['ratio']} | {r.get('mfu')} | {r['peak_mem_GiB']} |")
    lines += ["", f"End to end (reproduce.py, bf16, small budget): {summary['e2e']['wall_s']} s, "
              f"SCD+AW test exact match {summary['e2e']['scd_aw_test_acc']:.3f}."]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    run_main(main, parse_config(GpuCheckConfig, "A five-minute check of the CUDA paths: GPT-2-shaped steps and the pipeline end to end."))
