"""
The course hand-out: a copy of the reference in which the method's functions in scd.py keep
their signatures and docstrings (which carry the equations) but raise NotImplementedError.
The copy holds what the assignment needs and nothing of the lab: the reference files, their
tests, the handout notebook, METHOD.md, the default domain and the committed bases. It is
made from this repository, never kept beside it, so the two cannot drift apart.

    python -m lab.exercise --out ../scd-assignment --instructor ../instructor.md   # the copy; the notes stay out of it
    cd ../scd-assignment && python -m pytest -q -m part1 tests/test_scd.py          # part 1's grader

The tests that check the reference grade the students' code, one pytest marker per part of
the handout: each fails with NotImplementedError until its function is written, and with
expected-vs-got on a hand-sized case while it is wrong. The blanked functions are the ones the
scripts run (SFT's loss, evaluation's means, the distillation loss, every stage's choice), so
a student's bug shows in the student's runs too; nothing in the copy is a twin of one.
"""
import argparse
import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the functions to write, by part of the handout: each is the one the scripts call for its step (gold_ce is SFT's
# loss, per_example what evaluation averages, scd_checkpoint every stage's choice), so a bug shows in the student's runs
EXERCISES = dict(token_kl=1, distill_kl=1, per_example=1, gold_ce=1, aw_weights=2, scd_loss=2, distill_loss=2,
                 schedule_terms=3, scd_checkpoint=3, fixed_checkpoint=3, decompose=3)
REFERENCE = ("model.py", "data.py", "scd.py", "train_teacher.py", "distill.py", "plumbing.py", "scale.py", "METHOD.md",
             "LICENSE", "requirements.txt", "requirements-test.txt", "assets", "data/default", "notebooks/assignments.ipynb")
# the reference's tests; the lab's (comparison, statistics, generators, benchmarks, mutants, this kit) stay behind
TESTS = ("conftest.py", "test_scd.py", "test_chunks.py", "test_data.py", "test_model.py", "test_train.py", "test_distill.py",
         "test_plumbing.py", "test_llama.py", "test_ddp.py", "test_scale.py")
README = """# Scheduled Checkpoint Distillation: the assignment

Open the handout, `notebooks/assignments.ipynb`: its six parts, their commands and questions.
`METHOD.md` describes the method; the docstrings of `scd.py` give each function's equation,
shapes, return values and conventions: all that the grader checks. The functions to write
raise `NotImplementedError`.

    pip install -r requirements.txt                   # CPU is enough
    jupyter notebook notebooks/assignments.ipynb       # the handout
    python -m pytest -q -m part1 tests/test_scd.py    # part 1's grader (part2, part3 likewise)
    python -m pytest -q tests/test_scd.py             # the whole grader

The functions you write are the ones the scripts run, so nothing trains before part 1:
`gold_ce` is the teacher's and the SFT student's loss, `per_example` what evaluation averages.
A script that meets a function not yet written says which, and in which part, in one line.
"""

INSTRUCTOR = """# Instructor's notes (not in the students' copy)

## Setup

    python -m lab.exercise --out scd-assignment     # in the full repository: the copy to hand out

Nothing in the copy points outside it. Run the reference figures once in the full repository
(`python reproduce.py`, about 25 minutes on a 2-core CPU): part 3's four runs are its KD, CD,
SCD and SCD+AW with the same recipe, so a correct solution reproduces its schedules and test
figures on the same machine (`report/results.md` there).

## Collecting and grading

Students hand in their `scd.py` and the notebook with their answers. Grade each `scd.py` in a
fresh copy (never with the tests a student may have changed): copy it over the copy's
`scd.py`, then `python -m pytest -q -m part1 tests/test_scd.py` (part2, part3): the points of
a part's code are the share of its tests passed. The written answers carry the rest.

## Rubric

| part | code (tests) | written questions |
| --- | --- | --- |
| 1 | 10: `-m part1` | 10: Q1 4, Q2 3, Q3 3 |
| 2 | 10: `-m part2` | 10: Q1 4, Q2 3, Q3 3 |
| 3 | 10: `-m part3` | 10: Q1 4, Q2 3, Q3 3 (figures from the student's own runs, the split named) |
| 4 | - | 15: Q1 7, Q2 8 |
| 5 | - | 15: Q1 4, Q2 6, Q3 5 |
| 6 | - | 10: hypothesis stated first 3, decided on validation 4, test read once and reported even if null 3 |

## Answer key

Part 1. Q1: KL(p || q) = 0.9 ln(0.9/0.5) + 0.1 ln(0.1/0.5) = 0.368; KL(q || p) = 0.5 ln(0.5/0.9)
+ 0.5 ln(0.5/0.1) = 0.511. `distill_kl` uses the forward KL(p_teacher || p_student) by default.
KL(q || p), the student first, weighs each token by the student's probability, so it charges
the student most for mass where the teacher has little (log q/p is large there). Q2: the
gradient of the softened KL scales as 1/T^2; multiplying by T^2 keeps its size as T changes,
so the balance with the gold CE does not move with T (Hinton et al., 2015). Q3: bf16 keeps 8
bits of mantissa: a log-softmax over thousands of tokens and a KL that is a small difference
of nearly equal terms lose most of their digits; float32 keeps the loss and its gradient exact
enough, and costs little next to the matmuls.

Part 2. Q1: w = 3 / (3 + 1) = 0.75, and 0.25 the other way. The first is TFS-like (the SFT
student does worse than the checkpoint): the student learns mostly from the teacher's KL; the
second is SFS-like and it learns mostly from the gold answer. Q2: 0/0 is NaN; a NaN weight
makes the loss NaN and training on it destroys the weights (the scripts stop the run at the
first non-finite loss). Flooring both losses gives l / (l + l) = 0.5 for two zeros, the limit
of equal losses: neither model is better there, so neither signal should win. Q3: w is a
per-example constant of the data (the stored anchor and the fixed checkpoint's loss);
gradients through it would push the teacher's logits, which are targets, and would let the
loss fall by moving the weight rather than by the student learning.

Part 3. Q1: on the reference's main command (`report/results.md` there) SCD and SCD+AW both
chose the checkpoint before T* at every stage (4 -> 4 -> 4 -> 4, T* = 5), while CD walks evenly
to T* by construction (2 -> 3 -> 4 -> 5). A good answer reads the teacher steps from
`schedule.json` and says that the schedule does not walk forward here and never reaches T*. Q2: what decides is each term's spread across the candidates, not its size. On the reference's
run, at stage 0 the student term is about 6.7 nats for every candidate but spreads over 0.07,
against 0.09 for KL(p_T* || p_c): both count; at the last stage the student term spreads over
0.05 and favours the checkpoint the student has just been trained on, and KL(p_T* || p_c)
(0.09, zero at T*) does not outweigh it. A good answer computes the spreads from
`schedule.json` and explains them: the student term measures how far each candidate is from
where the student now is, the other how far it is from the best teacher. Q3: any claim must be
made on validation (each stage's `val_acc`) and confirmed once on test; one seed is one run.

Part 4. Q1: the two schedules and their validation accuracy, read from the runs. Q2: on the
hand case, the as-written term KL(p_student || p_c) charges the sharp checkpoint 2.08 nats
(log(0.25/0.01) on each of the uniform student's three wrong tokens), the flipped term 1.22:
as written, sharp (late) checkpoints look far from a diffuse student, so the schedule stays on
early, diffuse checkpoints.

Part 5. Q1 and Q2 come from the cell's output on the student's runs; a good answer compares
`kept` for SCD and SCD+AW on the subdomain of largest SFS share and says that a difference of
a few examples on one seed is within seed noise (the reference's five- and sixteen-seed
reports give the size of that noise). Q3: on a mislabelled example the gold answer is wrong;
the teacher, if it did not memorise the noise, has a high loss l_c on it, so w = l_S / (l_S +
l_c) falls and the student is pushed towards the wrong gold answer; where the SFT student
memorised the noise (low l_S) w falls further. AW therefore trusts the noisy label most where
the teacher disagrees with it, which is not what one wants on noisy data.

Part 6. Open; grade the method (hypothesis first, validation for the decision, test once).
"""


# METHOD.md's pointers to files the copy does not have, made to point inside it (the copy's METHOD.md only)
METHOD_IN_COPY = {
    "command-line option, and `docs/design.md` (its table of choices) says which default we picked\nand on what evidence "
    "(validation figures only).":
        "command-line option whose default was chosen on validation figures only.",
    "chosen on validation too (`docs/results.md`).": "chosen on validation too.",
    " `docs/choices.md` declares how\nthese choices are decided again on validation, and what it found.": "",
    "`python reproduce.py` draws all three in its report (`report/grid/results.md` for the grid).":
        "Parts 3 and 5 of the handout (`notebooks/assignments.ipynb`) read all three from your runs.",
    "The default domain has\nthe first (20% of its training answers are wrong; `docs/design.md`); `--data default:0` is the\n"
    "control without it. Sparse parity has the last (`docs/parity.md`).":
        "The default domain has\nthe first: one training answer in five is wrong (`\"noisy\": true` in `data/default/train.jsonl`).",
    "the default was decided on validation (`docs/results.md`).": "the default was decided on validation.",
    "is this project's addition (`python reproduce.py --grid true`).": "is this project's addition (`distill.py --aw true` with each\n`--method`).",
    "`--base none` in `reproduce.py` is the same recipe from a\n  random initialisation, for comparison.":
        "`--init_from ''` is the same recipe from a\n  random initialisation, for comparison.",
    "validation. `reproduce.py --protocol paper`. The alternative, `--protocol k4`, spends the same\n  budget":
        "validation. The alternative, the default of `distill.py` (`--stages 4`), spends the same\n  budget",
    " (`lab.domains.corpus`, `python -m lab.pretrain`)": "",
}
OUTSIDE = ("README", "reproduce.py", "report/", "docs/", "lab/", "lab.", "LOG.md")  # what the copy's documents may not name


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
        lines[doc.end_lineno:f.end_lineno] = [f'{indent}raise NotImplementedError("{f.name}: write it (part {names[f.name]} '
                                              f'of the handout; see its docstring)")\n']
    return "".join(lines)


def main(out, instructor=""):
    out = Path(out)
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new folder")
    for name in REFERENCE + tuple(f"tests/{t}" for t in TESTS):
        src, dst = ROOT / name, out / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
    (out / "scd.py").write_text(blank((ROOT / "scd.py").read_text(encoding="utf-8")), encoding="utf-8")
    (out / "README.md").write_text(README, encoding="utf-8")
    method = (ROOT / "METHOD.md").read_text(encoding="utf-8")
    for old, new in METHOD_IN_COPY.items():
        assert old in method, f"METHOD.md no longer has {old[:40]!r}: update METHOD_IN_COPY"
        method = method.replace(old, new)
    (out / "METHOD.md").write_text(method, encoding="utf-8")
    with open(out / "requirements.txt", "a", encoding="utf-8") as f:
        f.write("notebook  # to open the handout\n")
    if instructor:
        Path(instructor).write_text(INSTRUCTOR, encoding="utf-8")
    print(f"{out}: {len(EXERCISES)} functions of scd.py to write ({', '.join(EXERCISES)}); "
          f"grade with: cd {out} && python -m pytest -q -m part1 tests/test_scd.py (part2, part3)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Make the students' copy of the reference: scd.py's method functions blanked.")
    ap.add_argument("--out", required=True, help="a new folder for the copy")
    ap.add_argument("--instructor", default="", help="also write the instructor's notes (rubric, answer key) to this file")
    a = ap.parse_args()
    main(a.out, a.instructor)
