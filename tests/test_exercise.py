"""The assignment copy (exercise.py) fails exactly where a student has work to do, and the
grader's messages point at the mistake."""
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from lab import exercise

ROOT = Path(__file__).resolve().parent.parent


def grade(folder, *args):
    xml = folder / "grade.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *args],
                   cwd=folder, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    cases = ET.parse(xml).getroot().iter("testcase")
    return {c.get("name"): (c.find("failure").get("message") if c.find("failure") is not None else None) for c in cases}


def test_assignment_fails_with_not_implemented_exactly_where_work_is_left(tmp_path):
    exercise.main(tmp_path / "a")
    src = (tmp_path / "a" / "scd.py").read_text()
    for name in exercise.EXERCISES:
        assert f'raise NotImplementedError("{name}: write it' in src
    assert '"""Adaptive Weighting: w_i = sigmoid(log(l_S(x_i) / l_{c_k}(x_i)))' in src  # the docstrings stay
    assert "def best_checkpoint" in src and "min(range(len(val_losses))" in src       # the rest stays
    result = grade(tmp_path / "a", "tests/test_scd.py")
    passed = {n for n, msg in result.items() if msg is None}
    assert passed == {"test_best_teacher_is_the_lowest_validation_loss_earliest_on_ties"}  # uses no exercise function
    assert all("NotImplementedError" in msg for msg in result.values() if msg), result
    assert not (tmp_path / "a" / "tests" / "test_mutants.py").exists()
    assert not (tmp_path / "a" / "lab").exists() and not (tmp_path / "a" / "reproduce.py").exists()  # no lab file
    tests = {p.name for p in (tmp_path / "a" / "tests").iterdir()}
    assert "test_scd.py" in tests and not tests & {"test_reproduce.py", "test_stats.py", "test_exercise.py", "test_domains.py"}


def test_sft_and_evaluation_run_before_any_part_is_written(tmp_path, tiny_domain):
    """The copy's blanked scd.py must not stop what does not depend on it: the teacher's SFT,
    its checkpoints and probe, the anchor file and evaluation run in the untouched copy."""
    exercise.main(tmp_path / "c")
    r = subprocess.run([sys.executable, "train_teacher.py", f"--data={tiny_domain}", "--preset=student", "--epochs=1",
                        "--ckpt_per_epoch=1", "--probe_size=8", f"--out_dir={tmp_path / 'run'}"],
                       cwd=tmp_path / "c", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "train_losses.json").exists() and "best checkpoint" in r.stdout


def test_a_plausible_wrong_answer_gets_expected_and_got(tmp_path):
    exercise.main(tmp_path / "b")
    ref = (ROOT / "scd.py").read_text()
    (tmp_path / "b" / "scd.py").write_text(ref.replace("torch.log(l_s) - torch.log(l_c)", "torch.log(l_c) - torch.log(l_s)"))
    msg = grade(tmp_path / "b", "tests/test_scd.py", "-k", "aw_weight_by_hand")["test_aw_weight_by_hand_and_constant"]
    assert "expected l_S / (l_S + l_c) = [0.5, 0.75, 0.25], got [0.5, 0.25" in msg
