"""
What the offline teacher signal (distill.py --teacher_topk K) changes, on validation only:

1. The signal itself: on every validation answer token, the teacher T*'s distribution kept as
   its top-k log-probs with the tail mass spread evenly (scd.compress_logprobs, dense_logprobs).
   Printed per k: the tail mass, KL(p_T || p_T^k), and the distillation KL the student sees,
   KL(p_T^k || p_S) against KL(p_T || p_S), for the SFT student S.
2. The students: best validation accuracy over the stages of each distilled method, per seed,
   of a run with --teacher_topk (--runs) against the same seeds of a full-logit run, read from
   its outcomes file (--outcomes): same teacher, same start, same data order, same probe.

    python reproduce.py --seeds 2 --teacher_topk 64 --out_dir runs/topk     # the top-k students (CPU: ~18 min)
    python -m lab.topk --runs runs/topk --outcomes report/grid/outcomes.json.gz
"""
import statistics
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import scd
from lab import reproduce
from plumbing import arg, load_checkpoint, parse_config, read_json, run_main


@dataclass
class TopkConfig:
    runs: str = arg("runs/topk", "a reproduce.py --out_dir run with --teacher_topk")
    outcomes: str = arg("report/grid/outcomes.json.gz", "the outcomes file of a full-logit run of the same seeds and config")
    ks: str = arg("8,16,64", "the k to measure the signal at")


@torch.no_grad()
def signal_error(teacher_dir, student_dir, ks):
    """{k: (mean tail mass, KL(p_T || p_T^k), KL(p_T^k || p_S), KL(p_T || p_S))} on the validation answer tokens."""
    best = lambda d: d / (m := read_json(d / "manifest.json"))["checkpoints"][m["best"]]["file"]
    (t, tok), (s, _) = load_checkpoint(best(teacher_dir)), load_checkpoint(best(student_dir))
    cfg = read_json(teacher_dir / "config.json")
    val = data.encode(reproduce.domains.load(cfg["data"])["val"], tok, t.config.block_size)
    logprobs = lambda m: torch.cat([lp for lp, _ in data.answer_pieces(m, val, tok.eot, "cpu", nullcontext(),
                                                                       lambda lg, y: torch.log_softmax(lg.float(), -1), 256)])
    lt, ls = logprobs(t), logprobs(s)
    out = {}
    for k in ks:
        values, indices = scd.compress_logprobs(lt, k)
        lk = scd.dense_logprobs(values, indices, lt.size(-1))
        out[k] = (float(1 - values.exp().sum(-1).mean()), scd.token_kl(lt, lk).mean().item(),
                  scd.token_kl(lk, ls).mean().item(), scd.token_kl(lt, ls).mean().item())
    return out, len(lt), lt.size(-1)


def main(cfg):
    runs = Path(cfg.runs)
    o = reproduce.load_outcomes(cfg.outcomes)
    full = {int(s): r for s, r in o["runs"].items()}
    seeds = sorted(int(p.name[4:]) for p in runs.glob("seed*") if int(p.name[4:]) in full)
    ks = [int(k) for k in cfg.ks.split(",")]
    print("| seed | k | tail mass | KL(p_T ‖ p_T^k) | KL(p_T^k ‖ p_S) | KL(p_T ‖ p_S) | relative change |\n" + "|" + " --- |" * 7)
    for seed in seeds:
        err, n, V = signal_error(runs / f"seed{seed}" / "teacher", runs / f"seed{seed}" / "student_sft", ks)
        for k, (tail, kl_k, d_k, d) in err.items():
            print(f"| {seed} | {k} | {tail:.2e} | {kl_k:.2e} | {d_k:.4f} | {d:.4f} | {100 * (d_k - d) / d:+.2f}% |")
    print(f"\n({n} validation answer tokens, vocabulary {V})\n")
    print("| method | seed | full logits: best val acc | top-k offline: best val acc | difference (points) |\n" + "|" + " --- |" * 5)
    diffs = {}
    for name in [n for n in full[seeds[0]] if n not in ("teacher", "SFT student", "SFT, stages")]:
        for seed in seeds:
            a = max(o["files"][f"{full[seed][name]}/results.json"]["val_acc"])
            folder = runs / f"seed{seed}" / Path(full[seed][name]).name
            b = max(read_json(folder / "results.json")["val_acc"])
            diffs.setdefault(name, []).append(b - a)
            print(f"| {name} | {seed} | {a:.4f} | {b:.4f} | {100 * (b - a):+.2f} |")
    print("\nmean difference per method (points): " + ", ".join(f"{n} {100 * statistics.mean(v):+.2f}" for n, v in diffs.items()))
    same = lambda s: read_json(runs / f"seed{s}" / "teacher" / "manifest.json")["checkpoints"] == \
        o["files"][f"{full[s]['teacher']}/manifest.json"]["checkpoints"]
    teachers = [same(s) for s in seeds]
    print(f"the teachers equal the full-logit run's, checkpoint for checkpoint: {all(teachers)}")


if __name__ == "__main__":
    run_main(main, parse_config(TopkConfig, "What the offline top-k teacher signal changes, on validation."))
