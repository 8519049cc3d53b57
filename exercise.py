"""
Turn a checkout into a course assignment: a copy in which the method's functions in scd.py
keep their signatures and docstrings (which carry the equations) but raise
NotImplementedError. The reference is this repository itself; the copy is made from it,
never kept beside it, so the two cannot drift apart.

    python exercise.py --out ../scd-assignment      # the students' starting point
    cd ../scd-assignment && python -m pytest -q tests/test_scd.py   # the grader

The tests that check the reference grade the students' code: each fails with
NotImplementedError until its function is written, and with expected-vs-got on a
hand-sized case while it is wrong. The rest of the suite and the scripts run on the
students' implementation unchanged.
"""
import argparse
import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent
EXERCISES = ("token_kl", "distill_kl", "per_example", "gold_ce", "aw_weights", "scd_loss", "distill_loss",
             "scd_checkpoint", "fixed_checkpoint", "decompose")
LEAVE_OUT = (".git", "runs", "__pycache__", ".pytest_cache", ".ipynb_checkpoints",
             "exercise.py", "test_exercise.py", "test_mutants.py")  # the last two check the reference's own text


def blank(source, names=EXERCISES):
    """scd.py's source with the bodies of `names` replaced by raise NotImplementedError."""
    lines = source.splitlines(keepends=True)
    funcs = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name in names]
    missing = set(names) - {f.name for f in funcs}
    assert not missing, f"scd.py has no function {sorted(missing)}"
    for f in sorted(funcs, key=lambda f: f.lineno, reverse=True):  # bottom up: line numbers stay valid
        doc = f.body[0]
        assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), f"{f.name} needs a docstring"
        indent = " " * f.body[0].col_offset
        lines[doc.end_lineno:f.end_lineno] = [f'{indent}raise NotImplementedError("{f.name}: write it (see its docstring)")\n']
    return "".join(lines)


def main(out):
    out = Path(out)
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new folder")
    shutil.copytree(ROOT, out, ignore=lambda d, names: [n for n in names if n in LEAVE_OUT])
    (out / "scd.py").write_text(blank((ROOT / "scd.py").read_text(encoding="utf-8")), encoding="utf-8")
    print(f"{out}: {len(EXERCISES)} functions of scd.py to write ({', '.join(EXERCISES)}); "
          f"grade with: cd {out} && python -m pytest -q tests/test_scd.py")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Make the students' copy of this repository: scd.py's method functions blanked.")
    ap.add_argument("--out", required=True, help="a new folder for the copy")
    main(ap.parse_args().out)
