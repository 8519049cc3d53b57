import json
import shutil

import pytest
import torch

import distill
import train_teacher as tt
from test_train import cfg, tiny_domain  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def runs(tiny_domain, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("runs")
    tt.train(cfg(tiny_domain, root / "teacher", preset="teacher"))
    tt.train(cfg(tiny_domain, root / "sft"))
    return root


def dcfg(tiny_domain, runs, name, **kw):  # noqa: F811
    return distill.DistillConfig(**{**dict(data=str(tiny_domain), teacher_dir=str(runs / "teacher"),
                                           anchor_dir=str(runs / "sft"), out_dir=str(runs / name), stages=2,
                                           steps_per_stage=4, probe_size=16, log_every=1000), **kw})


@pytest.mark.parametrize("method, aw", [("sft", False), ("kd", False), ("cd", False), ("scd", False), ("scd", True)])
def test_each_method_writes_its_schedule_and_two_students(tiny_domain, runs, method, aw):  # noqa: F811
    distill.main(dcfg(tiny_domain, runs, f"{method}{aw}", method=method, aw=aw))
    out = runs / f"{method}{aw}"
    sched = json.loads((out / "schedule.json").read_text())
    chosen = [s.get("ckpt") for s in sched["stages"]]
    assert len(chosen) == 2 and (out / "best.pt").exists() and (out / "final.pt").exists()
    best = sched["best"]
    assert chosen == {"sft": [None, None], "kd": [best, best], "cd": [0, best]}.get(method, chosen)
    if method == "scd":  # both KL terms logged for every candidate, and the choice is their argmin
        for s in sched["stages"]:
            score = [a + b for a, b in zip(s["kl_best"], s["kl_student"])]
            assert len(score) == len(sched["pool"]) and s["ckpt"] == score.index(min(score))
    assert len((out / "test_records_best.jsonl").read_text().splitlines()) == 24


def test_clear_errors_for_missing_teacher_and_anchor(tiny_domain, runs, tmp_path):  # noqa: F811
    with pytest.raises(SystemExit, match="no manifest.json"):
        distill.main(dcfg(tiny_domain, runs, "x", teacher_dir=str(tmp_path)))
    with pytest.raises(SystemExit, match="train_losses.json: missing"):
        distill.main(dcfg(tiny_domain, runs, "y", aw=True, anchor_dir=str(tmp_path)))
    bad = tmp_path / "train_losses.json"
    bad.write_text(json.dumps(dict(fingerprint="0" * 16, loss=[1.0] * 96)))
    with pytest.raises(SystemExit, match="made for other training data"):
        distill.main(dcfg(tiny_domain, runs, "z", aw=True, anchor_dir=str(tmp_path)))


def test_interrupted_run_resumes_to_the_same_students(tiny_domain, runs):  # noqa: F811
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
    with pytest.raises(SystemExit, match="another config"):  # a changed command is refused, not mixed in
        distill.main(dcfg(tiny_domain, runs, "cut", **{**kw, "lr": 1e-3}))


def test_clear_errors_for_bad_teacher_folders(tiny_domain, runs, tmp_path):  # noqa: F811
    def teacher_copy(name):
        d = tmp_path / name
        shutil.copytree(runs / "teacher", d)
        return d, json.loads((d / "manifest.json").read_text())

    d, m = teacher_copy("empty")
    (d / "manifest.json").write_text(json.dumps({**m, "checkpoints": []}))
    with pytest.raises(SystemExit, match="lists no checkpoints"):
        distill.main(dcfg(tiny_domain, runs, "e", teacher_dir=str(d)))

    d, m = teacher_copy("corrupt")  # a truncated checkpoint file is named in the error
    bad = d / m["checkpoints"][0]["file"]
    bad.write_bytes(bad.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match=f"{bad.name}: not a readable checkpoint"):
        distill.main(dcfg(tiny_domain, runs, "c", teacher_dir=str(d)))

    for field, change in (("vocab", lambda ck: ck["vocab"][:-1] + [99999]),
                          ("model_config", lambda ck: {**ck["model_config"], "block_size": 2 * ck["model_config"]["block_size"]})):
        d, m = teacher_copy(field)
        path = d / m["checkpoints"][m["best"]]["file"]
        ck = torch.load(path, weights_only=True)
        ck[field] = change(ck)
        if field == "model_config":  # a longer context needs a longer position table
            wpe = ck["model"]["transformer.wpe.weight"]
            ck["model"]["transformer.wpe.weight"] = torch.cat([wpe, wpe])
        torch.save(ck, path)
        with pytest.raises(SystemExit, match="another vocabulary or context length"):
            distill.main(dcfg(tiny_domain, runs, "v", teacher_dir=str(d)))
