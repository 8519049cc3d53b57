import json

import pytest

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
