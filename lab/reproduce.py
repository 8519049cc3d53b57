"""
The paper's comparison end to end (METHOD.md sections 3 and 5): teacher SFT with dense
checkpoints, the SFT student (the anchor), the same SFT in stages (the restart control),
then KD, CD, SCD and SCD+AW students, all evaluated on test, with a report: results.md
and five plots in --report_dir.

    python reproduce.py                      # one seed, the README's main command (the entry file at the top)
    python reproduce.py --seeds 5            # seeds 0 to 4: paired differences with 95% intervals
    python reproduce.py --grid true          # adds KD+AW and CD+AW (the full 3 x 2 grid)

Every phase is an ordinary train_teacher.py or distill.py run in --out_dir/seed{s}/<name>;
a phase that finished with the same config and data is reused, an interrupted one resumes.
The lab's data specs (default:NOISE, parity:N:K) are generated here (lab/domains.py) and
handed to the phases; the reference scripts read 'default' and folders.
"""
import gzip
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
import distill  # noqa: E402
from lab import domains  # noqa: E402
import scale  # noqa: E402
import scd  # noqa: E402
from lab import stats  # noqa: E402
import train_teacher as tt  # noqa: E402
from model import PRESETS  # noqa: E402
from plumbing import RunError, arg, parse_config, run_main, setup_device  # noqa: E402
from plumbing import base_file, load_checkpoint  # noqa: E402

METHODS = [("sft", False, "SFT, stages"), ("kd", False, "KD"), ("cd", False, "CD"), ("scd", False, "SCD"),
           ("scd", True, "SCD+AW")]
GRID = [("kd", True, "KD+AW"), ("cd", True, "CD+AW")]
COLORS = {name: f"C{i}" for i, name in enumerate(["teacher", "SFT student"] + [m[2] for m in METHODS + GRID])}


@dataclass
class ReproduceConfig:
    data: str = arg("default", "'default', 'default:NOISE' or a folder with train/val/test.jsonl")
    out_dir: str = arg("runs/reproduce", "where the runs go, one folder per seed and phase")
    report_dir: str = arg("", "where results.md and the plots go ('': --out_dir/report, the run's own)")
    seeds: int = arg(1, "repeat with seeds 0 .. seeds-1; differences get 95%% intervals over seeds and test examples", low=1)
    grid: bool = arg(False, "also run KD+AW and CD+AW")
    budgets: str = arg("1", "student budgets, as multiples of the students' N x T epochs: SFT and KD at each (e.g. 1,2,4)")
    teacher: str = arg("teacher", "teacher preset", choices=tuple(PRESETS))
    student: str = arg("student", "student preset", choices=tuple(PRESETS))
    base: str = arg("auto", "pretrained: teacher and students fine-tune the committed bases (python -m lab.pretrain); none: random "
                    "init, trained on the domain alone; auto: pretrained for the default domain, none for other data",
                    choices=("auto", "pretrained", "none"))
    teacher_epochs: int = arg(24, "teacher SFT epochs", low=1)
    ckpt_per_epoch: float = arg(0.25, "teacher checkpoints per epoch: N = epochs x this (0.25: one every 4 epochs)", low=0.01)
    protocol: str = arg("k4", "k4: --stages stages in the N x T epochs, candidates from the second half (chosen on validation); "
                        "paper: N stages of --stage_epochs (T), one per teacher checkpoint, every checkpoint a candidate",
                        choices=("k4", "paper"))
    stage_epochs: int = arg(2, "paper protocol: epochs per stage (T); the students' budget is N x T epochs", low=1)
    stages: int = arg(4, "k4 protocol: the number of stages", low=1)
    teacher_lr: float = arg(3e-3, "the teacher's peak learning rate", low=0)
    student_lr: float = arg(3e-3, "every student's peak learning rate (chosen on KD's validation accuracy)", low=0)
    teacher_from: str = arg("", "your teacher: a model folder (or a .pt checkpoint) to fine-tune ('': --teacher from --base)")
    student_from: str = arg("", "your student: a model folder (or a .pt checkpoint) for the SFT student and every distilled "
                            "one ('': --student from --base)")
    teacher_lora: int = arg(0, "the teacher's SFT with LoRA adapters of this rank: its trail is adapter files on a frozen "
                            "--teacher_from (0: full fine-tune)", low=0)
    student_lora: int = arg(0, "every student trains LoRA adapters of this rank on a frozen --student_from (0: all weights)", low=0)
    teacher_topk: int = arg(0, "distil from the stage teacher's top-k log-probs kept offline (distill.py --teacher_topk; "
                            "0: full logits)", low=0)
    batch_size: int = arg(16, "examples per step, every phase", low=1)
    grad_ckpt: bool = arg(False, "activation checkpointing in every phase (less memory, more time)")
    converge: bool = arg(False, "also train each seed's teacher for twice its epochs: is the teacher converged? (with "
                         "--outcomes: for the file's first --seeds seeds, added to the file)")
    outcomes: str = arg("", "remake the report from this outcomes file alone, no training (every report writes one)")
    compare_to: str = arg("", "the --out_dir of a finished run with the other --base: the report compares the two")

    def __post_init__(self):  # the committed bases belong to the default world: other data starts from random init
        if self.base == "auto":  # your own models bring their own bases
            self.base = "pretrained" if self.data.split(":")[0] == "default" and not (self.teacher_from or self.student_from) else "none"
        self.report_dir = self.report_dir or str(Path(self.outcomes).parent / "recomputed" if self.outcomes
                                                 else Path(self.out_dir) / "report")
    probe_size: int = arg(256, "probe examples for the SCD schedule", low=1)
    device: str = arg("auto", "cpu, cuda, ... (auto: cuda if available)")
    dtype: str = arg("auto", "autocast precision", choices=("auto", "float32", "bfloat16", "float16"))


def run_all(cfg):
    """Every phase for every seed -> ({seed: {row name: run folder}}, {seed: {(name, budget): folder}},
    wall time per phase, number of finished phases reused)."""
    runs, sweeps, wall, reused = {}, {}, {}, 0
    methods = METHODS + (GRID if cfg.grid else [])
    t_init, init = starts(cfg)
    for rank, start, who in ((cfg.teacher_lora, t_init, "teacher"), (cfg.student_lora, init, "student")):
        if rank and not start:  # said now, not after the teacher has trained
            raise RunError(f"--{who}_lora {rank}: adapters need a base to adapt: give --{who}_from a model folder or .pt file")
    splits = domains.load(cfg.data)
    steps_per_epoch = len(splits["train"]) // cfg.batch_size
    budgets = sorted({int(b) for b in cfg.budgets.split(",")} - {1})
    for seed in range(cfg.seeds):
        root = Path(cfg.out_dir) / f"seed{seed}"
        r = runs[seed] = {"teacher": root / "teacher", "SFT student": root / "student_sft"}
        teacher = lambda folder, m=1: teacher_config(cfg, seed, folder, m)
        sft = lambda name, folder, m=1: (name, tt.train, sft_config(cfg, seed, root, folder, steps_per_epoch, m))
        dist = lambda name, folder, method, aw, m=1: (name, distill.main, distill_config(cfg, seed, root, folder, steps_per_epoch,
                                                                                           method, aw, m))
        phases = [("teacher", tt.train, teacher(r["teacher"])), sft("SFT student", r["SFT student"])]
        sw = sweeps[seed] = {}
        if cfg.converge:  # twice the teacher's steps: how much lower does its best validation loss go?
            sw["teacher", 2] = root / "teacher_x2"
            phases.append(("teacher x2", tt.train, teacher(sw["teacher", 2], 2)))
        for method, aw, name in methods:
            r[name] = root / (name.lower().replace("+", "_").replace(", ", "_") + ("_k4" if cfg.protocol == "k4" else ""))
            phases.append(dist(name, r[name], method, aw))
        for m in budgets:  # the capacity question: does more training close the gap to the teacher?
            sw["SFT student", m], sw["KD", m] = root / f"student_sft_x{m}", root / f"kd_x{m}"
            phases += [sft("SFT student", sw["SFT student", m], m), dist("KD", sw["KD", m], "kd", False, m)]
        for i, (name, fn, c) in enumerate(phases):
            print(f"\n=== seed {seed}, phase {i + 1}/{len(phases)}: {name} -> {c.out_dir}", flush=True)
            reused += finished(Path(c.out_dir), name) is not None
            fn(c, splits)
    for r in runs.values():  # each run records its own wall time, so a reused phase keeps its figure
        for name, folder in r.items():
            wall[name] = wall.get(name, 0.0) + finished(folder, name).get("wall_s", float("nan"))
    for sw in sweeps.values():
        for (name, m), folder in sw.items():
            wall[f"{name} x{m}"] = wall.get(f"{name} x{m}", 0.0) + finished(folder, name).get("wall_s", float("nan"))
    return runs, sweeps, wall, reused


def starts(cfg):
    """Where the teacher and the students start: your folders, else the committed bases, else random init ('')."""
    base = "base" if cfg.base == "pretrained" else ""
    return cfg.teacher_from or base, cfg.student_from or base


def teacher_config(cfg, seed, folder, m=1):
    """The teacher's SFT run of a seed, for m times its epochs (m = 2: is it converged?)."""
    return tt.TrainConfig(data=cfg.data, device=cfg.device, dtype=cfg.dtype, seed=seed, preset=cfg.teacher, out_dir=str(folder),
                          init_from=starts(cfg)[0], epochs=m * cfg.teacher_epochs,
                          ckpt_per_epoch=cfg.ckpt_per_epoch, lr=cfg.teacher_lr, lora_rank=cfg.teacher_lora,
                          batch_size=cfg.batch_size, grad_ckpt=cfg.grad_ckpt,
                          probe_size=cfg.probe_size)  # the probes the distillations choose on, stored once here


def sft_config(cfg, seed, root, folder, steps_per_epoch, m=1):
    """The SFT student's run of a seed (root: the seed's folder), for m times the students' epochs."""
    return tt.TrainConfig(data=cfg.data, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size, grad_ckpt=cfg.grad_ckpt,
                          lora_rank=cfg.student_lora, seed=seed, preset=cfg.student, out_dir=str(folder),
                          epochs=m * protocol(cfg, steps_per_epoch)[3], lr=cfg.student_lr, init_from=starts(cfg)[1],
                          ckpt_per_epoch=cfg.ckpt_per_epoch, compare_to=str(root / "teacher"),
                          probe_resamples=0)  # a student is no teacher: the run's probe is all it scores


def distill_config(cfg, seed, root, folder, steps_per_epoch, method, aw, m=1, **changes):
    """A distilled student's run of a seed, from the seed's teacher and SFT student (in root),
    for m times the students' budget; changes: other distill.py flags (the lab's variants)."""
    stages, steps_per_stage, pool_start, _ = protocol(cfg, steps_per_epoch)
    return distill.DistillConfig(**{**dict(
        data=cfg.data, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size, grad_ckpt=cfg.grad_ckpt,
        lora_rank=cfg.student_lora, seed=seed, preset=cfg.student, method=method, aw=aw, out_dir=str(folder),
        teacher_dir=str(root / "teacher"), anchor_dir=str(root / "student_sft"), stages=stages,
        steps_per_stage=m * steps_per_stage, probe_size=cfg.probe_size, lr=cfg.student_lr, init_from=starts(cfg)[1],
        pool_start=pool_start, teacher_topk=cfg.teacher_topk), **changes})


def add_converge(o, seeds):
    """The convergence precondition after a finished grid, without training the grid again:
    seeds 0 .. seeds-1 get the teacher trained for twice its epochs (in the grid's own run
    folders, resumable, reused when finished), and each run's manifest joins the outcomes o."""
    g = ReproduceConfig(**o["cfg"])
    splits = domains.load(g.data)
    for seed in range(seeds):
        folder = Path(g.out_dir) / f"seed{seed}" / "teacher_x2"
        print(f"\n=== seed {seed}: the teacher for twice its epochs -> {folder}", flush=True)
        tt.train(teacher_config(g, seed, folder, 2), splits)
        o["files"][(folder / "manifest.json").as_posix()] = json.loads((folder / "manifest.json").read_text())
    o["wall"]["teacher x2"] = sum(v["wall_s"] for k, v in o["files"].items() if k.endswith("teacher_x2/manifest.json"))
    return o


def protocol(cfg, steps_per_epoch):
    """-> (stages, steps per stage, the candidate pool's start, the students' epochs). The
    paper's protocol: a stage per teacher checkpoint, T epochs each, every checkpoint a
    candidate. k4: the same budget in --stages stages, candidates from the teacher's second half."""
    n = max(1, round(cfg.teacher_epochs * cfg.ckpt_per_epoch))
    epochs = n * cfg.stage_epochs
    if cfg.protocol == "paper":
        return n, cfg.stage_epochs * steps_per_epoch, 0.0, epochs
    return cfg.stages, epochs * steps_per_epoch // cfg.stages, 0.5, epochs


def finished(folder, name):
    """What a finished phase recorded (manifest or results), or None."""
    path = folder / ("manifest.json" if name in ("teacher", "SFT student") else "results.json")
    done = json.loads(path.read_text()) if path.exists() else {}
    return done if "test" in done or "final" in done else None


# -----------------------------------------------------------------------------
# reading the runs back

OUTCOMES = {}  # what the report is being made from (report() fills it): every figure below comes from here


def read(path):
    """A run's small file as the outcomes file holds it: JSON as is, test records as a 0/1 string."""
    return OUTCOMES["files"][Path(path).as_posix()]


def has(path):
    return Path(path).as_posix() in OUTCOMES["files"]


def ran(folder, name):
    """finished() on the outcomes: did this phase finish?"""
    path = folder / ("manifest.json" if name in ("teacher", "SFT student") else "results.json")
    return has(path) and ("test" in read(path) or "final" in read(path))


def records(folder, which="best"):
    """A run's per-example test records ({correct, subdomain}). A distilled run has two students,
    best (on validation) and final; a train_teacher.py run (the teacher, the SFT student) has one
    model on test, T*, its checkpoint of lowest validation loss: both tables show it for either
    `which` (the final table says so)."""
    bits = read(folder / "test_records.jsonl") if has(folder / "test_records.jsonl") else read(folder / f"test_records_{which}.jsonl")
    return [{"correct": b == "1", "subdomain": s} for b, s in zip(bits, OUTCOMES["subdomains"], strict=True)]


def collect(cfg, runs, sweeps, wall, command):
    """Everything the report reads from the runs, with no model and no checkpoint: each run's
    manifest, schedule and results, its per-example test outcomes as a 0/1 string, seed 0's AW
    weights, the bases' table. The report is made from this alone (report()), so anyone can
    remake it from the committed file: python reproduce.py --outcomes <folder>/outcomes.json.gz"""
    folders = [f for r in runs.values() for f in r.values()] + [f for sw in sweeps.values() for f in sw.values()]
    folders += [r["teacher"].with_name("teacher_x2") for r in runs.values()]  # --converge true
    other = "_k4" if cfg.protocol == "paper" else ""  # the other protocol's runs, where they exist (protocol_table)
    folders += [f.with_name(f.name.removesuffix("_k4") + other) for r in runs.values() for f in r.values()]
    if cfg.compare_to:
        folders += [Path(cfg.compare_to) / f"seed{s}" / f.name for s, r in runs.items() for f in r.values()]
    files, subdomains = {}, None
    for f in dict.fromkeys(folders):
        for name in ("manifest.json", "schedule.json", "results.json"):
            if (f / name).exists():
                files[(f / name).as_posix()] = json.loads((f / name).read_text())
        for name in ("test_records.jsonl", "test_records_best.jsonl", "test_records_final.jsonl"):
            if (f / name).exists():
                recs = [json.loads(line) for line in open(f / name, encoding="utf-8")]
                files[(f / name).as_posix()] = "".join("01"[bool(x["correct"])] for x in recs)
                if subdomains not in (None, [x["subdomain"] for x in recs]):
                    raise RuntimeError(f"{f / name}: other test examples than the first run's; the report pairs them by position")
                subdomains = [x["subdomain"] for x in recs]
    splits = domains.load(cfg.data)
    r0 = runs[0]
    ws, tfs, noisy = aw_weights_by_stage(r0["SCD+AW"], r0["teacher"], r0["SFT student"])
    return dict(
        cfg={k: v for k, v in vars(cfg).items() if k not in ("outcomes", "report_dir")}, command=command, files=files,
        subdomains=subdomains, runs={s: {n: f.as_posix() for n, f in r.items()} for s, r in runs.items()},
        sweeps={s: [[n, m, f.as_posix()] for (n, m), f in sw.items()] for s, sw in sweeps.items()}, wall=wall,
        protocol=protocol(cfg, len(splits["train"]) // cfg.batch_size),
        machine=f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, device "
                f"{setup_device(cfg.device, cfg.dtype)[0]}",
        bases=bases_table(cfg, splits) if cfg.base == "pretrained" else "",
        aw=dict(w=[[round(x, 5) for x in w.tolist()] for w in ws], tfs="".join("01"[b] for b in tfs.tolist()),
                noisy="".join("01"[b] for b in noisy.tolist())))


def unpack(o, report_dir=""):
    """Make o what the report reads -> (its config, {seed: {row name: run folder}}, {seed: {(name, budget): folder}})."""
    OUTCOMES.clear()
    OUTCOMES.update(o)
    runs = {int(s): {n: Path(f) for n, f in r.items()} for s, r in o["runs"].items()}
    sweeps = {int(s): {(n, m): Path(f) for n, m, f in sw} for s, sw in o["sweeps"].items()}
    return ReproduceConfig(**o["cfg"], report_dir=report_dir), runs, sweeps


def save_outcomes(o, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as z:  # mtime 0: one run, one file
        z.write(json.dumps(o, separators=(",", ":")).encode())


def load_outcomes(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def scores(folders, which="best"):
    """Per-example test scores of one model over the seeds (one run folder each): (S, N)
    0/1, and the N examples' subdomains (every seed scores the same test examples)."""
    recs = [records(f, which) for f in folders]
    return np.array([[float(x["correct"]) for x in rs] for rs in recs]), np.array([x["subdomain"] for x in recs[0]])


def accuracy(folders, sub=None, n_boot=1000):
    """A model's macro-average test accuracy over the seeds (or on one subdomain), with its 95% interval
    (n_boot resamples of the examples; where only the mean is read, a couple will do: it does not depend on them)."""
    a, g = scores(folders)
    if sub is None:
        return stats.paired_interval(a, 0 * a, groups=g, n_boot=n_boot)
    return stats.paired_interval(a[:, g == sub], 0 * a[:, g == sub], n_boot=n_boot)


def interval(r):
    return f"{r['mean']:.3f} ± {r['half']:.3f}"


def accuracy_table(runs, which):
    """Markdown: rows = models, columns = exact-match accuracy per subdomain and the macro
    average, each the mean over seeds ± the half-width of its 95% interval (stats.py)."""
    first = runs[0]
    subs = sorted({r["subdomain"] for r in records(first["teacher"])})
    rows = [f"| model | {' | '.join(subs)} | average |", "| --- |" + " --- |" * (len(subs) + 1)]
    for name in first:
        a, g = scores([r[name] for r in runs.values()], which)
        cells = [interval(stats.paired_interval(a[:, g == sub], 0 * a[:, g == sub])) for sub in subs]
        rows.append(f"| {name} | {' | '.join(cells)} | **{interval(stats.paired_interval(a, 0 * a, groups=g))}** |")
    return "\n".join(rows)


def decompositions(runs):
    """{row name: {subdomain: decomposition}} on test: scd.decompose_records(teacher, SFT
    student, that model) for each seed, each figure averaged over the seeds (nan where no
    seed has anything to recover or keep)."""
    out = {}
    for name in [n for n in runs[0] if n not in ("teacher", "SFT student")]:
        per_seed = [scd.decompose_records(records(r["teacher"]), records(r["SFT student"]), records(r[name])) for r in runs.values()]
        out[name] = {s: {k: statistics.mean(v for d in per_seed if (v := d[s][k]) == v) if any(d[s][k] == d[s][k] for d in per_seed)
                         else float("nan") for k in per_seed[0][s]} for s in per_seed[0]}
    return out


def aw_weights_by_stage(run, teacher_dir, anchor_dir):
    """AW's w_i on every training example for each stage's checkpoint, which examples are
    TFS-like (teacher's loss below the SFT student's) on train, and which carry a wrong
    label (the default domain marks them): (list of w tensors, bool mask, bool mask). On the
    run's own device and precision: at Llama scale these are K teacher passes over train."""
    disk = lambda path: json.loads(path.read_text())  # from the run folders: collect() calls this
    sched, conf = disk(run / "schedule.json"), disk(run / "config.json")
    device, _, ctx = setup_device(conf["device"], conf["dtype"])[:3]
    l_s = torch.tensor(disk(anchor_dir / "train_losses.json")["loss"])
    l_t = torch.tensor(disk(teacher_dir / "train_losses.json")["loss"])
    train = domains.load(conf["data"])["train"]
    ws, model = [], None
    for st in sched["stages"]:
        base, model = scale.adapter_base(model), None  # an adapter trail swaps adapters only
        model, tok = scale.read_teacher(teacher_dir / st["file"], device, getattr(ctx, "fast_dtype", None), base)
        enc = data.encode(train, tok, model.config.block_size)
        losses = data.example_losses(model, enc, tok.eot, device, ctx, chunk=conf.get("logit_chunk", 0))
        ws.append(scd.aw_weights(l_s, torch.tensor(losses)))
    return ws, l_t < l_s, torch.tensor([ex.get("noisy", False) for ex in train])


# -----------------------------------------------------------------------------
# the five plots

def plot_teacher(teacher_dir, path):
    m = read(teacher_dir / "manifest.json")
    steps = [c["step"] for c in m["checkpoints"]]
    best = m["checkpoints"][m["best"]]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(steps, [c["val_loss"] for c in m["checkpoints"]], "o-", ms=3, label="val loss", color="C0")
    ax.plot(steps, [c["train_loss"] for c in m["checkpoints"]], "-", lw=1, label="train loss", color="C0", alpha=0.4)
    ax.axvline(best["step"], color="k", ls=":", lw=1)
    ax.set(xlabel="teacher step (each dot is a saved checkpoint)", ylabel="loss (answer tokens)")
    ax2 = ax.twinx()
    ax2.plot(steps, [c["val_acc"] for c in m["checkpoints"]], "s-", ms=3, color="C3", label="val accuracy")
    ax2.set_ylabel("val exact match", color="C3")
    ax.set_title(f"Teacher trajectory: {len(steps)} checkpoints, best T* = step {best['step']} (dotted)")
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.86), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def teacher_numbers(r, name):
    """Run `name`'s schedule as the teacher's checkpoint numbers (positions in its manifest;
    schedule.json counts within the candidate pool): (per stage, T*, the pool's first)."""
    files = [c["file"] for c in read(r["teacher"] / "manifest.json")["checkpoints"]]
    sched = read(r[name] / "schedule.json")
    return ([files.index(s["file"]) if "file" in s else None for s in sched["stages"]],
            files.index(sched["pool"][sched["best"]]), files.index(sched["pool"][0]))


def plot_schedule(r, path):
    """Top: the path each method's student follows along the teacher's trajectory, from its start to T*.
    Below, for each adaptive method and at most 4 of its stages: both KL terms and the score per candidate."""
    names = [n for n in r if n not in ("teacher", "SFT student", "SFT, stages")]  # the methods with a teacher
    scheds = {n: read(r[n] / "schedule.json") for n in names}
    adaptive = [n for n in names if "kl_best" in scheds[n]["stages"][0]]
    K = len(scheds[names[0]]["stages"])
    shown = sorted({round(i * (K - 1) / 3) for i in range(4)}) if K > 4 else list(range(K))
    fig = plt.figure(figsize=(3 + 2.4 * len(shown), 3.2 * (1 + len(adaptive))))
    ax = fig.add_subplot(1 + len(adaptive), 1, 1)
    for i, n in enumerate(names):
        ax.plot(range(-1, K), [-1] + teacher_numbers(r, n)[0], "-", label=n, lw=2, alpha=0.8, marker="os^dvx"[i % 6],
                color=COLORS.get(n))
    _, best, first = teacher_numbers(r, names[0])
    ax.axhline(best, color="k", ls=":", lw=1)
    ax.set(xlabel="stage k (start: the student's initialisation)", ylabel="teacher checkpoint c_k (-1: start)",
           xticks=range(-1, K), xticklabels=["start"] + [str(k) for k in range(K)],
           title=f"The student's path along the teacher's trajectory (candidates {first} to "
                 f"{first + len(scheds[names[0]]['pool']) - 1}; T* = {best}, dotted)")
    ax.legend(fontsize=8, ncol=len(names))
    for j, n in enumerate(adaptive):  # the two KL terms for every candidate at the shown stages
        for col, k in enumerate(shown):
            st = scheds[n]["stages"][k]
            a = fig.add_subplot(1 + len(adaptive), len(shown), len(shown) * (j + 1) + col + 1)
            score = [x + y for x, y in zip(st["kl_best"], st["kl_student"])]
            cands = range(first, first + len(score))
            a.plot(cands, st["kl_best"], label="KL(T* || c)", color="C0")
            a.plot(cands, st["kl_student"], label="student term", color="C1")
            a.plot(cands, score, label="sum", color="k", lw=1.5)
            a.axvline(first + st["ckpt"], color="C3", ls="--", lw=1)
            a.set(title=f"{n}, stage {k}: c = {first + st['ckpt']}", xlabel="candidate checkpoint c", yscale="log",
                  ylabel="KL on the probe (nats)" if col == 0 else None)
            if col == 0:
                a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_aw(ws, tfs, path):
    fig, axes = plt.subplots(1, len(ws), figsize=(3 * len(ws), 3), sharey=True, squeeze=False)
    bins = [i / 40 for i in range(41)]
    for k, (w, a) in enumerate(zip(ws, axes[0])):
        for part, name, color in ((tfs, "TFS-like", "C0"), (~tfs, "SFS-like", "C1")):
            if part.any():
                a.hist(w[part].tolist(), bins=bins, alpha=0.6, label=f"{name} ({int(part.sum())})", color=color, density=True)
        a.set(title=f"stage {k}: mean w {w.mean():.2f}", xlabel="AW weight w_i on the KL")
    axes[0][0].set_ylabel("density (training examples)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Adaptive Weighting: w = l_S / (l_S + l_c); TFS-like = teacher's train loss below the SFT student's", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_decomposition(decs, path):
    names = list(decs)
    subs = [s for s in decs[names[0]] if s != "all"] + ["all"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for a, key, title in ((axes[0], "recovered", "TFS deficit recovered (1 = as good as the teacher on TFS)"),
                          (axes[1], "kept", "SFS advantage kept (1 = as good as the SFT student on SFS)")):
        width = 0.8 / len(names)
        for i, n in enumerate(names):
            xs, vals = [j + i * width for j in range(len(subs))], [decs[n][s][key] for s in subs]
            a.bar(xs, [0 if v != v else v for v in vals], width, label=n, color=COLORS.get(n))
            for x, v in zip(xs, vals):
                if v != v:  # nan: the subdomain has no such example, which is not a 0
                    a.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, color="0.4")
        a.axhline(0, color="k", lw=0.8)
        a.axhline(1, color="k", lw=0.8, ls=":")
        a.set(title=title, xticks=[j + 0.4 - width / 2 for j in range(len(subs))], ylabel="share (n/a: none there)")
        a.set_xticklabels(subs, fontsize=8)
        a.title.set_fontsize(9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_subdomains(runs, path):
    names = list(runs[0])
    subs = sorted({r["subdomain"] for r in records(runs[0]["teacher"])}) + ["average"]
    fig, ax = plt.subplots(figsize=(11, 3.6))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        rs = [accuracy([r[n] for r in runs.values()], None if sub == "average" else sub) for sub in subs]
        ax.bar([j + i * width for j in range(len(subs))], [r["mean"] for r in rs], width, label=n,
               yerr=[r["half"] for r in rs], capsize=2, color=COLORS.get(n))
    ax.set(ylabel="test exact match", xticks=[j + 0.4 - width / 2 for j in range(len(subs))],
           title=f"Test accuracy per subdomain (best-on-validation students; {len(runs)} seed(s); "
                 "error bars: 95% intervals over seeds and test examples)")
    ax.set_xticklabels(subs)
    ax.legend(fontsize=8, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------

PAPER = {("KD", "SFT student"): 7.2, ("CD", "KD"): 1.2, ("SCD", "CD"): 0.3, ("SCD+AW", "SCD"): 2.1, ("SCD+AW", "KD"): 3.6}


def claim_rows(runs):
    """The paper's claims as paired differences on test (best-on-validation students), each
    with its 95% interval over seeds and examples (stats.paired_interval): [(claim, result)]."""
    names = list(runs[0])
    distilled = [n for n in names if n not in ("teacher", "SFT student", "SFT, stages")]
    sc = {n: scores([r[n] for r in runs.values()]) for n in names}
    g = sc["teacher"][1]
    out = [(f"(a) {n} > SFT student", stats.paired_interval(sc[n][0], sc["SFT student"][0], groups=g)) for n in distilled]
    out += [("(a) KD > SFT in stages", stats.paired_interval(sc["KD"][0], sc["SFT, stages"][0], groups=g))]
    pairs = [("CD", "KD"), ("SCD", "CD"), ("SCD+AW", "SCD"), ("SCD+AW", "KD")]
    pairs += [(f"{b}+AW", b) for b in ("KD", "CD") if f"{b}+AW" in sc]
    out += [(f"(b) {a} > {b}", stats.paired_interval(sc[a][0], sc[b][0], groups=g)) for a, b in pairs]
    # (c) some student beats the teacher on some subdomain: every pair, at a Bonferroni-corrected level
    subs = sorted(set(g))
    level = 1 - 0.05 / (len(distilled) * len(subs))
    cands = [(n, s, stats.paired_interval(sc[n][0][:, g == s], sc["teacher"][0][:, g == s], level=level))
             for n in distilled for s in subs]
    n, s, r = max(cands, key=lambda c: c[2]["lo"])
    out.append((f"(c) a student beats the teacher on a subdomain (best pair: {n} on {s}; "
                f"{100 * level:.2f}% interval, corrected for {len(cands)} pairs)", r))
    # (d) the SFS/TFS readings: AW keeps what the SFT student does better; the schedule recovers the teacher's lead
    t, sft = sc["teacher"][0], sc["SFT student"][0]
    sfs, tfs = (sft > t), (t > sft)
    for b in ("KD", "CD", "SCD"):
        if f"{b}+AW" in sc:
            out.append((f"(d) on SFS examples, {b}+AW > {b} (AW keeps the SFS advantage)",
                        stats.paired_interval(sc[f"{b}+AW"][0], sc[b][0], subset=sfs)))
    for a, b in (("SCD", "KD"), ("SCD", "CD"), ("SCD+AW", "KD")):
        out.append((f"(d) on TFS examples, {a} > {b} (the schedule recovers more of the deficit)",
                    stats.paired_interval(sc[a][0], sc[b][0], subset=tfs)))
    return out


def criterion_table(runs):
    """Markdown: what the adaptive schedule saw at each stage, per seed: the range over the
    candidates of each term and of their sum, the sum's margin between the chosen checkpoint
    and the runner-up, and how many probes drawn with other seeds chose the same checkpoint
    (a choice that flips with the probe is a choice among near-equals)."""
    out = ["| run | seed | stage | chosen | KL(T* ‖ c) range | student term range | score range | margin to runner-up | "
           "resampled probes that agree |", "|" + " --- |" * 9]
    agree = total = 0
    for n in [n for n in runs[0] if n.startswith("SCD")]:
        for seed, r in runs.items():
            for st in read(r[n] / "schedule.json")["stages"]:
                score = sorted(a + b for a, b in zip(st["kl_best"], st["kl_student"]))
                rng = lambda v: f"{min(v):.3f} to {max(v):.3f}"
                same = sum(k == st["ckpt"] for k in st.get("resampled", []))
                agree, total = agree + same, total + len(st.get("resampled", []))
                out.append(f"| {n} | {seed} | {st['stage']} | {teacher_numbers(r, n)[0][st['stage']]} | {rng(st['kl_best'])} | "
                           f"{rng(st['kl_student'])} | {rng(score)} | {score[1] - score[0] if len(score) > 1 else 0:.4f} | "
                           f"{same} of {len(st.get('resampled', []))} |")
    return (f"Over all stages and seeds, a resampled probe chose the run's checkpoint {agree} times of {total}.\n\n"
            if total else "") + "\n".join(out)


def reach(runs):
    """Does the adaptive schedule arrive at T*? Per adaptive method and seed: the candidate chosen
    at each stage (0 = the pool's first, T* the last), how many candidates the last stage stopped
    short of T*, and the run's test accuracy (macro average, best-on-validation student).
    -> {method: [dict(seed, picks, short, acc)]}."""
    out = {}
    for n in [n for n in runs[0] if n.startswith("SCD")]:
        out[n] = []
        for seed, r in runs.items():
            sched = read(r[n] / "schedule.json")
            picks = [st["ckpt"] for st in sched["stages"]]
            out[n].append(dict(seed=seed, picks=picks, short=sched["best"] - picks[-1], acc=accuracy([r[n]], n_boot=2)["mean"]))
    return out


def term_scales(runs):
    """Per adaptive method and stage, over seeds: each term's mean spread across the candidates
    (max - min: what the choice weighs), and how often the student term is smallest at the
    candidate the previous stage chose (the student has just been trained on it)."""
    rows = ["| run | stage | KL(T* ‖ c): spread across candidates | student term: spread | student term smallest at the "
            "previous stage's choice |", "| --- | --- | --- | --- | --- |"]
    for n in [n for n in runs[0] if n.startswith("SCD")]:
        stages = [read(r[n] / "schedule.json")["stages"] for r in runs.values()]
        for k in range(len(stages[0])):
            sb = np.mean([max(s[k]["kl_best"]) - min(s[k]["kl_best"]) for s in stages])
            ss = np.mean([max(s[k]["kl_student"]) - min(s[k]["kl_student"]) for s in stages])
            prev = ("-" if k == 0 else
                    f"{sum(int(np.argmin(s[k]['kl_student'])) == s[k - 1]['ckpt'] for s in stages)} of {len(stages)}")
            rows.append(f"| {n} | {k} | {sb:.3f} | {ss:.3f} | {prev} |")
    return "\n".join(rows)


def reach_section(runs):
    """Markdown: whether the schedule arrives at T*, per seed, with what it costs on test."""
    got, lines = reach(runs), []
    for n, rows in got.items():
        short = [x["short"] for x in rows]
        acc = lambda c: np.mean([x["acc"] for x in rows if x["short"] == c])
        lines.append(f"- {n}'s last stage chose T* on {short.count(0)} of {len(rows)} seeds"
                     + "".join(f", {c} candidate{'s' if c > 1 else ''} short of it on {short.count(c)}"
                               for c in sorted(set(short) - {0})) + ". Mean test exact match by where the last stage ended: "
                     + ", ".join(f"{'at T*' if c == 0 else f'{c} short'} {acc(c):.3f} ({short.count(c)} runs)"
                                 for c in sorted(set(short))) + ".")
    seeds = [x["seed"] for x in next(iter(got.values()))]
    head = "| seed | " + " | ".join(f"{n}: candidate per stage | {n}: short of T* | {n}: test" for n in got) + " |"
    table = [head, "|" + " --- |" * (1 + 3 * len(got))]
    for i, s in enumerate(seeds):
        table.append(f"| {s} | " + " | ".join(f"{' -> '.join(map(str, rows[i]['picks']))} | {rows[i]['short']} | {rows[i]['acc']:.3f}"
                                              for rows in got.values()) + " |")
    return "\n".join(lines + ["", "Candidates are numbered in the pool (0: its first, T* its last).", ""] + table
                     + ["", term_scales(runs)])


def plot_reach(runs, path):
    """Left: where each seed's last stage ended, in candidates short of T*. Right: each run's test
    exact match against it."""
    got = reach(runs)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    for i, (n, rows) in enumerate(got.items()):
        x = [r["seed"] + 0.15 * i for r in rows]
        a.plot(x, [r["short"] for r in rows], "o^"[i % 2], label=n, color=COLORS.get(n))
        b.plot([r["short"] + 0.08 * i for r in rows], [r["acc"] for r in rows], "o^"[i % 2], label=n, color=COLORS.get(n), alpha=0.7)
    a.set(xlabel="seed", ylabel="candidates short of T* (last stage)", title="Does the schedule reach T*? (0: yes)")
    b.set(xlabel="candidates short of T* (last stage)", ylabel="test exact match (macro)", title="What stopping short costs")
    a.legend(fontsize=8), b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def preconditions(runs, decs):
    """Markdown: what a comparison of the paper's claims needs, each met or not, with its figure."""
    sc = {n: scores([r[n] for r in runs.values()])[0] for n in ("teacher", "SFT student", "SFT, stages", "KD")}
    g = scores([runs[0]["teacher"]])[1]
    diff = lambda a, b: stats.paired_interval(sc[a], sc[b], groups=g)
    fmt = lambda r: f"{100 * r['mean']:+.1f} [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}]"
    rows = ["| precondition | figure | met |", "| --- | --- | --- |"]
    x2 = {s: r["teacher"].with_name("teacher_x2") for s, r in runs.items()}  # --converge true made these
    x2 = {s: f for s, f in x2.items() if ran(f, "teacher")}
    if x2:
        best = lambda f: min(c["val_loss"] for c in read(f / "manifest.json")["checkpoints"])
        gains = {s: 1 - best(f) / best(runs[s]["teacher"]) for s, f in x2.items()}  # > 0: the longer run is better
        met = "no" if max(gains.values()) >= 0.02 else "yes" if len(x2) == len(runs) else "yes where measured"
        v, mean = list(gains.values()), ""
        if len(v) > 1:  # the mean gain over the seeds measured, with its 95% interval (Student's t)
            m, half = statistics.mean(v), stats.t_quantile(0.975, len(v) - 1) * statistics.stdev(v) / math.sqrt(len(v))
            mean = f"; mean {100 * m:+.1f}% [{100 * (m - half):+.1f}, {100 * (m + half):+.1f}]"
            met += "; the mean's interval lies below +2%" if m + half < 0.02 and met != "no" else ""
        rows.append("| teacher converged: twice its steps lower its best validation loss by < 2%, every seed | "
                    + ", ".join(f"seed {s} {100 * g:+.1f}%" for s, g in gains.items()) + mean
                    + ("" if len(x2) == len(runs) else f" (measured on {len(x2)} of {len(runs)} seeds)") + f" | {met} |")
    else:
        rows.append("| teacher converged | not measured (--converge true) | – |")
    for a, b, need in (("teacher", "SFT student", 0.08), ("KD", "SFT student", 0.03), ("KD", "SFT, stages", 0.0)):
        r = diff(a, b)  # with one seed the interval cannot see run noise: no call
        rows.append(f"| {a} − {b} ≥ {100 * need:.0f} points, interval above 0 | {fmt(r)} | "
                    + ("– (one seed)" if r["S"] < 2 else "yes" if r["mean"] >= need and r["lo"] > 0 else "no") + " |")
    pools = [len(read(r["KD"] / "schedule.json")["pool"]) for r in runs.values()]
    rows.append(f"| the path to T* holds at least 2 candidates (with one, CD and SCD are KD; the remedy: denser checkpoints "
                f"before T* or a gentler teacher recipe) | {min(pools)} to {max(pools)} candidates per seed | "
                f"{'yes' if min(pools) >= 2 else 'no'} |")
    sfs = {s: d["p_sfs"] for s, d in decs[next(iter(decs))].items() if s != "all"}
    top = max(sfs, key=sfs.get)
    rows.append(f"| an SFS share ≥ 5% on some subdomain | {100 * sfs[top]:.1f}% on {top} | {'yes' if sfs[top] >= 0.05 else 'no'} |")
    return "\n".join(rows)


def bases_table(cfg, splits):
    """Markdown: the committed bases on the domain's test split before any SFT, as the paper reports its bases."""
    rows = ["| base | parameters | test exact match (macro) | test loss (answer tokens) |", "| --- | --- | --- | --- |"]
    device, _, ctx = setup_device(cfg.device, cfg.dtype)[:3]  # the run's device and precision
    for preset in (cfg.teacher, cfg.student):
        model, tok = load_checkpoint(base_file(preset, cfg.data, splits), device)
        summary = data.evaluate(model, splits["test"], tok, device, ctx=ctx)[0]
        rows.append(f"| {preset} | {model.num_params() / 1e6:.3f}M | {summary['acc']:.3f} | {summary['loss']:.3f} |")
    return "\n".join(rows)


def stage0_terms(runs):
    """The student term at stage 0 (the student is its start) to the teacher's first and last checkpoint, per seed."""
    out = []
    for r in runs.values():
        st = read(r["SCD"] / "schedule.json")["stages"][0]
        out.append((st["kl_student"][0], st["kl_student"][-1]))
    return out


def protocol_table(runs, suffix):
    """Markdown: best validation accuracy over the stages (what picks the reported student), mean over seeds,
    of each method under this run's protocol and the other one's folders (suffix), where those exist."""
    rows = ["| method | this protocol | the other | difference |", "| --- | --- | --- | --- |"]
    for n in [n for n in runs[0] if n not in ("teacher", "SFT student")]:
        folders = [(r[n], r[n].with_name(r[n].name.removesuffix("_k4") + suffix)) for r in runs.values()]
        if not all(has(f / "results.json") for pair in folders for f in pair):
            continue
        a, b = ([max(read(f / "results.json")["val_acc"]) for f in fs] for fs in zip(*folders))
        rows.append(f"| {n} | {statistics.mean(a):.3f} | {statistics.mean(b):.3f} | "
                    f"{100 * (statistics.mean(a) - statistics.mean(b)):+.1f} (per seed "
                    + ", ".join(f"{100 * (x - y):+.1f}" for x, y in zip(a, b)) + ") |")
    return "\n".join(rows) if len(rows) > 2 else ""


def regime_table(runs, other):
    """Markdown: each model's test accuracy in this run and in the run with the other --base (same seeds and test
    examples), with the difference's 95% interval, and what the schedule's criterion saw in each."""
    seeds = [s for s in runs if all(ran(f, n) for n, f in other[s].items())]  # the seeds both runs have
    runs, other = {s: runs[s] for s in seeds}, {s: other[s] for s in seeds}
    rows = [f"Seeds {', '.join(map(str, seeds))} of both runs, paired by seed.", "",
            "| model | this run | the other --base | difference (points) |", "| --- | --- | --- | --- |"]
    for n in runs[seeds[0]]:
        a, g = scores([r[n] for r in runs.values()])
        b, _ = scores([other[s][n] for s in runs])
        d = stats.paired_interval(a, b, groups=g)
        rows.append(f"| {n} | {interval(accuracy([r[n] for r in runs.values()]))} | {interval(accuracy([other[s][n] for s in runs]))} "
                    f"| {100 * d['mean']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] |")
    for label, rs in (("this run", runs), ("the other --base", other)):
        ranges = [max(v) - min(v) for r in rs.values() for st in read(r["SCD"] / "schedule.json")["stages"]
                  for v in [[a + b for a, b in zip(st["kl_best"], st["kl_student"])]]]
        terms = stage0_terms(rs)
        rows.append(f"\nSCD's criterion, {label}: the score's range across candidates is {min(ranges):.3f} to "
                    f"{max(ranges):.3f} nats over stages and seeds; at stage 0 the student term to the first / last "
                    "candidate is " + ", ".join(f"{x:.2f} / {y:.2f}" for x, y in terms) + " (per seed).")
    return "\n".join(rows)


PRIMARY = "(b) SCD+AW > KD"
DECLARATION = (
    "**The primary comparison, declared before the runs:** SCD+AW against KD (the paper's headline, +3.6 points), on "
    "the macro-averaged test exact match of the best-on-validation students, at 95%. Every other row is secondary: "
    "its raw 95% interval, and a verdict corrected by Holm's method within its family: the whole-domain claims (a) and "
    "(b) other than the primary are one family, the subdomain and subset claims (c) and (d) another ((c)'s p-value is "
    "first multiplied by the pairs it was chosen from). *Holds* / *does not hold*: resolved above / below 0; "
    "*inconclusive*: not resolved either way, which is not evidence of no effect; a resolved interval that excludes the "
    "paper's effect says so. A report of fewer than two seeds gives no verdicts: one training run per model shows "
    "the test examples' noise but not the runs'.")


def claim_verdicts(rows):
    """The verdict of every claim row: the primary's from its own interval, the secondary
    ones Holm-corrected within their family; none with fewer than two seeds. -> (p-values, verdicts)."""
    p, resolved = stats.claim_p_values(rows, PRIMARY)
    verdicts = []
    for i, (claim, r) in enumerate(rows):
        paper = paper_effect(claim)
        verdicts.append("no verdict (one seed)" if r["S"] < 2 else stats.verdict(r, resolved.get(i), paper))
    return p, verdicts


def paper_effect(claim):
    """The paper's effect (a fraction) for a whole-domain claim row 'X > Y', or None."""
    key = tuple(claim.split(") ", 1)[1].split(" > ")) if " > " in claim and "on " not in claim else None
    return PAPER[key] / 100 if key in PAPER else None


def claims_table(rows):
    p, verdicts = claim_verdicts(rows)
    out = ["| claim | role | paper | mean difference | 95% interval (raw) | from seeds / examples (se) | p | verdict | per seed |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (claim, r), pv, v in zip(rows, p, verdicts):
        paper = "" if paper_effect(claim) is None else f"{100 * paper_effect(claim):+.1f}"
        out.append(f"| {claim} | {'**primary**' if claim == PRIMARY else 'secondary'} | {paper} | {100 * r['mean']:+.1f} | "
                   f"[{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}] | {100 * r['se_seeds']:.2f} / {100 * r['se_examples']:.2f} | "
                   f"{pv:.3f} | {v} | " + ", ".join(f"{100 * x:+.1f}" for x in r["per_seed"]) + " |")
    return "\n".join(out)


def resolution(rows, n_test):
    """What the comparison can resolve: the half-widths, and what each source of noise adds."""
    r = dict(rows)[PRIMARY]
    halves = [x["half"] for c, x in rows if c.startswith(("(a)", "(b)"))]
    need = stats.seeds_needed(r, 0.015)
    return (f"{n_test} test examples, {r['S']} seed(s). The intervals of the whole-domain claims have half-widths "
            f"{100 * min(halves):.1f} to {100 * max(halves):.1f} points; for SCD+AW − KD it is **{100 * r['half']:.1f} points** "
            f"(target 1.5), the smallest difference this report could call. The paper's effects: KD − SFT +7.2, CD − KD "
            f"+1.2, SCD − CD +0.3, SCD+AW − SCD +2.1, SCD+AW − KD +3.6 points. The standard error of SCD+AW − KD splits into "
            f"{100 * r['se_seeds']:.2f} points from the seeds (which training run made the students; it shrinks as 1/sqrt(seeds)) "
            f"and {100 * r['se_examples']:.2f} from the test examples (which were drawn; a larger test set shrinks only this). "
            + ("With one seed the seeds' part cannot be seen (it shows as 0.00): no claim gets a verdict." if r["S"] < 2 else
               "At this seed noise, a half-width of 1.5 points would take "
               + (f"{need} seeds (Student's t)." if need < math.inf else "more seeds than any number: the test set alone is too noisy.")))


def budget_accuracy(runs, sweeps, name, m):
    return accuracy([r[name] if m == 1 else sweeps[seed][name, m] for seed, r in runs.items()])


def plot_budget(runs, sweeps, budgets, path):
    """Student test accuracy against training budget, SFT and KD, with the teacher as a line."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name in ("SFT student", "KD"):
        pts = [budget_accuracy(runs, sweeps, name, m) for m in budgets]
        ax.errorbar(budgets, [p["mean"] for p in pts], [p["half"] for p in pts], marker="o", capsize=3, label=name,
                    color=COLORS[name])
    ax.axhline(accuracy([r["teacher"] for r in runs.values()])["mean"], color=COLORS["teacher"], ls="--", label="teacher")
    ax.set_xscale("log", base=2)
    ax.minorticks_off()
    ax.set(xticks=budgets, xticklabels=[f"{m}x" for m in budgets], xlabel="student training budget (steps, x the default)",
           ylabel="test exact match", title=f"Does more training close the gap? ({len(runs)} seed(s), 95% intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(o, report_dir):
    """results.md and the plots in report_dir, from the outcomes o (collect() or load_outcomes()) alone."""
    cfg, runs, sweeps = unpack(o, report_dir)
    wall, command = o["wall"], o["command"]
    rep = Path(report_dir)
    rep.mkdir(parents=True, exist_ok=True)
    r0 = runs[0]
    plots = ["teacher", "schedule", "aw_weights", "decomposition", "subdomains"]
    plot_teacher(r0["teacher"], rep / "teacher.png")
    plot_schedule(r0, rep / "schedule.png")
    ws = [torch.tensor(w) for w in o["aw"]["w"]]
    tfs, noisy = (torch.tensor([b == "1" for b in o["aw"][k]]) for k in ("tfs", "noisy"))
    plot_aw(ws, tfs, rep / "aw_weights.png")
    decs = decompositions(runs)
    plot_decomposition(decs, rep / "decomposition.png")
    plot_subdomains(runs, rep / "subdomains.png")
    if "SCD" in r0:
        plot_reach(runs, rep / "reach.png")
        plots.append("reach")
    budgets = [1] + sorted({m for sw in sweeps.values() for n, m in sw if n == "KD"})
    if len(budgets) > 1:
        plot_budget(runs, sweeps, budgets, rep / "budget.png")
        plots.append("budget")

    names = [n for n in r0 if n not in ("teacher", "SFT student")]
    rows = claim_rows(runs)
    stages, steps, pool, _ = o["protocol"]
    sched = {n: [" -> ".join(str("-" if c is None else c) for c in teacher_numbers(r, n)[0]) for r in runs.values()] for n in names}
    lines = [f"# Results: `{command}`", "",
             f"Seeds: {cfg.seeds}; every figure is the mean over seeds ± the half-width of its 95% interval over seeds "
             "and test examples (stats.py says how). One teacher per seed; seeds vary "
             + ("the data order, dropout and the probe, never the bases" if cfg.base == "pretrained" or cfg.student_from else
                "the models' initialisation, the data order, dropout and the probe") + f". Data: {cfg.data}. "
             f"Machine: {o['machine']}. "
             f"Wall time of the phases, as each run recorded it: {sum(wall.values()) / 60:.1f} min. "
             "Every choice was made on validation; this report is the test split."
             + (" **One seed: one sample of each model.** Its intervals see the test examples only, not the run-to-run "
                "noise, and its claims get no verdict." if cfg.seeds == 1 else ""), "",
             f"Regime: {regime(cfg)}; "
             f"protocol {cfg.protocol}: {stages} stages of {steps} steps, candidates from {pool:.0%} of the way to T* up to T*.", ""]
    if cfg.base == "pretrained":
        lines += ["## The bases before SFT", "", o["bases"], ""]
    lines += ["## Test exact match, best-on-validation students", "", accuracy_table(runs, "best"), "",
             "## Test exact match, final students", "", "The teacher and the SFT student have one model on test, their "
             "checkpoint of lowest validation loss, in both tables.", "", accuracy_table(runs, "final"), "",
             "## Preconditions of the comparison", "", preconditions(runs, decs), "",
             "## The paper's claims, test", "", DECLARATION, "", "Each row: the paired difference in macro-average exact match "
             "(points), on the same test examples for every seed.", "", claims_table(rows), "",
             "## What this comparison can resolve", "", resolution(rows, len(records(r0["teacher"]))), "",
             "## AW's weight per stage (SCD+AW, seed 0, training examples)", "",
             "Mean w on TFS-like / SFS-like examples: " + ", ".join(f"stage {k} {w[tfs].mean():.2f} / {w[~tfs].mean():.2f}"
                                                                    for k, w in enumerate(ws)) + "."
             + ("" if not noisy.any() else " Mean w on mislabelled / correctly labelled examples: "
                + ", ".join(f"stage {k} {w[noisy].mean():.2f} / {w[~noisy].mean():.2f}" for k, w in enumerate(ws)) + "."), "",
             f"## Why a student beats its teacher (METHOD.md section 1), test, mean over {len(runs)} seed(s)", "",
             "TFS deficit recovered (1 = the student matches the teacher where the teacher beat the SFT "
             "student) and SFS advantage kept (1 = it matches the SFT student where that beat the teacher); "
             "– where there is nothing to recover or keep.", "",
             "| model | " + " | ".join(s for s in decs[names[0]]) + " |", "| --- |" + " --- |" * len(decs[names[0]])]
    fmt = lambda v: "–" if v != v else f"{v:.2f}"  # nan: nothing to recover (or keep) there
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{fmt(d['recovered'])} / {fmt(d['kept'])}" for d in decs[n].values()) + " |")
    lines += ["", "Teacher vs SFT student, share of test examples per subdomain (TFS / SFS): "
              + ", ".join(f"{s} {d['p_tfs']:.3f} / {d['p_sfs']:.3f}" for s, d in decs[names[0]].items()) + ".", ""]
    if len(budgets) > 1:
        lines += ["## Student budget, test exact match (best-on-validation)", "", "| model | " + " | ".join(f"{m}x" for m in budgets)
                  + " |", "| --- |" + " --- |" * len(budgets)]
        for name in ("SFT student", "KD"):
            cells = [interval(budget_accuracy(runs, sweeps, name, m)) for m in budgets]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Does the adaptive schedule reach T*?", "", reach_section(runs), ""]
    lines += ["## What the adaptive schedule saw (nats on the probe, per stage)", "",
              "At stage 0 the student is its start" + (" (the student base)" if cfg.base == "pretrained" or cfg.student_from else " (a random init)")
              + "; its term to the teacher's first / last candidate: " + ", ".join(f"{x:.2f} / {y:.2f}" for x, y in stage0_terms(runs))
              + " nats (per seed).", "", criterion_table(runs), ""]
    other_suffix = "_k4" if cfg.protocol == "paper" else ""
    if table := protocol_table(runs, other_suffix):
        lines += [f"## The two stage protocols, validation (this run: {cfg.protocol}; the other: "
                  f"{'k4' if cfg.protocol == 'paper' else 'paper'})", "", table, ""]
    if cfg.compare_to:
        other = {s: {n: Path(cfg.compare_to) / f"seed{s}" / p.name for n, p in r.items()} for s, r in runs.items()}
        lines += ["## What pretraining changes (this run vs --compare_to " + cfg.compare_to + ")", "", regime_table(runs, other), ""]
    lines += ["## Schedules (the teacher's checkpoint chosen per stage, per seed; T* = "
              + ", ".join(str(teacher_numbers(r, "KD")[1]) for r in runs.values()) + ")", ""]
    lines += [f"- {n}: " + "; ".join(sched[n]) for n in names]
    lines += ["", "## Wall time per phase, summed over seeds (each run records its own)", "", "| phase | seconds |", "| --- | --- |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in wall.items()]
    lines += ["", "## Plots", ""] + [f"![{p}]({p}.png)" for p in plots]
    (rep / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return rep / "results.md"


def regime(cfg):
    """Where teacher and students start, and what they train, in words."""
    lora = lambda r: f" with rank-{r} adapters" if r else ""
    if cfg.teacher_from or cfg.student_from:
        return (f"the teacher fine-tuned from {cfg.teacher_from or cfg.teacher}{lora(cfg.teacher_lora)}, the students from "
                f"{cfg.student_from or cfg.student}{lora(cfg.student_lora)}")
    return ("the committed pretrained bases, fine-tuned (one pair of bases serves every seed)" if cfg.base == "pretrained"
            else "random init (--base none)") + lora(cfg.student_lora)


def main(cfg, command="python reproduce.py"):
    t = time.time()
    if cfg.outcomes:  # no training: the report again, from the outcomes file alone
        o = load_outcomes(cfg.outcomes)
        if cfg.converge:  # but first the longer teachers of the first --seeds seeds, added to the file
            save_outcomes(add_converge(o, cfg.seeds), Path(cfg.outcomes))
        path = report(o, cfg.report_dir)
        print(f"{path} remade from {cfg.outcomes}")
        return path
    runs, sweeps, wall, reused = run_all(cfg)
    save_outcomes(collect(cfg, runs, sweeps, wall, command), Path(cfg.report_dir) / "outcomes.json.gz")
    path = report(load_outcomes(Path(cfg.report_dir) / "outcomes.json.gz"), cfg.report_dir)  # what anyone can remake
    print("\n" + path.read_text(encoding="utf-8").split("## Schedules")[0])
    print("wall time per phase, as each run recorded it: " + ", ".join(f"{k} {v:.0f}s" for k, v in wall.items())
          + f"; this command took {time.time() - t:.0f}s" + (f" ({reused} finished phases reused)" if reused else ""))
    return path


def cli():
    import sys
    cfg = parse_config(ReproduceConfig, "The paper's comparison in one command: teacher, SFT student, distilled students, report.")
    run_main(lambda c: main(c, "python " + " ".join(sys.argv)), cfg)


if __name__ == "__main__":
    cli()
