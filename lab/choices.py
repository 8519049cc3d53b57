"""
The schedule's open choices decided on validation (docs/choices.md declares the study; this
file runs it and reads it back). Seeds 100 to 107, each with its own teacher and SFT student,
in the main command's regime; per seed the defaults' KD, SCD and SCD+AW, each variant's SCD and
SCD+AW, then the tuning-parity runs. Only validation is read: the best stage's val_acc.

    python -m lab.choices --seeds 100,102,104,106         # train (resumable; one process per core)
    python -m lab.choices --seeds 100,101 --parity false  # the variants only
    python -m lab.choices --read true                     # the tables, from the finished runs

The runs are ordinary run folders (runs/choices/seed*/...); the scripts also write test
records there, which this study never opens.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

import distill
import train_teacher as tt
from lab import domains, stats
from lab.reproduce import ReproduceConfig, distill_config, sft_config, teacher_config
from plumbing import RunError, arg, parse_config, run_main

# the declared variants (docs/choices.md): one flag each, against today's default
VARIANTS = {"V1": dict(student_term="as_written"), "V2": dict(monotone=True), "V3": dict(pool_start=0.0),
            "V4": dict(schedule_weight=2.0), "V5": dict(last_at_best=True)}
METHODS = {"KD": ("kd", False), "CD": ("cd", False), "SCD": ("scd", False), "SCD+AW": ("scd", True)}
LRS, ALPHAS = (1e-3, 3e-3, 1e-2), (0.5, 1.0)  # tuning parity: alpha for the fixed-weight KD and CD only


@dataclass
class ChoicesConfig:
    seeds: str = arg("100,101,102,103,104,105,106,107", "the study's seeds (none of the grid's 0 to 15)")
    out_dir: str = arg("runs/choices", "where the runs go, one folder per seed")
    parity: bool = arg(True, "after the variants, the tuning-parity runs (learning rate, alpha)")
    read: bool = arg(False, "train nothing: print the tables from the finished runs")
    threads: int = arg(1, "torch threads per process (1: two processes share a 2-core machine)", low=1)


def folder(name, variant=""):
    """A run's folder in its seed's: 'scd_aw' for SCD+AW, 'scd_aw_V3' for its variant V3."""
    return name.lower().replace("+", "_") + (f"_{variant}" if variant else "")


def parity_folder(name, lr, alpha):
    """A tuning-parity run's folder; today's values (3e-3, 1.0) are the variants' baseline run, but for CD."""
    return folder(name) if (lr, alpha) == (3e-3, 1.0) and name != "CD" else folder(name, f"lr{lr:g}_a{alpha:g}")


def runs(part):
    """[(folder name, method, aw, distill.py changes)] of one seed, in the order they train.
    part: "variants" (the defaults' KD, SCD, SCD+AW, then each variant's SCD and SCD+AW) or "parity"."""
    if part == "variants":
        out = [(folder(name), *METHODS[name], {}) for name in ("KD", "SCD", "SCD+AW")]
        return out + [(folder(name, v), *METHODS[name], change) for v, change in VARIANTS.items() for name in ("SCD", "SCD+AW")]
    out = [(parity_folder(name, lr, alpha), method, aw, dict(lr=lr, alpha=alpha))
           for name, (method, aw) in METHODS.items() for lr in LRS for alpha in (ALPHAS if method in ("kd", "cd") else (1.0,))]
    return [r for r in out if r[0] not in {f for f, *_ in runs("variants")}]


def train(cfg):
    torch.set_num_threads(cfg.threads)
    rc = ReproduceConfig(out_dir=cfg.out_dir)  # the main command's regime, every flag at its default
    splits = domains.load(rc.data)
    spe = len(splits["train"]) // rc.batch_size
    seeds = [int(s) for s in cfg.seeds.split(",")]
    for part in ("variants", "parity") if cfg.parity else ("variants",):  # every seed's variants before any parity run
        for seed in seeds:
            root = Path(cfg.out_dir) / f"seed{seed}"
            tt.train(teacher_config(rc, seed, root / "teacher"), splits)  # finished runs are reused, others resume
            tt.train(sft_config(rc, seed, root, root / "student_sft", spe), splits)
            for name, method, aw, change in runs(part):
                print(f"\n=== seed {seed}: {name}", flush=True)
                try:
                    distill.main(distill_config(rc, seed, root, root / name, spe, method, aw, **change), splits)
                except RunError as e:  # e.g. a loss that went non-finite at lr 1e-2: that setting failed, the study goes on
                    print(f"error: {e}", flush=True)
                    (root / name / "failed.txt").write_text(str(e) + "\n")


def best_val(folder):
    """The best stage's validation accuracy of a finished run (None if unfinished)."""
    path = Path(folder) / "results.json"
    return max(json.loads(path.read_text())["val_acc"]) if path.exists() else None


def paired(cfg, a, b, seeds):
    """Paired difference a - b of best validation accuracy over the seeds where both finished:
    mean, 95% t interval over seeds, p-value, and the seeds used."""
    pairs = [(best_val(Path(cfg.out_dir) / f"seed{s}" / a), best_val(Path(cfg.out_dir) / f"seed{s}" / b)) for s in seeds]
    pairs = [p for p in pairs if None not in p]
    if len(pairs) < 2:
        return None
    r = stats.paired_interval([[x] for x, _ in pairs], [[y] for _, y in pairs])  # one figure per seed: a t interval
    return dict(r, p=stats.p_value(r))


def read(cfg):
    seeds = [int(s) for s in cfg.seeds.split(",")]
    pts = lambda v: "n/a" if v is None or math.isnan(v) else f"{100 * v:+.1f}"
    flag = lambda v: f"{v} " + " ".join(f"`--{k} {str(x).lower()}`" for k, x in VARIANTS[v].items())
    out = ["### Variants (validation, best stage; points of exact match, variant - default)", "",
           "| variant | method | seeds | mean | 95% interval | p | Holm (SCD+AW) | verdict |", "|" + " --- |" * 8]
    rows = {(v, m): paired(cfg, folder(m, v), folder(m), seeds)
            for v in VARIANTS for m in ("SCD", "SCD+AW")}
    primary = [v for v in VARIANTS if rows[v, "SCD+AW"] is not None]
    resolved = dict(zip(primary, stats.holm([rows[v, "SCD+AW"]["p"] for v in primary]))) if len(primary) == len(VARIANTS) else {}
    for (v, m), r in rows.items():
        if r is None:
            out.append(f"| {flag(v)} | {m} | < 2 | | | | | not run |")
            continue
        holm = "" if m != "SCD+AW" else ("n/a (not all variants run)" if not resolved else ("resolved" if resolved[v] else "not resolved"))
        call = ("better" if r["mean"] > 0 else "harmful") if resolved.get(v) and m == "SCD+AW" else "not resolved"
        out.append(f"| {flag(v)} | {m} | {r['S']} | {pts(r['mean'])} | [{pts(r['lo'])}, {pts(r['hi'])}] | "
                   f"{r['p']:.3f} | {holm} | {call if m == 'SCD+AW' else '(SCD never changes a default)'} |")
    out += ["", "### Defaults against KD (validation, best stage)", "", "| method | seeds | mean - KD | 95% interval |", "| --- | --- | --- | --- |"]
    for m in ("SCD", "SCD+AW"):
        r = paired(cfg, folder(m), "kd", seeds)
        out.append(f"| {m} | {r['S'] if r else '< 2'} | {pts(r and r['mean'])} | " + (f"[{pts(r['lo'])}, {pts(r['hi'])}] |" if r else " |"))
    out += ["", "### Tuning parity (validation, best stage; mean over seeds, points)", "",
            "| method | " + " | ".join(f"lr {lr:g}, alpha {a:g}" for lr in LRS for a in ALPHAS) + " |", "|" + " --- |" * 7]
    for m, (method, aw) in METHODS.items():
        cells = []
        for lr in LRS:
            for a in ALPHAS:
                name = parity_folder(m, lr, a)
                vals = [best_val(Path(cfg.out_dir) / f"seed{s}" / name) for s in seeds]
                failed = sum((Path(cfg.out_dir) / f"seed{s}" / name / "failed.txt").exists() for s in seeds)
                vals = [v for v in vals if v is not None]
                tuned = not aw and method in ("kd", "cd") or a == 1.0
                cell = f"{100 * sum(vals) / len(vals):.1f} ({len(vals)})" if vals else "not run"
                cells.append("" if not tuned else cell + (f", {failed} failed" if failed else ""))
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    print("\n".join(out))
    return out


def main(cfg):
    return read(cfg) if cfg.read else train(cfg)


if __name__ == "__main__":
    run_main(main, parse_config(ChoicesConfig, "The schedule's open choices, decided on validation (docs/choices.md)."))
