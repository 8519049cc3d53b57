"""The assignment copy (exercise.py) fails exactly where a student has work to do, and the
grader's messages point at the mistake."""
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import exercise

ROOT = Path(__file__).resolve().parent.parent


def grade(folder, *args):
    xml = folder / "grade.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *args],
                   cwd=folder, capture_output=True, text=True, timeout=300)
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


def test_a_plausible_wrong_answer_gets_expected_and_got(tmp_path):
    exercise.main(tmp_path / "b")
    ref = (ROOT / "scd.py").read_text()
    (tmp_path / "b" / "scd.py").write_text(ref.replace("torch.log(l_s) - torch.log(l_c)", "torch.log(l_c) - torch.log(l_s)"))
    msg = grade(tmp_path / "b", "tests/test_scd.py", "-k", "aw_weight_by_hand")["test_aw_weight_by_hand_and_constant"]
    assert "expected l_S / (l_S + l_c) = [0.5, 0.75, 0.25], got [0.5, 0.25" in msg
