"""The plumbing between the method's functions and the runs: which LR each step gets, which
checkpoint each stage reads, which weights are kept, which examples the probe holds. Each
test here fails under a one-line change that would otherwise give a silently different
method (tests/test_mutants.py applies them)."""
import json
import re
import shutil

import pytest
import torch

import plumbing
import scale
import data
import distill
import scd
import train_teacher as tt
from test_distill import dcfg, runs  # noqa: F401  (the module's teacher and SFT student runs)
from test_train import cfg


def test_the_lr_schedule_restarts_at_every_stage(tiny_domain, runs):  # noqa: F811
    distill.main(dcfg(tiny_domain, runs, "lr", method="kd", stages=3, steps_per_stage=5, log_every=1, lr=1e-3))
    lrs = [float(re.search(r"\| lr (\S+) \|", line).group(1)) for line in (runs / "lr" / "log.txt").read_text().splitlines()]
    want = [plumbing.lr_at(i, 5, 1e-3, 0.1) for _ in range(3) for i in range(5)]  # warm-up and cosine within each stage
    assert lrs == pytest.approx(want, rel=1e-2, abs=1e-9)


def test_best_pt_is_the_stage_with_the_best_validation_accuracy(tiny_domain, runs, monkeypatch):  # noqa: F811
    """Validation accuracy is scripted to peak at stage 1 of 3: best.pt must hold the weights the
    student had at the end of stage 1, not the last stage's."""
    real, seen = data.evaluate, []

    def scripted(model, examples, *a, **kw):
        summary, records = real(model, examples, *a, **kw)
        if "val.jsonl" in examples[0]["src"]:  # a stage's validation
            seen.append({k: v.clone() for k, v in model.state_dict().items()})
            summary = dict(summary, acc=[0.3, 0.9, 0.5][len(seen) - 1])
        return summary, records
    monkeypatch.setattr(distill.data, "evaluate", scripted)
    res = distill.main(dcfg(tiny_domain, runs, "best", method="kd", stages=3))
    best = torch.load(runs / "best" / "best.pt", weights_only=True)
    assert res["best_stage"] == best["stage"] == 1
    assert all(torch.equal(best["model"][k], seen[1][k]) for k in best["model"])
    assert not all(torch.equal(best["model"][k], seen[2][k]) for k in best["model"])


def test_a_run_interrupted_after_its_best_stage_keeps_that_stage_as_best(tiny_domain, runs, monkeypatch):  # noqa: F811
    """Validation accuracy is scripted to peak at stage 1 of 3; the run stops after stage 1 and
    resumes. Stage 2 (0.5) must not replace best.pt: the resume restores the best score so far."""
    real, calls = data.evaluate, []

    def scripted(model, examples, *a, **kw):
        summary, records = real(model, examples, *a, **kw)
        if "val.jsonl" in examples[0]["src"]:
            calls.append(1)
            summary = dict(summary, acc=[0.3, 0.9, 0.5][len(calls) - 1])
        return summary, records
    monkeypatch.setattr(distill.data, "evaluate", scripted)
    assert distill.main(dcfg(tiny_domain, runs, "best_cut", method="kd", stages=3, stop_at_stage=2)) is None
    res = distill.main(dcfg(tiny_domain, runs, "best_cut", method="kd", stages=3))
    assert len(calls) == 3 and res["best_stage"] == torch.load(runs / "best_cut" / "best.pt", weights_only=True)["stage"] == 1


def test_the_aw_anchor_comes_from_the_sft_students_best_checkpoint(tiny_domain, tmp_path):
    """finish() is told the best is the first checkpoint: the anchor file must hold that
    checkpoint's per-example losses, recomputed here, and not the last one's."""
    out = tmp_path / "sft"
    tt.train(cfg(tiny_domain, out))
    m = json.loads((out / "manifest.json").read_text())
    m["best"] = 0
    splits = data.load_domain(str(tiny_domain))
    tt.finish(cfg(tiny_domain, out), out, m, splits, "cpu", torch.no_grad())
    anchor = json.loads((out / "train_losses.json").read_text())
    first, last = (plumbing.load_checkpoint(out / m["checkpoints"][j]["file"]) for j in (0, -1))
    losses = [data.example_losses(model, data.encode(splits["train"], tok, 128), tok.eot, "cpu", torch.no_grad())
              for model, tok in (first, last)]
    assert anchor["checkpoint"] == m["checkpoints"][0]["file"]
    assert anchor["loss"] == pytest.approx(losses[0], abs=1e-5) and anchor["loss"] != pytest.approx(losses[1], abs=1e-5)


def test_distill_reads_the_teachers_probe_only_if_it_holds_the_same_examples(tiny_domain, runs, capsys):  # noqa: F811
    """The teacher run stores its probe's log-probs with the probe's id (indices and tokens);
    distill.py uses them only when its own probe has that id. A stored file whose id is
    changed is never used: the log-probs are computed again and the run says so."""
    _, tok, _, enc = plumbing.prepare(str(tiny_domain), "student", seed=0)
    idx, _, probe_id = data.probe_examples(enc["train"], 64, seed=0)
    path = data.probe_file(runs / "teacher", 0, 16, 64)  # the teacher's probe size in these tests
    stored = torch.load(path, weights_only=True)
    assert stored["probe"] == data.probe_examples(enc["train"], 16, seed=0)[2]
    assert data.probe_examples(enc["train"], 64, seed=1)[2] != probe_id and len(idx) == 64  # another seed, another id
    distill.main(dcfg(tiny_domain, runs, "probe_ok", method="scd", stages=1))
    assert "computing the probe" not in capsys.readouterr().out  # the teacher's file was read
    torch.save(dict(stored, probe="0" * 16, values=[v + 1 for v in stored["values"]]), path)  # made on "other examples"
    try:
        distill.main(dcfg(tiny_domain, runs, "probe_bad", method="scd", stages=1))
        assert "computing the probe's log-probs here" in capsys.readouterr().out
        a, b = (json.loads((runs / d / "schedule.json").read_text())["stages"][0] for d in ("probe_ok", "probe_bad"))
        assert a["kl_best"] == pytest.approx(b["kl_best"]) and a["kl_student"] == pytest.approx(b["kl_student"])
        assert torch.load(path, weights_only=True)["probe"] == stored["probe"]  # and the right one is stored again
    finally:
        torch.save(stored, path)


def test_monotone_compares_with_the_previous_stages_choice(tiny_domain, runs, monkeypatch):  # noqa: F811
    """The criterion is scripted to choose 1, 3, 2, 0: each stage must be handed the choice of
    the stage just before it (not the first stage's) as the earliest allowed checkpoint;
    --schedule_weight 2 must reach it as the weight of KL(T* || c); --last_at_best must replace
    the last choice with T* (3, the last of the pool), whose file the last stage's teacher is."""
    script, prevs, handed = iter([1, 3, 2, 0]), [], []

    real = scd.scd_checkpoint

    def scripted(pieces, student_term="flipped", weight=1.0, prev=None, monotone=False):  # distill.choose's one call
        prevs.append((prev, monotone))
        handed.append(weight)
        _, kl_best, kl_student = real(pieces, student_term, weight, prev, monotone)
        return next(script), kl_best, kl_student
    monkeypatch.setattr(distill.scd, "scd_checkpoint", scripted)
    distill.main(dcfg(tiny_domain, runs, "mono", method="scd", stages=4, monotone=True, probe_resamples=0,
                      schedule_weight=2.0, last_at_best=True))
    assert prevs == [(None, True), (1, True), (3, True), (2, True)]
    sched = json.loads((runs / "mono" / "schedule.json").read_text())
    assert [s["ckpt"] for s in sched["stages"]] == [1, 3, 2, 3] and sched["best"] == 3
    assert sched["stages"][-1]["file"] == sched["pool"][-1]
    assert handed == [2.0] * 4 and all(max(row["kl_best"]) > 0 for row in sched["stages"])


def test_pool_start_drops_the_early_checkpoints_from_every_schedule(tiny_domain, runs, monkeypatch):  # noqa: F811
    """4 teacher checkpoints at steps 3, 6, 9, 12: --pool_start 0.5 keeps steps 6 to 12. SCD
    scores 3 candidates, CD starts at the pool's first, and each stage loads the checkpoint
    it chose."""
    loaded = []
    for module, name in ((plumbing, "load_checkpoint"), (scale, "load_checkpoint"), (plumbing, "load_weights")):
        real = getattr(module, name)  # T*'s check, each stage's teacher, the students read back for the test pass
        monkeypatch.setattr(module, name, lambda path, *a, real=real, **kw: loaded.append(path.name) or real(path, *a, **kw))
    distill.main(dcfg(tiny_domain, runs, "pool_scd", method="scd", stages=2, pool_start=0.5))
    sched = json.loads((runs / "pool_scd" / "schedule.json").read_text())
    assert sched["pool"] == ["ckpt_000006.pt", "ckpt_000009.pt", "ckpt_000012.pt"] and sched["best"] == 2
    assert all(len(s["kl_best"]) == 3 and s["file"] == sched["pool"][s["ckpt"]] for s in sched["stages"])
    loaded.clear()
    distill.main(dcfg(tiny_domain, runs, "pool_cd", method="cd", stages=2, pool_start=0.5))
    assert [s["file"] for s in json.loads((runs / "pool_cd" / "schedule.json").read_text())["stages"]] == \
        ["ckpt_000006.pt", "ckpt_000012.pt"]
    assert loaded[1:] == ["ckpt_000006.pt", "ckpt_000012.pt", "best.pt", "final.pt"]  # after the vocabulary check on T*


def test_the_pool_is_the_path_to_t_star_even_when_the_teacher_peaks_first(tiny_domain, runs, tmp_path):  # noqa: F811
    """Real teachers often peak early. The pool runs from --pool_start of the way to T* up to T*:
    with T* at the first of 4 checkpoints it is that one checkpoint, and every method runs on it
    (staged SFT, which reads no teacher, included); with T* third, the fourth is no candidate."""
    early = tmp_path / "early"
    shutil.copytree(runs / "teacher", early)
    m = json.loads((early / "manifest.json").read_text())
    for best, want in ((0, ["ckpt_000003.pt"]), (2, ["ckpt_000006.pt", "ckpt_000009.pt"])):
        (early / "manifest.json").write_text(json.dumps(dict(m, best=best)))
        for method in ("sft", "scd", "cd"):
            out = f"early_{best}_{method}"
            distill.main(dcfg(tiny_domain, runs, out, method=method, stages=2, pool_start=0.5, probe_resamples=0,
                              teacher_dir=str(early)))
            sched = json.loads((runs / out / "schedule.json").read_text())
            assert sched["pool"] == want and sched["best"] == len(want) - 1
            if method != "sft":
                assert {s["file"] for s in sched["stages"]} <= set(want)


def test_the_loss_gets_the_runs_alpha_direction_and_temperature(tiny_domain, runs, monkeypatch):  # noqa: F811
    calls, real = [], scd.distill_loss
    monkeypatch.setattr(distill.scd, "distill_loss", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    distill.main(dcfg(tiny_domain, runs, "flags", method="kd", stages=1, alpha=0.25, kl_direction="reverse", temperature=2.0))
    assert calls and all((c["alpha"], c["anchor_loss"], c["direction"], c["temperature"]) == (0.25, None, "reverse", 2.0)
                         for c in calls)


def test_resampled_probes_are_logged_and_change_nothing_in_the_run(tiny_domain, runs):  # noqa: F811
    distill.main(dcfg(tiny_domain, runs, "resample2", method="scd", stages=2, probe_resamples=2))
    distill.main(dcfg(tiny_domain, runs, "resample0", method="scd", stages=2, probe_resamples=0))
    a, b = (json.loads((runs / d / "schedule.json").read_text())["stages"] for d in ("resample2", "resample0"))
    assert [len(s["resampled"]) for s in a] == [2, 2] and [s["resampled"] for s in b] == [[], []]
    assert [s["ckpt"] for s in a] == [s["ckpt"] for s in b] and [s["kl_best"] for s in a] == [s["kl_best"] for s in b]
    wa, wb = (torch.load(runs / d / "final.pt", weights_only=True)["model"] for d in ("resample2", "resample0"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the extra probes draw on no random stream of the run
    assert data.probe_file(runs / "teacher", 2000, 16, 64).exists()  # stored with the teacher for the next run


def test_a_schedule_given_by_hand_distils_from_the_steps_it_names_and_refuses_others(tiny_domain, runs):  # noqa: F811
    """--method given (the sparse-parity control's 2-shot protocol): the teacher's checkpoints are
    at steps 3, 6, 9, 12; '6,12,12' distils from step 6, then 12 twice. A step that is no candidate,
    or one step too few, is refused before anything is written, naming the candidates."""
    distill.main(dcfg(tiny_domain, runs, "given", method="given", given_steps="6,12,12", stages=3))
    sched = json.loads((runs / "given" / "schedule.json").read_text())
    assert [s["teacher_step"] for s in sched["stages"]] == [6, 12, 12] and [s["ckpt"] for s in sched["stages"]] == [1, 3, 3]
    for bad in ("7,12,12", "6,12"):
        with pytest.raises(plumbing.RunError, match="3, 6, 9, 12"):
            distill.main(dcfg(tiny_domain, runs, f"given_{bad}", method="given", given_steps=bad, stages=3))
        assert not (runs / f"given_{bad}").exists()


def test_steps_instead_of_epochs_keeps_the_checkpoints_per_pass(tiny_domain, tmp_path):
    """train_teacher.py --steps 9: nine steps whatever --epochs says, and --ckpt_per_epoch still
    counts per pass over the training set: 6 steps a pass (96 examples, batch 16), so 3 a pass
    over 1.5 passes makes round(4.5) = 4 checkpoints, evenly spaced: steps 2, 4, 7 and 9."""
    tt.train(cfg(tiny_domain, tmp_path / "s", steps=9, epochs=5, ckpt_per_epoch=3))
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [c["step"] for c in m["checkpoints"]] == [2, 4, 7, 9]
