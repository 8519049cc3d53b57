"""The assignment copy (exercise.py) fails exactly where a student has work to do, and the
grader's messages point at the mistake."""
import ast
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import forked
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
    # the copy is self-contained: its README, METHOD.md and handout name nothing it does not have
    cells = json.loads((tmp_path / "a" / "notebooks" / "assignments.ipynb").read_text())["cells"]
    docs = {"README.md": (tmp_path / "a" / "README.md").read_text(), "METHOD.md": (tmp_path / "a" / "METHOD.md").read_text(),
            "handout": "".join("".join(c["source"]) for c in cells)}
    outside = {(name, word) for name, text in docs.items() for word in exercise.OUTSIDE if word in text.replace("README.md", "")}
    assert not outside, outside
    # the handout's grade(): a part's failures are shown with their messages, not only the count
    cell = "".join(json.loads((tmp_path / "a" / "notebooks" / "assignments.ipynb").read_text())["cells"][1]["source"])
    grade_fn = next(f for f in ast.parse(cell).body if isinstance(f, ast.FunctionDef) and f.name == "grade")
    ns = dict(ROOT=tmp_path / "a", subprocess=subprocess, sys=sys)
    exec(ast.unparse(grade_fn), ns)
    with contextlib.redirect_stdout(io.StringIO()) as shown:
        ns["grade"]("part1")
    assert "token_kl: write it (part 1" in shown.getvalue() and "failed" in shown.getvalue(), shown.getvalue()
    # no solution in the copy: no statement of a blanked function's body appears in any function or lambda there
    answers = {s for name in exercise.EXERCISES for s in statements((ROOT / "scd.py").read_text(), name) if len(s) > 24}
    for path in (tmp_path / "a").rglob("*.py"):
        twins = answers & statements(path.read_text())
        assert not twins, (path.name, twins)


def statements(source, only=None):
    """Every statement (and lambda body) inside the functions of source, unparsed, docstrings
    left out; only: of that function alone."""
    out = set()
    for f in ast.walk(ast.parse(source)):
        if isinstance(f, (ast.FunctionDef, ast.Lambda)) and (only is None or getattr(f, "name", None) == only):
            for node in ast.walk(f):
                if isinstance(node, ast.stmt) and not isinstance(node, ast.FunctionDef) and not (
                        isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
                    out.add(ast.unparse(node))
                elif isinstance(node, ast.Lambda):
                    out.add(ast.unparse(node.body))
    return out


def test_nothing_trains_before_part_1_and_the_script_says_what_to_write(tmp_path, tiny_domain):
    """The blanked functions are the ones the scripts run: SFT's loss is the student's gold_ce,
    so the blank copy's SFT stops at once with one line naming the function and its part."""
    exercise.main(tmp_path / "c", instructor=tmp_path / "notes.md")
    r = subprocess.run([sys.executable, "train_teacher.py", f"--data={tiny_domain}", "--preset=student", "--epochs=1",
                        "--ckpt_per_epoch=1", "--probe_size=8", f"--out_dir={tmp_path / 'run'}"], cwd=tmp_path / "c",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: not written yet: scd.gold_ce: write it (part 1")
    assert "Answer key" in (tmp_path / "notes.md").read_text() and "Answer key" not in "".join(
        p.read_text(errors="ignore") for p in (tmp_path / "c").rglob("*.md"))
    assert "notebook" in (tmp_path / "c" / "requirements.txt").read_text()


# plausible student bugs, planted one at a time in a correct scd.py: (part, the correct line, the bug, what the
# grader's message must name)
BUGS = {
    "argmax for the argmin": (3, "int(score.argmin())", "int(score.argmax())", "the smallest"),
    "the student term's direction swapped": (3, 'if student_term == "as_written"', 'if student_term != "as_written"',
                                             "KL(p_c || p_student)"),
    "T instead of T squared": (1, "* temperature ** 2", "* temperature", "T^2 KL"),
    "a per-example sum, not a mean": (1, "/ mask.sum(1).clamp(min=1)", "", "mean of 1 and 3"),
    "the AW weight inverted": (2, "torch.log(l_s) - torch.log(l_c)", "torch.log(l_c) - torch.log(l_s)", "l_S / (l_S + l_c)"),
}


def grade_here(scd_source, test_file, part):
    """The copy's grader for one part, in this process (as tests/test_mutants.py checks scd.py):
    scd_source becomes the module `scd` its tests import, and each test marked `part` runs.
    -> {test: the failure's message}."""
    module = types.ModuleType("scd")
    exec(compile(scd_source, "scd.py", "exec"), module.__dict__)
    real, sys.modules["scd"] = sys.modules.get("scd"), module
    try:
        spec = importlib.util.spec_from_file_location("graded_copy_of_test_scd", test_file)
        tests = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tests)
        failed = {}
        for name, fn in vars(tests).items():
            if name.startswith("test_") and part in {m.name for m in getattr(fn, "pytestmark", [])}:
                try:
                    fn()
                except Exception as e:  # an assertion, or whatever the bug raises
                    failed[name] = f"{type(e).__name__}: {e}"
        return failed
    finally:
        sys.modules["scd"] = real


def test_planted_bugs_fail_their_part_s_grader_by_name_and_change_the_student_s_own_runs(tmp_path, tiny_domain):
    """Each bug fails its part's grader (pytest -m partN) with a message naming the quantity; a
    schedule bug and a loss bug also change what distill.py does in the copy: another checkpoint
    chosen, another loss trained on (the scripts call the very functions the student writes)."""
    copy = tmp_path / "k"
    exercise.main(copy)
    ref = (ROOT / "scd.py").read_text()
    for name, (part, good, bad, words) in BUGS.items():
        assert ref.count(good) == 1, name
        failed = grade_here(ref.replace(good, bad), copy / "tests" / "test_scd.py", f"part{part}")
        assert failed and any(words in m for m in failed.values()), (name, failed)
    # the runs: a teacher trail with the correct code, then SCD with it and with a schedule bug and a loss bug, each
    # in a copy whose scd.py it is
    bug = lambda name: ref.replace(BUGS[name][1], BUGS[name][2])
    sources = {"correct": ref, "argmax": bug("argmax for the argmin"), "t": bug("T instead of T squared")}
    for label, source in sources.items():
        exercise.main(tmp_path / label)
        (tmp_path / label / "scd.py").write_text(source)
    distill = [f"--data={tiny_domain}", "--preset=student", f"--teacher_dir={tmp_path / 'teacher'}", "--method=scd",
               "--stages=2", "--steps_per_stage=3", "--probe_size=8", "--probe_resamples=0", "--pool_start=0",
               "--temperature=2", "--log_every=1000"]
    runs = forked.run([forked.job(tmp_path / "correct", "train_teacher.py", f"--data={tiny_domain}", "--preset=student",
                                  "--epochs=1", "--ckpt_per_epoch=4", "--probe_size=8", "--log_every=1000",
                                  f"--out_dir={tmp_path / 'teacher'}")]
                      + [forked.job(tmp_path / label, "distill.py", *distill, f"--out_dir={tmp_path / label / 'run'}",
                                    after=label == "correct") for label in sources])
    assert all(code == 0 for code, _, _ in runs), [err[-2000:] for _, _, err in runs]
    stages = lambda label: json.loads((tmp_path / label / "run" / "schedule.json").read_text())["stages"]
    ckpt, val_loss = ({label: [row[key] for row in stages(label)] for label in sources} for key in ("ckpt", "val_loss"))
    assert ckpt["argmax"] != ckpt["correct"]  # another checkpoint chosen
    assert val_loss["t"] != val_loss["correct"]  # another loss: other weights


def test_a_plausible_wrong_answer_gets_expected_and_got(tmp_path):
    exercise.main(tmp_path / "b")
    ref = (ROOT / "scd.py").read_text()
    (tmp_path / "b" / "scd.py").write_text(ref.replace("torch.log(l_s) - torch.log(l_c)", "torch.log(l_c) - torch.log(l_s)"))
    msg = grade(tmp_path / "b", "tests/test_scd.py", "-k", "aw_weight_by_hand")["test_aw_weight_by_hand_and_constant"]
    assert "expected l_S / (l_S + l_c) = [0.5, 0.75, 0.25], got [0.5, 0.25" in msg
