import json
import math
import os
import re
import shutil
from contextlib import nullcontext

import pytest
import torch
from torch.nn import functional as F

import plumbing
import scale
import data
import distill
import train_teacher as tt
from test_train import cfg


@pytest.fixture(scope="module")
def runs(tiny_domain, tmp_path_factory):
    """A teacher trail and an SFT student, trained here, or copied from SCD_TEST_RUNS: the mutation
    check's, trained once by the unmutated scripts for the mutants of the distillation loop."""
    root = tmp_path_factory.mktemp("runs")
    if os.environ.get("SCD_TEST_RUNS"):
        shutil.copytree(os.environ["SCD_TEST_RUNS"], root, dirs_exist_ok=True)
        return root
    tt.train(cfg(tiny_domain, root / "teacher", preset="teacher"))
    tt.train(cfg(tiny_domain, root / "sft"))
    return root


def dcfg(tiny_domain, runs, name, **kw):
    return distill.DistillConfig(**{**dict(data=str(tiny_domain), teacher_dir=str(runs / "teacher"),
                                           anchor_dir=str(runs / "sft"), out_dir=str(runs / name), stages=2,
                                           steps_per_stage=4, probe_size=16, log_every=1000, pool_start=0.0), **kw})


@pytest.mark.parametrize("method, aw", [("sft", False), ("kd", False), ("cd", False), ("scd", False), ("scd", True)])
def test_each_method_writes_its_schedule_and_two_students(tiny_domain, runs, method, aw):
    distill.main(dcfg(tiny_domain, runs, f"{method}{aw}", method=method, aw=aw, stages=3))
    out = runs / f"{method}{aw}"
    sched = json.loads((out / "schedule.json").read_text())
    chosen = [s.get("ckpt") for s in sched["stages"]]
    assert len(chosen) == 3 and (out / "best.pt").exists() and (out / "final.pt").exists()
    best = sched["best"]
    assert best == 3  # 4 checkpoints, the last has the lowest validation loss in this tiny run
    if method != "scd":
        assert chosen == {"sft": [None] * 3, "kd": [best] * 3, "cd": [0, 2, 3]}[method]  # cd: round(0, 1.5, 3)
    assert len((out / "test_records_best.jsonl").read_text().splitlines()) == 24
    assert "prediction" not in json.loads((out / "test_records_best.jsonl").read_text().splitlines()[0])  # forced match on test


def test_scd_schedule_terms_match_an_independent_computation(tiny_domain, runs):
    """Stage 0's logged KL terms, recomputed here from the checkpoint files, the probe and the
    student's seeded initialisation, without the probe cache or scd.scd_checkpoint."""
    distill.main(dcfg(tiny_domain, runs, "scd_exact", method="scd", stages=1, probe_topk=10_000))
    st = json.loads((runs / "scd_exact" / "schedule.json").read_text())["stages"][0]
    splits, tok, student, enc = plumbing.prepare(str(tiny_domain), "student", seed=0)
    _, probe, _ = data.probe_examples(enc["train"], 16, seed=0)
    x, y, mask = data.make_batch(probe, range(len(probe)), tok.eot)
    lp = lambda m: torch.log_softmax(m.eval()(x, positions=mask), -1).detach()
    m = json.loads((runs / "teacher" / "manifest.json").read_text())
    cands = [lp(plumbing.load_checkpoint(runs / "teacher" / c["file"])[0]) for c in m["checkpoints"]]
    best, s_lp = cands[m["best"]], lp(student)
    kl = lambda p, q: F.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean().item()  # torch's KL(p || q)
    assert st["kl_best"] == pytest.approx([kl(best, c) for c in cands], rel=1e-4, abs=1e-6)
    assert st["kl_student"] == pytest.approx([kl(c, s_lp) for c in cands], rel=1e-4, abs=1e-6)
    score = [a + b for a, b in zip(st["kl_best"], st["kl_student"])]
    assert st["ckpt"] == score.index(min(score))


def test_aw_reads_each_examples_own_anchor_loss(tiny_domain, runs, tmp_path):
    """An anchor of 1e6 on even-numbered training examples and 1e-6 on odd ones makes w about 1
    on even and 0 on odd examples, so the mean w logged at each step is the share of even
    indices in that step's batch."""
    anchor = tmp_path / "anchor"
    anchor.mkdir()
    shutil.copy(runs / "sft" / "config.json", anchor)
    fp = json.loads((runs / "sft" / "train_losses.json").read_text())["fingerprint"]
    (anchor / "train_losses.json").write_text(json.dumps(dict(fingerprint=fp, loss=[1e6 if i % 2 == 0 else 1e-6 for i in range(96)])))
    distill.main(dcfg(tiny_domain, runs, "aw_lookup", method="kd", aw=True, stages=1, steps_per_stage=6, log_every=1,
                      anchor_dir=str(anchor)))
    logged = [float(re.search(r"\| w (\S+) \|", line).group(1)) for line in (runs / "aw_lookup" / "log.txt").read_text().splitlines()]
    _, _, _, enc = plumbing.prepare(str(tiny_domain), "student", seed=0)
    lengths = [len(p) + len(a) for p, a in enc["train"]]
    want = [sum(i % 2 == 0 for i in data.batch_indices(lengths, 16, 0, step)) / 16 for step in range(6)]
    assert len(set(want)) > 1, "the check needs batches with different shares"
    assert logged == pytest.approx(want, abs=2e-3), f"mean w per step: expected {want}, got {logged}"


def test_zero_anchor_losses_train_and_a_nan_stops_the_run_loudly(tiny_domain, runs, tmp_path):
    anchor = tmp_path / "anchor"
    anchor.mkdir()
    shutil.copy(runs / "sft" / "config.json", anchor)
    fp = json.loads((runs / "sft" / "train_losses.json").read_text())["fingerprint"]
    (anchor / "train_losses.json").write_text(json.dumps(dict(fingerprint=fp, loss=[0.0] * 96)))
    res = distill.main(dcfg(tiny_domain, runs, "zeros", method="scd", aw=True, anchor_dir=str(anchor)))
    assert math.isfinite(res["final"]["loss"])
    (anchor / "train_losses.json").write_text(json.dumps(dict(fingerprint=fp, loss=[0.0, float("nan")] * 48)))
    with pytest.raises(plumbing.RunError, match=r"non-finite w, loss at step \d+ \(stage 0\)"):
        distill.main(dcfg(tiny_domain, runs, "nan", method="scd", aw=True, anchor_dir=str(anchor)))
    assert not (runs / "nan" / "state.pt").exists()  # nothing saved after a bad step


def test_start_init_must_match_the_sft_students_init(tiny_domain, runs):
    with pytest.raises(plumbing.RunError, match=r"--seed 1 differs from the SFT student's \(0"):
        distill.main(dcfg(tiny_domain, runs, "seed1", method="kd", seed=1))


def test_clear_errors_for_missing_teacher_and_anchor(tiny_domain, runs, tmp_path):
    with pytest.raises(plumbing.RunError, match="no manifest.json"):
        distill.main(dcfg(tiny_domain, runs, "x", teacher_dir=str(tmp_path)))
    with pytest.raises(plumbing.RunError, match="train_losses.json: missing"):
        distill.main(dcfg(tiny_domain, runs, "y", aw=True, anchor_dir=str(tmp_path)))
    bad = tmp_path / "train_losses.json"
    bad.write_text(json.dumps(dict(fingerprint="0" * 16, loss=[1.0] * 96)))
    with pytest.raises(plumbing.RunError, match="made for other training data"):
        distill.main(dcfg(tiny_domain, runs, "z", aw=True, anchor_dir=str(tmp_path)))


def test_interrupted_run_resumes_to_the_same_students(tiny_domain, runs):
    kw = dict(method="scd", aw=True, stages=3)
    distill.main(dcfg(tiny_domain, runs, "whole", **kw))
    assert distill.main(dcfg(tiny_domain, runs, "cut", stop_at_stage=1, **kw)) is None
    assert not (runs / "cut" / "final.pt").exists()
    distill.main(dcfg(tiny_domain, runs, "cut", **kw))  # the same command again resumes at stage 1
    for name in ("best.pt", "final.pt"):
        a, b = (torch.load(runs / d / name, weights_only=True)["model"] for d in ("whole", "cut"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (json.loads((runs / "whole" / "schedule.json").read_text())
            == json.loads((runs / "cut" / "schedule.json").read_text()))
    with pytest.raises(plumbing.RunError, match="another config"):  # a changed command is refused, not mixed in
        distill.main(dcfg(tiny_domain, runs, "cut", **{**kw, "lr": 1e-3}))


def test_clear_errors_for_bad_teacher_folders(tiny_domain, runs, tmp_path):
    def teacher_copy(name):
        d = tmp_path / name
        shutil.copytree(runs / "teacher", d)
        return d, json.loads((d / "manifest.json").read_text())

    d, m = teacher_copy("empty")
    (d / "manifest.json").write_text(json.dumps({**m, "checkpoints": []}))
    with pytest.raises(plumbing.RunError, match="lists no checkpoints"):
        distill.main(dcfg(tiny_domain, runs, "e", teacher_dir=str(d)))

    d, m = teacher_copy("corrupt")  # a truncated checkpoint file is named in the error
    bad = d / m["checkpoints"][0]["file"]
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(plumbing.RunError, match=f"{bad.name}: not a readable checkpoint"):
        distill.main(dcfg(tiny_domain, runs, "c", teacher_dir=str(d)))

    for field, change, msg in (("vocab", lambda ck: ck["vocab"][:-1] + [99999], "another tokenizer than the student"),
                               ("model_config", lambda ck: {**ck["model_config"], "block_size": ck["model_config"]["block_size"] // 2},
                                r"shorter context \(64\) than the student \(128\)")):
        d, m = teacher_copy(field)
        path = d / m["checkpoints"][m["best"]]["file"]
        ck = torch.load(path, weights_only=True)
        ck[field] = change(ck)
        if field == "model_config":  # a shorter context has a shorter position table
            ck["model"]["transformer.wpe.weight"] = ck["model"]["transformer.wpe.weight"][:64]
        torch.save(ck, path)
        with pytest.raises(plumbing.RunError, match=msg):
            distill.main(dcfg(tiny_domain, runs, "v", teacher_dir=str(d)))
        assert not (runs / "v").exists()  # refused before anything is written


def test_cached_teacher_logits_equal_the_teacher_in_the_loop(tiny_domain, runs):
    """The stage's cache holds, per example, the logits the teacher gives that example in any
    batch (padding does not leak into answer positions); too small a memory cap switches it off."""
    _, tok, _, enc = plumbing.prepare(str(tiny_domain), "teacher", seed=0)
    m = json.loads((runs / "teacher" / "manifest.json").read_text())
    teacher, _ = plumbing.load_checkpoint(runs / "teacher" / m["checkpoints"][m["best"]]["file"])
    rows = scale.teacher_logits(teacher, enc["train"], tok.eot, "cpu", torch.no_grad(), max_gib=1.0, chunk=7)
    idx = [5, 0, 17, 3, 40, 41, 90, 2]
    x, _, mask = data.make_batch(enc["train"], idx, tok.eot)
    with torch.no_grad():
        direct = teacher(x, positions=mask)
    torch.testing.assert_close(torch.cat([rows[j] for j in idx]), direct, rtol=1e-4, atol=1e-5)
    assert scale.teacher_logits(teacher, enc["train"], tok.eot, "cpu", torch.no_grad(), max_gib=1e-9) is None


def test_start_anchor_starts_from_the_sft_students_trained_weights(tiny_domain, runs):
    """At learning rate 0 the student never moves, so its final weights are its start: with
    --start anchor, the SFT student's checkpoint of lowest validation loss; with init, the base."""
    m = json.loads((runs / "sft" / "manifest.json").read_text())
    sft = torch.load(runs / "sft" / m["checkpoints"][m["best"]]["file"], weights_only=True)["model"]
    for start in ("anchor", "init"):
        distill.main(dcfg(tiny_domain, runs, f"start_{start}", method="kd", stages=1, steps_per_stage=2, lr=0.0, start=start))
        final = torch.load(runs / f"start_{start}" / "final.pt", weights_only=True)["model"]
        assert all(torch.equal(final[k], sft[k]) for k in sft) == (start == "anchor")


def test_the_offline_top_k_signal_lets_the_teacher_go_and_is_exact_when_k_covers_the_vocabulary(tiny_domain, runs):
    distill.main(dcfg(tiny_domain, runs, "kd_full", method="kd", stages=1, steps_per_stage=4))
    distill.main(dcfg(tiny_domain, runs, "kd_all_k", method="kd", stages=1, steps_per_stage=4, teacher_topk=10_000))
    a, b = (torch.load(runs / d / "final.pt", weights_only=True)["model"] for d in ("kd_full", "kd_all_k"))
    # k >= V: every log-prob kept, the same KL up to float32 round-off, which Adam's normalised steps turn into about
    # 1e-5 on a weight; another signal would move weights by up to the LR, 3e-3, per step
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4
    _, tok, _, enc = plumbing.prepare(str(tiny_domain), "student", seed=0)
    teacher = scale.StageTeacher(runs / "teacher", enc["train"], tok.eot, "cpu", "float32", nullcontext(), 2.0, topk=8)
    teacher.use("ckpt_000012.pt")
    assert teacher.model is None and teacher.rows[0][0].shape[1] == 8  # no teacher in memory, 8 log-probs a token
    full = torch.log_softmax(scale.teacher_logits(plumbing.load_checkpoint(runs / "teacher" / "ckpt_000012.pt")[0],
                                                    enc["train"], tok.eot, "cpu", nullcontext(), 2.0)[5], -1)
    lp = teacher.logits([5], None, None)
    top = full.topk(8, -1)
    torch.testing.assert_close(lp.gather(1, top.indices), top.values)  # the top 8 exactly; the tail spread evenly
    torch.testing.assert_close(lp.logsumexp(-1), torch.zeros(len(lp)), atol=1e-5, rtol=0)


def test_the_signal_error_of_top_k_is_zero_when_k_covers_the_vocabulary(runs):
    from lab import topk
    V = torch.load(runs / "teacher" / "ckpt_000012.pt", weights_only=True)["model"]["lm_head.weight"].size(0)
    err, n, vocab = topk.signal_error(runs / "teacher", runs / "sft", [V, 8])
    assert vocab == V and n > 24  # every validation answer token, end tokens included
    tail, kl, d_k, d = err[V]
    assert abs(tail) < 1e-5 and abs(kl) < 1e-5 and d_k == pytest.approx(d, abs=1e-5)
    tail, kl, d_k, d = err[8]
    assert 0 < tail < 1 and kl > 0 and d == err[V][3]  # the full-distribution KL does not depend on k


def test_a_stage_switch_lets_the_previous_teacher_and_optimizer_go_before_the_next_teacher_is_built(tiny_domain, runs,
                                                                                                   monkeypatch):
    """CD over a pool of 4 walks from the first checkpoint to T* in two stages: when the next
    teacher is read, neither the earlier teacher nor the earlier stage's AdamW state is alive."""
    import gc
    import weakref
    import model as model_module
    teachers, optimizers, alive = [], [], []
    real_load, real_opt = scale.load_checkpoint, model_module.LM.configure_optimizer

    def load(path, *a, **kw):
        gc.collect()
        alive.append(sum(r() is not None for r in teachers + optimizers))
        m = real_load(path, *a, **kw)
        teachers.append(weakref.ref(m[0]))
        return m

    def configure(self, *a, **kw):
        opt = real_opt(self, *a, **kw)
        optimizers.append(weakref.ref(opt))
        return opt
    monkeypatch.setattr(scale, "load_checkpoint", load)
    monkeypatch.setattr(model_module.LM, "configure_optimizer", configure)
    distill.main(dcfg(tiny_domain, runs, "switch", method="cd", stages=2, steps_per_stage=2))
    assert len(teachers) == 2 and len(optimizers) == 2 and alive == [0, 0]


def test_the_report_s_aw_weights_are_the_weights_the_training_used(tiny_domain, runs):
    """The report's AW section and plot recompute w_i for every training example and stage
    (lab.reproduce.aw_weights_by_stage, from the stage's checkpoint and the anchor); the mean of
    those over each step's batch is the w the run logged at that step, to the log's 3 decimals."""
    from lab import reproduce
    distill.main(dcfg(tiny_domain, runs, "aw_logged", method="scd", aw=True, log_every=1))
    out = runs / "aw_logged"
    ws, _, _ = reproduce.aw_weights_by_stage(out, runs / "teacher", runs / "sft")
    logged = [float(line.split("| w ")[1].split(" |")[0]) for line in (out / "log.txt").read_text().splitlines() if "| w " in line]
    splits, tok, _, enc = plumbing.prepare(str(tiny_domain), "student", seed=0)
    lengths = [len(p) + len(a) for p, a in enc["train"]]
    cfg = dcfg(tiny_domain, runs, "aw_logged")
    assert len(logged) == cfg.stages * cfg.steps_per_stage
    for step, w in enumerate(logged):
        idx = data.batch_indices(lengths, 16, 0, step)
        assert ws[step // cfg.steps_per_stage][idx].mean().item() == pytest.approx(w, abs=6e-4), step
