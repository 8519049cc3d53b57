"""
The positive control: sparse parity, where distilling from a teacher's intermediate
checkpoint is known to help (Panigrahi, Liu, Malladi, Risteski and Goel, "Progressive
distillation induces an implicit curriculum", ICLR 2025), run through train_teacher.py and
distill.py. The study is declared in docs/parity.md before its runs; its pilot is in LOG.md.

    python -m lab.parity                     # the declared study: every seed's runs, then the report
    python -m lab.parity --read true         # the report alone, from the finished runs -> report/parity.{md,png}
    python -m lab.parity --seeds 90 --report_dir /tmp/pilot    # a pilot setting, on a seed the study does not use

Per seed (its own hidden support, data and teacher): the teacher (a checkpoint every
--ckpt_every steps), the SFT student whose per-example loss AW reads, then six students of one
step budget, each with a validation point every --eval_every steps: SFT on the labels, KD from
T*, the 2-shot protocol (the checkpoint where the teacher's output correlates most with the single
support bits, then T*), CD, SCD and SCD+AW. The training set holds as many examples as the
longest run's steps times the batch, so no run sees an example twice.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import distill  # noqa: E402
import train_teacher as tt  # noqa: E402
from lab import domains, stats  # noqa: E402
from plumbing import arg, load_checkpoint, parse_config, run_main  # noqa: E402

# the students: name -> distill.py flags (2-shot's steps are filled in per seed, from the diagnostic)
CONDITIONS = {"SFT": dict(method="sft"), "KD": dict(method="kd"), "2-shot": dict(method="given"),
              "CD": dict(method="cd"), "SCD": dict(method="scd"), "SCD+AW": dict(method="scd", aw=True)}


@dataclass
class ParityConfig:
    n_bits: int = arg(20, "N: bits per prompt", low=2)
    k: int = arg(2, "K: the label is the XOR of K hidden bits", low=1)
    seeds: str = arg("0,1,2,3,4,5", "seeds, comma-separated: each its own support, data, teacher and students")
    teacher_steps: int = arg(400, "teacher steps", low=1)
    ckpt_every: int = arg(5, "teacher steps between dense checkpoints", low=1)
    teacher_lr: float = arg(3e-3, "teacher peak learning rate (no warm-up, cosine decay)", low=0)
    stages: int = arg(4, "K stages of every student", low=1)
    steps_per_stage: int = arg(750, "T steps per stage", low=1)
    lr: float = arg(1e-3, "students' peak learning rate", low=0)
    batch_size: int = arg(32, "examples per step, teacher and students", low=1)
    eval_every: int = arg(50, "student steps between validation points of the learning curves", low=1)
    threshold: float = arg(0.9, "the validation accuracy whose first step the study compares", low=0)
    conditions: str = arg(",".join(CONDITIONS), "students to train, comma-separated")
    out_dir: str = arg("runs/parity", "where the runs go, one folder per seed")
    report_dir: str = arg("report", "where parity.md and parity.png go")
    read: bool = arg(False, "train nothing: write the report from the finished runs")
    threads: int = arg(0, "torch threads (0: torch's default)", low=0)


def splits_for(cfg, seed):
    """The seed's sparse parity: its own support and bit strings, train large enough that no run repeats one."""
    train = max(cfg.teacher_steps, cfg.stages * cfg.steps_per_stage) * cfg.batch_size
    return domains.parity_domain(seed, cfg.n_bits, cfg.k, (train, 1000, 1000))


# -----------------------------------------------------------------------------
# the diagnostic: how much a model's answer follows each single bit

def degree1(p_one, bits):
    """Degree-1 correlations: E[(2 p(1|x) - 1) (2 x_i - 1)] for each bit i over the inputs x.
    p_one (N,): the model's probability that the answer is 1; bits (N, n) of 0/1 -> (n,). A
    model whose answer is bit i scores 1 there; on uniform inputs the parity of two or more bits
    scores 0 on every single bit, and so does any function of bits other than i."""
    p_one, bits = torch.as_tensor(p_one, dtype=torch.float64), torch.as_tensor(bits, dtype=torch.float64)
    return ((2 * p_one[:, None] - 1) * (2 * bits - 1)).mean(0)


@torch.no_grad()
def answer_p_one(model, tok, examples, device="cpu"):
    """p(answer ' 1') / (p(' 0') + p(' 1')) at each example's answer position, and its bits (N, n)."""
    zero, one = tok.encode(" 0"), tok.encode(" 1")
    enc = data.encode(examples, tok, model.config.block_size)
    x, _, mask = data.make_batch(enc, range(len(enc)), tok.eot, device)
    first = mask & ~torch.cat([mask[:, :1] & False, mask[:, :-1]], 1)  # each example's first answer position
    two = model(x, positions=first)[:, [zero[0], one[0]]].float().softmax(-1)
    bits = [[int(b) for b in ex["prompt"].split()[:-1]] for ex in examples]
    return two[:, 1], torch.tensor(bits)


def trail_degree1(tdir, examples, support):
    """Per teacher checkpoint: its step, validation accuracy, the mean |degree-1 correlation| over the
    support bits and the largest over the other bits. -> list of dicts (written to degree1.json)."""
    manifest, rows = json.loads((Path(tdir) / "manifest.json").read_text()), []
    for c in manifest["checkpoints"]:
        model, tok = load_checkpoint(Path(tdir) / c["file"])
        corr = degree1(*answer_p_one(model, tok, examples)).abs()
        off = [i for i in range(corr.numel()) if i not in support]
        rows.append(dict(step=c["step"], val_acc=c["val_acc"], support=round(corr[support].mean().item(), 5),
                         off=round(corr[off].max().item(), 5) if off else 0.0))
    return rows


def peak(rows):
    """The checkpoint Panigrahi et al. distil from first: the largest support correlation (the earliest on a tie)."""
    return max(rows, key=lambda r: r["support"])["step"]


def transition(rows, low=0.6, high=0.95):
    """The teacher's transition: the steps after its last checkpoint at validation accuracy <= low
    up to its first at >= high after that. -> (first step, last step), or None if it never gets there."""
    last_low = max((i for i, r in enumerate(rows) if r["val_acc"] <= low), default=-1)
    up = next((i for i in range(last_low + 1, len(rows)) if rows[i]["val_acc"] >= high), None)
    return None if up is None or last_low + 1 > up else (rows[last_low + 1]["step"], rows[up]["step"])


def steps_to(curve, threshold):
    """The first step of a learning curve [[step, val_acc], ...] at or above threshold (None: never)."""
    return next((s for s, a in curve if a >= threshold), None)


# -----------------------------------------------------------------------------
# the runs

def run_seed(cfg, seed):
    root, splits = Path(cfg.out_dir) / f"seed{seed}", splits_for(cfg, seed)
    steps_per_epoch = len(splits["train"]) // cfg.batch_size
    common = dict(data=f"parity:{cfg.n_bits}:{cfg.k}", seed=seed, batch_size=cfg.batch_size, log_every=500, init_from="")
    print(f"\n=== seed {seed}: teacher", flush=True)
    tt.train(tt.TrainConfig(preset="parity_teacher", out_dir=str(root / "teacher"), steps=cfg.teacher_steps,
                            ckpt_per_epoch=steps_per_epoch / cfg.ckpt_every, lr=cfg.teacher_lr, warmup_frac=0.0,
                            **common), splits)
    diag = root / "teacher" / "degree1.json"
    if not diag.exists():
        support = domains.parity_support(seed, cfg.n_bits, cfg.k)
        diag.write_text(json.dumps(trail_degree1(root / "teacher", splits["val"], support)))
    rows = json.loads(diag.read_text())
    best = json.loads((root / "teacher" / "manifest.json").read_text())
    t_star = best["checkpoints"][best["best"]]["step"]
    print(f"\n=== seed {seed}: the SFT student (AW's anchor)", flush=True)
    tt.train(tt.TrainConfig(preset="parity_student", out_dir=str(root / "anchor"), lr=cfg.lr,
                            steps=cfg.stages * cfg.steps_per_stage, ckpt_per_epoch=1, **common), splits)
    for name in cfg.conditions.split(","):
        print(f"\n=== seed {seed}: {name} student", flush=True)
        given = ",".join(map(str, [peak(rows)] + [t_star] * (cfg.stages - 1))) if name == "2-shot" else ""
        distill.main(distill.DistillConfig(
            preset="parity_student", teacher_dir=str(root / "teacher"), anchor_dir=str(root / "anchor"),
            out_dir=str(root / folder(name)), stages=cfg.stages, steps_per_stage=cfg.steps_per_stage, lr=cfg.lr,
            eval_every=cfg.eval_every, pool_start=0.0, teacher_cache_gib=0.0, given_steps=given,
            **CONDITIONS[name], **common), splits)


def folder(name):
    return name.lower().replace("+", "_").replace("-", "")


# -----------------------------------------------------------------------------
# the report

def collect(cfg):
    """Per finished seed: the teacher's trail (with the diagnostic), and per condition its curve,
    final test accuracy and the teacher step each stage distilled from."""
    out = {}
    for seed in map(int, cfg.seeds.split(",")):
        root = Path(cfg.out_dir) / f"seed{seed}"
        runs = {}
        for name in CONDITIONS:
            if (root / folder(name) / "results.json").exists():
                sched = json.loads((root / folder(name) / "schedule.json").read_text())["stages"]
                runs[name] = dict(curve=[p for s in sched for p in s["curve"]],
                                  steps=[s.get("teacher_step") for s in sched],
                                  spread=[(max(s["kl_best"]) - min(s["kl_best"]), max(s["kl_student"]) - min(s["kl_student"]))
                                          for s in sched if "kl_best" in s],
                                  test=json.loads((root / folder(name) / "results.json").read_text())["final"]["acc"])
        if len(runs) == len(CONDITIONS):
            out[seed] = dict(trail=json.loads((root / "teacher" / "degree1.json").read_text()), runs=runs)
    return out


def censored_steps(curve, cfg):
    """Steps to the threshold; a run that never reaches it counts as one validation point past
    its budget (a lower bound on its true steps: ratios against it are upper bounds)."""
    s = steps_to(curve, cfg.threshold)
    return s if s is not None else cfg.stages * cfg.steps_per_stage + cfg.eval_every


def log_ratio(seeds, a, b, cfg):
    """log(steps_a / steps_b) per seed, with a t interval over seeds -> dict of lab.stats plus p."""
    d = [[math.log(censored_steps(s["runs"][a]["curve"], cfg) / censored_steps(s["runs"][b]["curve"], cfg))] for s in seeds]
    r = stats.paired_interval(d, [[0.0]] * len(d))
    return dict(r, p=stats.p_value(r))


def claims(cfg, seeds):
    """The declared claims (docs/parity.md), each with its figures and its verdict."""
    rows = list(seeds.values())
    fam1 = {b: log_ratio(rows, "2-shot", b, cfg) for b in ("SFT", "KD")}
    ok1 = stats.holm([r["p"] for r in fam1.values()])
    out = {"i": {b: dict(r, resolved=ok, holds=ok and r["hi"] < 0) for (b, r), ok in zip(fam1.items(), ok1)}}
    def finds(name):  # claim (ii)'s two counts for one adaptive schedule
        inside, walks = [], []
        for s in rows:
            win, steps = transition(s["trail"]), s["runs"][name]["steps"]
            acc = {r["step"]: r["val_acc"] for r in s["trail"]}
            inside.append(win is not None and win[0] <= steps[0] <= win[1])
            walks.append(all(x <= y for x, y in zip(steps, steps[1:])) and acc[steps[-1]] >= 0.95)
        return sum(inside), sum(walks)
    n, (inside, walks) = len(rows), finds("SCD")
    out["ii"] = dict(inside=inside, walks=walks, n=n, holds=inside >= n - 1 and walks >= n - 1, fails=inside <= n / 2,
                     aw=finds("SCD+AW"))
    fam3 = {(a, b): log_ratio(rows, a, b, cfg) for a in ("SCD", "SCD+AW", "CD") for b in ("KD", "2-shot")}
    ok3 = stats.holm([r["p"] for r in fam3.values()])
    out["iii"] = {k: dict(r, resolved=ok) for (k, r), ok in zip(fam3.items(), ok3)}
    return out


def report(cfg):
    """report/parity.md and parity.png from the finished seeds: a row per seed, then the claims
    (with two seeds or more) by the declared rule. -> the claims (claims()), or {} for one seed."""
    seeds = collect(cfg)
    if not seeds:
        raise SystemExit(f"{cfg.out_dir}: no seed of {cfg.seeds} has every condition finished")
    c = claims(cfg, seeds) if len(seeds) > 1 else {}
    budget = cfg.stages * cfg.steps_per_stage
    ratio = lambda r: f"{math.exp(r['mean']):.2f} [{math.exp(r['lo']):.2f}, {math.exp(r['hi']):.2f}]"
    never = lambda s: "never" if s is None else str(s)
    lines = ["# Sparse parity: the positive control", "",
             f"`python -m lab.parity --read true`: parity:{cfg.n_bits}:{cfg.k}, {len(seeds)} seeds "
             f"({', '.join(map(str, seeds))}), each with its own support, data and teacher. The design and its rule, "
             f"declared before these runs: [docs/parity.md](../docs/parity.md). Students: {cfg.stages} stages of "
             f"{cfg.steps_per_stage} steps ({budget} in all), a validation point every {cfg.eval_every} steps.", "",
             "## Per seed", "",
             "| seed | transition (teacher steps) | degree-1 peak (correlation) | "
             + " | ".join(f"{n}: steps to {cfg.threshold:g}" for n in CONDITIONS) + " | SCD's checkpoints (steps) | "
             "SCD+AW's |", "|" + " --- |" * (5 + len(CONDITIONS))]
    for seed, s in seeds.items():
        win, p = transition(s["trail"]), max(s["trail"], key=lambda r: r["support"])
        lines.append(f"| {seed} | {'none' if win is None else f'{win[0]} to {win[1]}'} | {p['step']} ({p['support']:.2f}) | "
                     + " | ".join(never(steps_to(s["runs"][n]["curve"], cfg.threshold)) for n in CONDITIONS) + " | "
                     + " -> ".join(map(str, s["runs"]["SCD"]["steps"])) + " | "
                     + " -> ".join(map(str, s["runs"]["SCD+AW"]["steps"])) + " |")
    spread = [s["runs"]["SCD"]["spread"][0] for s in seeds.values() if s["runs"]["SCD"]["spread"]]
    if spread:
        lines += ["", f"What SCD's criterion has to choose from at its first stage: across the candidates, KL(T* ‖ c) spans "
                  f"{sum(b for b, _ in spread) / len(spread):.2f} nats and the student term "
                  f"{sum(t for _, t in spread) / len(spread):.2f} (means over seeds of max − min)."]
    lines += ["", "Final test accuracy, mean over seeds: " + ", ".join(
        f"{n} {sum(s['runs'][n]['test'] for s in seeds.values()) / len(seeds):.3f}" for n in CONDITIONS) + ".", "",
        "## Claims", ""]
    if not c:
        lines += ["One seed: no claim is called."]
    else:
        lines += [f"Steps to validation accuracy {cfg.threshold:g} as a ratio (a run that never gets there counts as "
                  f"{budget + cfg.eval_every} steps, so a ratio against it is an upper bound): the geometric mean over "
                  "seeds with its 95% interval, Holm within each family.", "",
                  "| claim | ratio, or seeds | p | verdict |", "| --- | --- | --- | --- |"]
        for b, r in c["i"].items():
            call = "holds" if r["holds"] else "does not hold" if r["resolved"] else "not resolved"
            lines.append(f"| (i) 2-shot / {b} | {ratio(r)} | {r['p']:.4f} | {call} |")
        ii = c["ii"]
        call = "holds" if ii["holds"] else "does not hold" if ii["fails"] else "not resolved"
        lines.append(f"| (ii) SCD's first stage inside the transition; its stages walk to T* | {ii['inside']} of "
                     f"{ii['n']}; {ii['walks']} of {ii['n']} | | {call} |")
        lines.append(f"| (beside (ii), not called) SCD+AW, the same | {ii['aw'][0]} of {ii['n']}; {ii['aw'][1]} of "
                     f"{ii['n']} | | |")
        for (a, b), r in c["iii"].items():
            call = "not resolved" if not r["resolved"] else ("faster" if r["mean"] < 0 else "slower")
            lines.append(f"| (iii) {a} / {b} | {ratio(r)} | {r['p']:.4f} | {call} |")
    lines += ["", "![parity](parity.png)"]
    rep = Path(cfg.report_dir)
    rep.mkdir(parents=True, exist_ok=True)
    figure(cfg, seeds, rep / "parity.png")
    (rep / "parity.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return c


COLORS = {"SFT": "0.5", "KD": "C0", "2-shot": "C2", "CD": "C1", "SCD": "C3", "SCD+AW": "C4"}


def figure(cfg, seeds, path):
    """Top: a seed's teacher (the first whose transition spans 4 checkpoints or more; validation accuracy and the degree-1 correlation along its
    trail, the transition shaded) and the checkpoint each schedule distilled from at each stage.
    Below: every condition's learning curve, the mean over seeds and its min..max band."""
    fig, (top, low) = plt.subplots(2, 1, figsize=(9, 7.5))
    def wide(s):  # checkpoints in the seed's transition
        lo, hi = transition(s["trail"]) or (1, 0)
        return sum(lo <= r["step"] <= hi for r in s["trail"])
    seed, s = next(((k, v) for k, v in seeds.items() if wide(v) >= 4), next(iter(seeds.items())))  # a slow transition
    steps = [r["step"] for r in s["trail"]]
    top.plot(steps, [r["val_acc"] for r in s["trail"]], "k-", label="teacher validation accuracy")
    top.plot(steps, [r["support"] for r in s["trail"]], "k:", label="degree-1 correlation, support bits")
    win = transition(s["trail"])
    if win:
        top.axvspan(*win, color="0.88", label="transition")
    for i, name in enumerate(("KD", "2-shot", "CD", "SCD", "SCD+AW")):
        y, picks = 1.1 + 0.08 * i, s["runs"][name]["steps"]
        top.plot(picks, [y] * len(picks), "-o", color=COLORS[name], ms=4, lw=0.6)
        for j, p in enumerate(picks):
            top.annotate(str(j), (p, y), fontsize=6, xytext=(2, 3), textcoords="offset points", color=COLORS[name])
        top.text(1.01, y, name, color=COLORS[name], fontsize=8, va="center", transform=top.get_yaxis_transform())
    top.set(xlabel=f"teacher step (seed {seed}, the first whose transition spans 4 checkpoints or more); "
                   "dots: the checkpoint of stage 0, 1, 2, 3", ylim=(0, 1.52),
            yticks=[0, 0.25, 0.5, 0.75, 1.0],
            title=f"Sparse parity {cfg.n_bits}:{cfg.k}: the teacher's trail, and where each schedule distils from")
    top.legend(fontsize=7, loc="center right")
    for name in CONDITIONS:
        curves = [r["runs"][name]["curve"] for r in seeds.values()]
        x, cols = [p[0] for p in curves[0]], list(zip(*[[p[1] for p in c] for c in curves]))
        low.plot(x, [sum(c) / len(c) for c in cols], color=COLORS[name], label=name)
        low.fill_between(x, [min(c) for c in cols], [max(c) for c in cols], alpha=0.12, color=COLORS[name])
    for j in range(1, cfg.stages):
        low.axvline(j * cfg.steps_per_stage, color="k", lw=0.5, ls=":")
    low.axhline(cfg.threshold, color="k", lw=0.5)
    low.set(xlabel="student step (dotted: stage boundaries)", ylabel="validation accuracy",
            title=f"The students: mean over {len(seeds)} seeds, band = min..max; the line at {cfg.threshold:g}")
    low.legend(fontsize=7, loc="center right")
    fig.tight_layout(rect=(0, 0, 0.95, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(cfg):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.read:
        for seed in map(int, cfg.seeds.split(",")):
            run_seed(cfg, seed)
    return report(cfg)


if __name__ == "__main__":
    run_main(main, parse_config(ParityConfig, "The sparse-parity control: SFT, KD, 2-shot, CD, SCD and SCD+AW students."))
