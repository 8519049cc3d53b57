"""
The course hand-out: a copy of the reference in which the method's functions in scd.py keep
their signatures and docstrings (which carry the equations) but raise NotImplementedError.
The copy holds what the assignment needs and nothing of the lab: the reference files, their
tests, the handout notebook, METHOD.md, the default domain and the committed bases. It is
made from this repository, never kept beside it, so the two cannot drift apart.

    python -m lab.exercise --out ../scd-assignment                 # the students' starting point
    cd ../scd-assignment && python -m pytest -q tests/test_scd.py  # the grader

The tests that check the reference grade the students' code: each fails with
NotImplementedError until its function is written, and with expected-vs-got on a
hand-sized case while it is wrong. SFT (train_teacher.py) and evaluation do not use the
blanked functions, so the teacher and the SFT student can be trained before part 1.
"""
import argparse
import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = ("token_kl", "distill_kl", "per_example", "gold_ce", "aw_weights", "scd_loss", "distill_loss",
             "scd_checkpoint", "fixed_checkpoint", "decompose")
REFERENCE = ("model.py", "data.py", "scd.py", "train_teacher.py", "distill.py", "plumbing.py", "scale.py", "hf.py", "METHOD.md",
             "LICENSE", "requirements.txt", "requirements-test.txt", "assets", "data/default", "notebooks/assignments.ipynb")
# the reference's tests; the lab's (comparison, statistics, generators, benchmarks, mutants, this kit) stay behind
TESTS = ("conftest.py", "test_scd.py", "test_chunks.py", "test_data.py", "test_model.py", "test_train.py", "test_distill.py",
         "test_plumbing.py", "test_llama.py", "test_ddp.py", "test_scale.py")
README = """# Scheduled Checkpoint Distillation: the assignment

Open `notebooks/assignments.ipynb`: it has the six parts, their commands and questions.
`METHOD.md` describes the method; the docstrings of `scd.py` map each equation to its
arguments. The functions to write raise `NotImplementedError`.

    pip install -r requirements.txt
    python -m pytest -q tests/test_scd.py      # the grader

What runs before you write anything: the teacher and the SFT student
(`python train_teacher.py`, then `python train_teacher.py --preset student --out_dir
runs/student_sft`; 6 to 8 minutes together on a 2-core CPU). `distill.py` needs parts 1 to 3.
"""


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
    for name in REFERENCE + tuple(f"tests/{t}" for t in TESTS):
        src, dst = ROOT / name, out / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    (out / "scd.py").write_text(blank((ROOT / "scd.py").read_text(encoding="utf-8")), encoding="utf-8")
    (out / "README.md").write_text(README, encoding="utf-8")
    print(f"{out}: {len(EXERCISES)} functions of scd.py to write ({', '.join(EXERCISES)}); "
          f"grade with: cd {out} && python -m pytest -q tests/test_scd.py")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Make the students' copy of the reference: scd.py's method functions blanked.")
    ap.add_argument("--out", required=True, help="a new folder for the copy")
    main(ap.parse_args().out)
