"""
Sparse parity, where checkpoint distillation is known to help (Panigrahi et al.,
"Progressive distillation induces an implicit curriculum", ICLR 2025): a student distilled
from a sequence of intermediate teacher checkpoints learns the parity of a hidden subset of
bits faster than one trained on labels or distilled from the final teacher.

    python -m lab.parity    # 3 seeds: teacher SFT, then SFT, KD, CD and SCD students -> report/parity.{png,md}

Every student gets the same step budget; its validation accuracy is measured every
--eval_every steps (the learning curve), its test accuracy once at the end. Runs are ordinary train_teacher.py / distill.py runs in --out_dir (finished ones are
reused, interrupted ones resume).
"""
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


import distill  # noqa: E402
import train_teacher as tt  # noqa: E402
from lab import domains  # noqa: E402
from plumbing import arg, parse_config, run_main  # noqa: E402


@dataclass
class ParityConfig:
    data: str = arg("parity:20:2", "parity:N:K, the XOR of K hidden bits out of N")
    seeds: int = arg(3, "seeds 0 .. seeds-1 (model init and data order; the hidden support stays)")
    methods: str = arg("sft,kd,cd,scd", "students to train, comma-separated")
    teacher_preset: str = arg("wide", "teacher model preset")
    student_preset: str = arg("student", "student model preset")
    teacher_epochs: int = arg(1, "teacher SFT epochs")
    ckpt_per_epoch: int = arg(32, "teacher checkpoints per epoch: dense, to catch the sudden rise")
    batch_size: int = arg(32, "examples per step, teacher and students")
    lr: float = arg(1e-3, "peak learning rate, teacher and students")
    teacher_warmup: float = arg(0.0, "teacher's LR warm-up share (with 0.1 the wide teacher stayed at chance)")
    stages: int = arg(4, "K, distillation stages")
    steps_per_stage: int = arg(400, "T, steps per stage")
    probe_size: int = arg(256, "probe examples for the SCD schedule")
    eval_every: int = arg(100, "student steps between validation-accuracy points", low=1)
    out_dir: str = arg("runs/parity", "where the runs go")
    report_dir: str = arg("report", "where parity.png and parity.md go")


def main(cfg):
    t0 = time.time()
    curves, teachers, splits = {}, [], domains.load(cfg.data)
    for seed in range(cfg.seeds):
        root = Path(cfg.out_dir) / f"seed{seed}"
        tcfg = tt.TrainConfig(data=cfg.data, preset=cfg.teacher_preset, out_dir=str(root / "teacher"), seed=seed,
                              epochs=cfg.teacher_epochs, ckpt_per_epoch=cfg.ckpt_per_epoch, batch_size=cfg.batch_size,
                              lr=cfg.lr, warmup_frac=cfg.teacher_warmup, log_every=100)
        print(f"\n=== seed {seed}: teacher", flush=True)
        teachers.append(tt.train(tcfg, splits)["acc"])
        for method in cfg.methods.split(","):
            print(f"\n=== seed {seed}: {method} student", flush=True)
            out = root / method
            distill.main(distill.DistillConfig(
                data=cfg.data, preset=cfg.student_preset, method=method, teacher_dir=str(root / "teacher"),
                out_dir=str(out), seed=seed, stages=cfg.stages, steps_per_stage=cfg.steps_per_stage,
                batch_size=cfg.batch_size, lr=cfg.lr, probe_size=cfg.probe_size, eval_every=cfg.eval_every, log_every=100,
                alpha=0.5, pool_start=0.0), splits)  # the sparse-parity setting: half KL, half gold CE, every checkpoint
            stages = json.loads((out / "schedule.json").read_text())["stages"]
            curves.setdefault(method, []).append(dict(
                curve=[p for s in stages for p in s["curve"]], schedule=[s.get("ckpt", "-") for s in stages],
                test=json.loads((out / "results.json").read_text())["final"]["acc"]))
    report(cfg, curves, teachers, time.time() - t0)


def report(cfg, curves, teachers, wall):
    rep = Path(cfg.report_dir)
    rep.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    lines = [f"# Sparse parity: `python -m lab.parity` ({cfg.data}, {cfg.seeds} seeds, {wall / 60:.1f} min)", "",
             f"Teacher ({cfg.teacher_preset}, {cfg.teacher_epochs} epochs) test accuracy: "
             + ", ".join(f"{a:.3f}" for a in teachers) + ".", "",
             "| student | final test acc | first step at val acc >= 0.9 (per seed) | schedules |", "| --- | --- | --- | --- |"]
    for i, (method, runs) in enumerate(curves.items()):
        steps = [s for s, _ in runs[0]["curve"]]
        accs = [[a for _, a in r["curve"]] for r in runs]
        mean = [statistics.mean(col) for col in zip(*accs)]
        ax.plot(steps, mean, color=f"C{i}", label=method.upper())
        ax.fill_between(steps, [min(c) for c in zip(*accs)], [max(c) for c in zip(*accs)], color=f"C{i}", alpha=0.2)
        first = [next((str(s) for s, a in r["curve"] if a >= 0.9), "never") for r in runs]
        final = [r["test"] for r in runs]
        spread = f" ± {statistics.stdev(final):.3f}" if len(final) > 1 else ""
        lines.append(f"| {method.upper()} | {statistics.mean(final):.3f}{spread} | {', '.join(map(str, first))} | "
                     + "; ".join(" -> ".join(map(str, r["schedule"])) for r in runs) + " |")
    for k in range(1, cfg.stages):
        ax.axvline(k * cfg.steps_per_stage, color="k", lw=0.5, ls=":")
    ax.set(xlabel="student step (dotted: stage boundaries)", ylabel="validation accuracy",
           title=f"Sparse parity {cfg.data}: mean over {cfg.seeds} seeds, band = min..max")
    ax.legend()
    fig.tight_layout()
    fig.savefig(rep / "parity.png", dpi=110)
    plt.close(fig)
    lines += ["", "![parity](parity.png)"]
    (rep / "parity.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    run_main(main, parse_config(ParityConfig, "Sparse parity learning curves: SFT, KD, CD and SCD students of a wide teacher."))
