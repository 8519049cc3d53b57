import json

from lab import parity


def test_parity_script_writes_curves_for_every_method(tmp_path):
    cfg = parity.ParityConfig(data="parity:12:2", seeds=1, methods="sft,cd,scd", ckpt_per_epoch=2, batch_size=16,
                              stages=2, steps_per_stage=4, eval_every=2, probe_size=16,
                              out_dir=str(tmp_path / "runs"), report_dir=str(tmp_path / "rep"))
    parity.main(cfg)
    text = (tmp_path / "rep" / "parity.md").read_text()
    for m in ("SFT", "CD", "SCD"):
        assert f"| {m} |" in text
    assert (tmp_path / "rep" / "parity.png").stat().st_size > 10_000
    # 2 stages x 4 steps, a point every 2 steps: 4 points per student, at steps 2, 4, 6, 8

    stages = json.loads((tmp_path / "runs" / "seed0" / "scd" / "schedule.json").read_text())["stages"]
    assert [p[0] for s in stages for p in s["curve"]] == [2, 4, 6, 8]
