"""
A check for a machine with one CUDA GPU, in under 5 minutes: nothing is downloaded.

1. Distillation steps at GPT-2 shapes from random initialisation (a gpt2-medium teacher, a
   gpt2 student, GPT-2's 50,257-token vocabulary, batch 8 x 512 tokens with 128 scored),
   under bf16 autocast and under fp16 autocast with the gradient scaler: step times,
   tokens/s, model FLOPs utilisation against the card's peak, peak memory (bench.measure).
2. The main pipeline end to end on CUDA at a small budget (reproduce.py with bf16): every
   phase, the probe, the teacher-logit cache and the report.

    python gpu_check.py --out_dir runs/gpu_check     # on the GPU machine
    python gpu_check.py --small true                 # CPU-sized shapes: what the tests run

Writes gpu_check.json (every figure) and gpu_check.md (a table) to --out_dir.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import bench
import reproduce
from common import arg, parse_config, run_main


@dataclass
class GpuCheckConfig:
    out_dir: str = arg("runs/gpu_check", "where the figures and the end-to-end run go")
    small: bool = arg(False, "CPU-sized shapes and budget (to keep this script tested without a GPU)")
    data: str = arg("default", "the end-to-end run's data")
    device: str = arg("auto", "cuda, cuda:1, ... (auto: cuda if available)")


def main(cfg):
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    shapes = (dict(teacher="teacher", student="student", batch_size=4, seq_len=0, steps=2, rounds=1)
              if cfg.small else dict(teacher="gpt2-medium", student="gpt2", batch_size=8, seq_len=512, answer_len=128,
                                     steps=10, rounds=3))
    rows = []
    for dtype in ("bfloat16", "float16"):
        t = time.time()
        r = bench.measure(bench.BenchConfig(**shapes, device=dev, dtype=dtype))
        r["wall_s"] = round(time.time() - t, 1)
        rows.append(r)
        print(json.dumps(r), flush=True)
    t = time.time()
    e2e = out / "e2e"
    budget = dict(teacher_epochs=1, student_epochs=1, stages=2, probe_size=16) if cfg.small else \
        dict(teacher_epochs=4, student_epochs=4, stages=2, probe_size=64)
    reproduce.main(reproduce.ReproduceConfig(data=cfg.data, out_dir=str(e2e), report_dir=str(e2e / "report"),
                                             device=dev, dtype="bfloat16", **budget), "gpu_check.py end to end")
    results = json.loads((e2e / "seed0" / "scd_aw" / "results.json").read_text())
    summary = dict(device=rows[0]["device"], steps=rows, e2e=dict(wall_s=round(time.time() - t, 1), scd_aw_test_acc=results["best"]["acc"],
                                                                   report=str(e2e / "report" / "results.md")))
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    lines = [f"# gpu_check.py on {summary['device']}", "",
             f"{shapes['teacher']} teacher, {shapes['student']} student, batch {shapes['batch_size']} x "
             f"{shapes['seq_len'] or 'default-domain'} tokens, random init, medians of {shapes['rounds']} rounds of {shapes['steps']} steps.", "",
             "| autocast | SFT ms | teacher fwd ms | distill ms | distill, cached teacher ms | distill tok/s | ratio | MFU | peak GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['sft_ms']} | {r['teacher_forward_ms']} | {r['distill_ms']} | {r['distill_cached_ms']} | "
                     f"{r['distill_tok_s']:,} | {r['ratio']} | {r.get('mfu')} | {r['peak_mem_GiB']} |")
    lines += ["", f"End to end (reproduce.py, bf16, small budget): {summary['e2e']['wall_s']} s, "
              f"SCD+AW test exact match {summary['e2e']['scd_aw_test_acc']:.3f}."]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    run_main(main, parse_config(GpuCheckConfig, "A five-minute check of the CUDA paths: GPT-2-shaped steps and the pipeline end to end."))
