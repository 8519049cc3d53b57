import json

import reproduce
from test_train import tiny_domain  # noqa: F401 (fixture)


def test_one_command_writes_the_report_and_reuses_finished_phases(tiny_domain, tmp_path, capsys):  # noqa: F811
    cfg = reproduce.ReproduceConfig(data=str(tiny_domain), out_dir=str(tmp_path / "runs"), report_dir=str(tmp_path / "rep"),
                                    seeds=2, teacher_epochs=2, student_epochs=2, stages=2, steps_per_stage=3, probe_size=16)
    path = reproduce.main(cfg)
    text = path.read_text()
    for row in ("teacher", "SFT student", "KD", "CD", "SCD", "SCD+AW"):
        assert f"| {row} |" in text
    for png in ("teacher", "schedule", "aw_weights", "decomposition", "subdomains"):
        assert (tmp_path / "rep" / f"{png}.png").stat().st_size > 10_000
    # the table's teacher average is the mean over seeds of what each teacher run measured on test
    accs = [json.loads((tmp_path / "runs" / f"seed{s}" / "teacher" / "manifest.json").read_text())["test"]["acc"]
            for s in (0, 1)]
    row = next(line for line in text.splitlines() if line.startswith("| teacher |"))
    assert row.split("**")[1].startswith(f"{(accs[0] + accs[1]) / 2:.3f} ± ")
    capsys.readouterr()
    reproduce.main(cfg)  # everything finished: every phase of both seeds is reused
    assert capsys.readouterr().out.count("finished: nothing to do") == 2 * 6
    assert path.read_text() == text  # the same report, wall times included (each run keeps its own)
