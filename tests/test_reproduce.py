import json
import math
import runpy
from pathlib import Path

import numpy as np
import torch
import pytest

import data
from lab import bench
from lab import gpu_check
from lab import reproduce, stats

ROOT = Path(__file__).resolve().parent.parent


def half(tiny_domain, tmp_path):
    """The tiny domain with half its training examples (48: 3 steps an epoch), the same 24 of
    validation and of test: the one command's many phases in half the steps."""
    dom = tmp_path / "dom"
    dom.mkdir()
    for split in ("train", "val", "test"):
        lines = (tiny_domain / f"{split}.jsonl").read_text().splitlines(keepends=True)
        (dom / f"{split}.jsonl").write_text("".join(lines[:48] if split == "train" else lines))
    return dom


def test_one_command_writes_the_report_and_reuses_finished_phases(tiny_domain, tmp_path, capsys, monkeypatch):
    scored, real_main, real_logprobs = [], reproduce.distill.main, data.probe_logprobs

    def main(c, *rest):  # a distillation of the one command scores no probe: the teacher stored every one it asks for
        monkeypatch.setattr(data, "probe_logprobs", lambda *a, **k: scored.append(c.out_dir) or real_logprobs(*a, **k))
        try:
            return real_main(c, *rest)
        finally:
            monkeypatch.setattr(data, "probe_logprobs", real_logprobs)
    monkeypatch.setattr(reproduce.distill, "main", main)
    cfg = reproduce.ReproduceConfig(data=str(half(tiny_domain, tmp_path)), out_dir=str(tmp_path / "runs"), report_dir=str(tmp_path / "rep"),
                                    seeds=2, teacher_epochs=2, ckpt_per_epoch=1, stage_epochs=1, protocol="paper", probe_size=16, budgets="1,2", base="none")
    path = reproduce.main(cfg)
    text = path.read_text()
    assert scored == [] and len(list((tmp_path / "runs" / "seed0" / "teacher").glob("probe_*.pt"))) == 4
    for row in ("teacher", "SFT student", "SFT, stages", "KD", "CD", "SCD", "SCD+AW"):
        assert f"| {row} |" in text
    for png in ("teacher", "schedule", "aw_weights", "decomposition", "subdomains", "budget"):
        assert (tmp_path / "rep" / f"{png}.png").stat().st_size > 10_000
    # the table's teacher average is the mean over seeds of what each teacher run measured on test
    accs = [json.loads((tmp_path / "runs" / f"seed{s}" / "teacher" / "manifest.json").read_text())["test"]["acc"]
            for s in (0, 1)]
    row = next(line for line in text.splitlines() if line.startswith("| teacher |"))
    assert row.split("**")[1].startswith(f"{(accs[0] + accs[1]) / 2:.3f} ± ")
    # a claim row carries each seed's difference (points), its interval, and the verdict that follows from it
    kd = [json.loads((tmp_path / "runs" / f"seed{s}" / "kd" / "results.json").read_text())["best"]["acc"] for s in (0, 1)]
    sft = [json.loads((tmp_path / "runs" / f"seed{s}" / "student_sft" / "manifest.json").read_text())["test"]["acc"] for s in (0, 1)]
    claim = next(line for line in text.splitlines() if line.startswith("| (a) KD > SFT student |")).split(" | ")
    assert claim[-1] == f"{100 * (kd[0] - sft[0]):+.1f}, {100 * (kd[1] - sft[1]):+.1f} |"
    lo, hi = (float(x) for x in claim[4].strip("[]").split(", "))
    # a secondary claim's verdict is Holm's over its family (every (a) and (b) row but the primary), by hand here
    family = [line.split(" | ") for line in text.splitlines() if line.startswith(("| (a)", "| (b)")) and "primary" not in line]
    p = sorted(float(r[6]) for r in family)
    cut = next((j for j, x in enumerate(p) if x > 0.05 / (len(p) - j)), len(p))  # the first that fails Holm's step
    if float(claim[6]) <= (p[cut - 1] if cut else -1):
        assert claim[7].startswith("holds" if lo > 0 else "does not hold")
    else:
        assert float(claim[7].split("± ")[1].split()[0]) == pytest.approx((hi - lo) / 2, abs=0.11)
    assert "inconclusive" in claim[7] or "holds" in claim[7]
    assert "declared before the runs" in text and "| (b) SCD+AW > KD | **primary** |" in text
    # each distilled student got the SFT student's steps: one stage of 1 epoch (48 // 16 = 3 steps) per teacher
    # checkpoint (2), every checkpoint a candidate, and each phase
    # its own seed's teacher and anchor, the students' LR, and the method its row names
    conf = lambda s, d: json.loads((tmp_path / "runs" / f"seed{s}" / d / "config.json").read_text())
    assert (conf(0, "kd")["steps_per_stage"], conf(0, "kd")["stages"], conf(0, "scd")["pool_start"]) == (3, 2, 0.0)
    for s in (0, 1):
        assert conf(s, "teacher")["lr"] == cfg.teacher_lr and conf(s, "teacher")["seed"] == s
        assert conf(s, "student_sft")["lr"] == cfg.student_lr and conf(s, "student_sft")["preset"] == cfg.student
        for d, method, aw in (("sft_stages", "sft", False), ("kd", "kd", False), ("cd", "cd", False), ("scd", "scd", False),
                              ("scd_aw", "scd", True)):
            c = conf(s, d)
            assert (c["method"], c["aw"], c["seed"], c["lr"]) == (method, aw, s, cfg.student_lr)
            assert c["teacher_dir"].endswith(f"seed{s}/teacher") and c["anchor_dir"].endswith(f"seed{s}/student_sft")
    assert "finished phases reused" not in capsys.readouterr().out
    for plot in [name for name in vars(reproduce) if name.startswith("plot_")]:  # checked above; not drawn again below
        monkeypatch.setattr(reproduce, plot, lambda *a, **k: None)
    reproduce.main(cfg)  # everything finished: every phase of both seeds is reused
    out = capsys.readouterr().out
    assert out.count("finished: nothing to do") == 2 * 9 and "(18 finished phases reused)" in out
    assert path.read_text() == text  # the same report, wall times included (each run keeps its own)
    # the outcomes file alone remakes it: no run folder is read (they are gone), nothing is trained
    (tmp_path / "runs").rename(tmp_path / "gone")
    again = reproduce.main(reproduce.ReproduceConfig(outcomes=str(tmp_path / "rep" / "outcomes.json.gz")))
    assert again == tmp_path / "rep" / "recomputed" / "results.md" and again.read_text() == text
    (tmp_path / "gone").rename(tmp_path / "runs")
    assert "| teacher converged | not measured (--converge true) | – |" in text and "| KD − SFT student ≥ 3 points" in text
    # the convergence precondition, measured after the grid: seed 0's teacher for twice its epochs joins the file
    rec = reproduce.main(reproduce.ReproduceConfig(outcomes=str(tmp_path / "rep" / "outcomes.json.gz"), converge=True, seeds=1))
    assert conf(0, "teacher_x2")["epochs"] == 2 * cfg.teacher_epochs and conf(0, "teacher_x2")["seed"] == 0
    best = lambda d: min(c["val_loss"] for c in json.loads((tmp_path / "runs" / "seed0" / d / "manifest.json").read_text())["checkpoints"])
    gain = 1 - best("teacher_x2") / best("teacher")
    assert f"| seed 0 {100 * gain:+.1f}% (measured on 1 of 2 seeds) | {'no' if gain >= 0.02 else 'yes where measured'} |" \
        in rec.read_text()
    assert "teacher x2" in reproduce.load_outcomes(tmp_path / "rep" / "outcomes.json.gz")["wall"]
    others = lambda t: [line for line in t.splitlines() if line.startswith(("| teacher − SFT", "| KD − SFT"))]
    assert len(others(text)) == 3 and others(rec.read_text()) == others(text)  # the other preconditions stay as they were
    # the regime comparison, on a run compared with itself: every difference exactly 0, every criterion line twice
    cfg.compare_to = cfg.out_dir
    same = reproduce.main(cfg).read_text().split("## What pretraining changes")[1]
    assert same.count("| +0.0 [+0.0, +0.0] |") == 7  # every model of the accuracy table
    lines = [line.split(": ", 1)[1] for line in same.splitlines() if line.startswith("SCD's criterion")]
    assert len(lines) == 2 and lines[0] == lines[1]


def test_gpu_check_runs_on_cpu_at_small_shapes(tiny_domain, tmp_path, monkeypatch):
    """Every row of the GPU check at small shapes on the CPU, written as soon as measured; a row
    that runs out of memory (here the adapters' steps, made to) says so and the next rows run;
    the resume on the run's device is bit for bit on the CPU; every phase of the three runs."""
    measure = bench.measure

    def oom_for_adapters(c):
        if c.lora_rank:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (made by the test)")
        return measure(c)
    monkeypatch.setattr(bench, "measure", oom_for_adapters)
    summary = gpu_check.main(gpu_check.GpuCheckConfig(out_dir=str(tmp_path), small=True, data=str(tiny_domain), device="cpu"))
    rows = summary["rows"]
    kinds = [r["kind"] for r in rows]
    assert kinds == ["headroom"] + ["steps"] * 3 + ["phases", "half teacher", "runs", "folder"]
    folder = rows[7]
    assert folder["tok_bos"] == [0] and folder["every_prompt_starts_with_bos"] and "model.safetensors" in folder["exported"]
    assert 0 < rows[0]["usable_gib"] < rows[0]["free_gib"]
    assert [json.loads(line)["kind"] for line in open(tmp_path / "rows.jsonl")] == kinds
    steps = rows[1:4]
    assert [(r["dtype"], r["lora_rank"]) for r in steps] == [("bfloat16", 0), ("float16", 0), ("bfloat16", 4)]
    assert "out of memory" in steps[2]["error"] and all(r["distill_ms"] > 0 and r["peak_mem_GiB"] > 0 for r in steps[:2])
    assert len(rows[4]["phases"]) == 22 and rows[4]["lora_rank"] == 16 and rows[4]["grad_ckpt"]
    runs = rows[6]
    assert runs["max_weight_diff"] == 0 and runs["test_acc_whole"] == runs["test_acc_resumed"] and runs["probe_rescored"] == 0
    assert runs["resume_within_tolerance"]
    assert isinstance(runs["fp16_skipped"], int) and 0 <= runs["fp16_skipped"] < runs["steps"]
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| teacher -> student | bfloat16 | LoRA r4 | out of memory" in md and "distillation: stage switch" in md


def test_bench_prints_medians_and_spread(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["lab.bench", "--steps", "2", "--rounds", "3"])  # its own entry point, in this process
    runpy.run_path(str(ROOT / "lab" / "bench.py"), run_name="__main__")
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-2])  # the JSON line, before the wall time
    lo, hi = out["ratio_range"]
    assert lo <= out["ratio"] <= hi and out["vocab"] == 395 and out["tokens_per_step"] > 0  # the default domain's train tokens


def test_the_main_command_is_one_short_command_from_the_root(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["reproduce.py", "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(ROOT / "reproduce.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "comparison" in out.split("\n\n")[1], out[:300]


def test_one_seed_gives_intervals_but_no_verdicts():
    """With one seed the interval sees only the test examples: the report says so instead of calling claims."""
    rng = np.random.default_rng(0)
    a = (rng.random((1, 600)) < 0.9).astype(float)
    b = (rng.random((1, 600)) < 0.5).astype(float)  # 40 points apart: the examples alone resolve it
    r = stats.paired_interval(a, b)
    assert r["lo"] > 0 and r["se_seeds"] == 0
    rows = [("(b) SCD+AW > KD", r), ("(a) KD > SFT student", r)]
    table = reproduce.claims_table(rows)
    assert table.count("no verdict (one seed)") == 2 and "holds" not in table


def test_a_teacher_best_at_its_first_checkpoint_goes_through_to_the_report(tiny_domain, tmp_path, monkeypatch, capsys):
    """Real teachers often peak early and then overfit. T* at the first checkpoint makes the k4
    protocol's pool that one checkpoint (the path ends at T*): every phase runs, the CD and SCD
    runs say that they are KD here and what to do, and the report's preconditions say it too."""
    monkeypatch.setattr(reproduce.tt.scd, "best_checkpoint", lambda val_losses: 0)
    for plot in [name for name in vars(reproduce) if name.startswith("plot_")]:  # the report's text alone is read here
        monkeypatch.setattr(reproduce, plot, lambda *a, **k: None)
    cfg = reproduce.ReproduceConfig(data=str(half(tiny_domain, tmp_path)), out_dir=str(tmp_path / "runs"), seeds=1, teacher_epochs=2,
                                    ckpt_per_epoch=1, stages=2, probe_size=16, base="none")
    text = reproduce.main(cfg).read_text()
    assert cfg.report_dir == str(tmp_path / "runs" / "report")  # the run's own folder
    sched = json.loads((tmp_path / "runs" / "seed0" / "scd_k4" / "schedule.json").read_text())
    assert sched["pool"] == ["ckpt_000003.pt"] and {s["ckpt"] for s in sched["stages"]} == {0}
    assert "| SCD+AW |" in text and "no verdict (one seed)" in text
    out = capsys.readouterr().out
    assert "the path to T* holds one candidate (T* at step 3), so CD is KD here" in out and "so SCD is KD here" in out
    assert "--ckpt_per_epoch" in out and "| the path to T* holds at least 2 candidates" in text and "| 1 to 1 candidates per seed | no |" in text


@pytest.fixture(scope="module")
def grid():
    """The committed grid's runs, unpacked from its outcomes file once: (config, runs)."""
    o = reproduce.load_outcomes(ROOT / "report" / "grid" / "outcomes.json.gz")
    return reproduce.unpack(o)[:2]


def test_the_committed_grid_report_is_recomputed_from_its_outcomes_file(grid):
    """report/grid/outcomes.json.gz holds every model's right/wrong on every test example, per
    seed: the claims table computed from it alone is the committed report's, row for row."""
    cfg, runs = grid
    table = reproduce.claims_table(reproduce.claim_rows(runs)).splitlines()
    committed = (ROOT / "report" / "grid" / "results.md").read_text(encoding="utf-8").splitlines()
    start = committed.index(table[0])
    assert committed[start:start + len(table)] == table and len(table) == 2 + 14 and cfg.seeds == len(runs) >= 10
    assert "| (b) SCD+AW > KD | **primary** |" in "\n".join(table)


def test_the_grid_report_says_where_the_schedule_stopped_recomputed_independently():
    """From the outcomes file alone, with plain JSON and numpy (not the report's code): how often
    the last stage of SCD and SCD+AW chose T*, how far short the rest stopped, the runs' mean test
    exact match by where they stopped, and how often the student term was smallest at the
    previous stage's choice. The committed report says the same, to the digit."""
    import gzip
    o = json.load(gzip.open(ROOT / "report" / "grid" / "outcomes.json.gz", "rt", encoding="utf-8"))
    subs = np.array(o["subdomains"])
    text = (ROOT / "report" / "grid" / "results.md").read_text(encoding="utf-8")
    for name in ("SCD", "SCD+AW"):
        short, acc, smallest_at_prev = [], [], 0
        for r in o["runs"].values():
            sched = o["files"][r[name] + "/schedule.json"]
            stages = sched["stages"]
            short.append(sched["best"] - stages[-1]["ckpt"])
            bits = np.array([b == "1" for b in o["files"][r[name] + "/test_records_best.jsonl"]], dtype=float)
            acc.append(np.mean([bits[subs == s].mean() for s in sorted(set(subs))]))
            smallest_at_prev += sum(int(np.argmin(st["kl_student"])) == prev["ckpt"] for prev, st in zip(stages, stages[1:]))
        short, acc = np.array(short), np.array(acc)
        line = next(li for li in text.splitlines() if li.startswith(f"- {name}'s last stage chose T* on"))
        assert f"chose T* on {int((short == 0).sum())} of {len(short)} seeds" in line
        for c in sorted(set(short.tolist())):
            label = "at T*" if c == 0 else f"{c} short"
            assert f"{label} {acc[short == c].mean():.3f} ({int((short == c).sum())} runs)" in line, (name, c, line)
        rows = [li for li in text.splitlines() if li.startswith(f"| {name} | ") and li.count("|") == 6]
        assert sum(int(li.split("|")[5].split(" of ")[0]) for li in rows if "of" in li.split("|")[5]) == smallest_at_prev
    assert "SCD's last stage chose T* on 0 of 16 seeds" in text  # the committed grid: the schedule never arrives


def test_lab_stats_recomputes_every_claim_of_the_committed_grid_report():
    """python -m lab.stats REPORT rebuilds each claim from its printed figures. For every row
    of the committed grid's claims table (whole-domain, subdomain and subset): the report's p
    lies within the p-values that the printed figures' rounding allows (the mean anywhere in
    the range its printed value and interval leave, each standard error part +- 0.005 points),
    the rebuilt interval prints as the report's, and the verdict's first words are the report's
    (the primary from its own interval, the others Holm-corrected within their family)."""
    path = ROOT / "report" / "grid" / "results.md"
    rows = stats.claims_from_report(path)
    printed = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
               for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("| (")}
    assert len(rows) == len(printed) == 14
    p, resolved = stats.claim_p_values(rows, reproduce.PRIMARY)
    for i, (claim, r) in enumerate(rows):
        cells = printed[claim]
        corners = [stats.claim_p_values([(claim, dict(r, mean=m, se=math.hypot(r["se_seeds"] + ds, r["se_examples"] + de)))], "")[0][0]
                   for m in r["mean_range"] for ds in (-5e-5, 5e-5) for de in (-5e-5, 5e-5)]
        assert min(corners) - 5e-4 <= float(cells[6]) <= max(corners) + 5e-4, (claim, corners, cells[6])
        assert abs(p[i] - float(cells[6])) <= 0.015, (claim, p[i], cells[6])
        ends = [float(f"{100 * (r['mean'] + sign * r['half']):.1f}") for sign in (-1, 1)]
        assert ends == [float(x) for x in cells[4].strip("[]").split(", ")], (claim, ends, cells[4])  # -0.0 == +0.0
        mine = stats.verdict(r) if claim == reproduce.PRIMARY else stats.verdict(r, resolved[i])
        assert mine.split(" (")[0].split(";")[0] == cells[7].split(" (")[0].split(";")[0], claim


def test_the_primary_stays_out_of_the_secondary_claims_holm_family():
    """A case where it matters: an inconclusive primary (p 0.30) counted in the family would
    raise the first threshold from 0.05 / 2 to 0.05 / 3 and take both secondary verdicts (p 0.020
    and 0.024) with it; kept out, as the report keeps it, both hold."""
    def claim(z):  # a result whose t (large df) gives the wanted p
        return dict(mean=z * 0.01, se=0.01, df=10**6, lo=(z - 1.96) * 0.01, hi=(z + 1.96) * 0.01, half=0.0196, S=16)
    rows = [(reproduce.PRIMARY, claim(1.0364)), ("(a) KD > SFT student", claim(2.3263)), ("(a) CD > SFT student", claim(2.2571))]
    p, verdicts = reproduce.claim_verdicts(rows)
    assert [round(x, 3) for x in p] == [0.300, 0.020, 0.024]
    assert verdicts[1].startswith("holds") and verdicts[2].startswith("holds")
    assert stats.holm(p) == [False, False, False]  # what the family with the primary in it would have said


def test_the_code_that_writes_the_reach_section_gives_the_committed_section(grid):
    """lab.reproduce.reach_section itself (where each SCD run's last stage ended, the test figures
    by where it ended, the lock-in counts of term_scales), run on the runs unpacked from the
    outcomes file: every line it writes is in the committed report, in one block. The test above
    recomputes the same figures without this code; together they hold the code to the file."""
    section = reproduce.reach_section(grid[1])
    committed = (ROOT / "report" / "grid" / "results.md").read_text(encoding="utf-8")
    assert section in committed and "chose T* on 0 of 16 seeds" in section and "| SCD | 1 |" in section
