"""
The method's core as small pure functions: no I/O, no globals. Each docstring names the
equation of METHOD.md it implements and maps its symbols to arguments.
"""


# -----------------------------------------------------------------------------
# METHOD.md section 1: why a student can beat its teacher

def decompose(r_teacher, r_sft, r_student=None):
    """The SFS/TFS decomposition of METHOD.md section 1, for one set of examples.

        R_S - R_T = p(TFS) E[r_S - r_T | TFS] - p(SFS) E[r_T - r_S | SFS]
                    (deficit)                  (advantage)

    r_teacher, r_sft: per-example risks (0/1 errors, or losses) of the fine-tuned teacher T
    and the SFT student S. TFS = examples where T is better (r_T < r_S); SFS = where S is
    better; ties are in neither and add nothing to either side.
    r_student: optionally a distilled student D on the same examples: how much of S's TFS
    deficit D recovers (1 = as good as T on TFS) and how much of S's SFS advantage D keeps
    (1 = as good as S on SFS).
    """
    n = len(r_teacher)
    assert n == len(r_sft) > 0, "risk lists must be non-empty and of equal length"
    tfs = [i for i in range(n) if r_teacher[i] < r_sft[i]]
    sfs = [i for i in range(n) if r_sft[i] < r_teacher[i]]
    out = dict(n=n, p_tfs=len(tfs) / n, p_sfs=len(sfs) / n,
               R_teacher=sum(r_teacher) / n, R_sft=sum(r_sft) / n,
               deficit=sum(r_sft[i] - r_teacher[i] for i in tfs) / n,     # p(TFS) * E[r_S - r_T | TFS]
               advantage=sum(r_teacher[i] - r_sft[i] for i in sfs) / n)   # p(SFS) * E[r_T - r_S | SFS]
    if r_student is not None:
        assert len(r_student) == n, "the distilled student's risks must cover the same examples"
        d_def = sum(r_student[i] - r_teacher[i] for i in tfs) / n  # D's deficit on S's TFS
        d_adv = sum(r_teacher[i] - r_student[i] for i in sfs) / n  # D's advantage on S's SFS
        out.update(R_student=sum(r_student) / n, student_deficit=d_def, student_advantage=d_adv,
                   recovered=1 - d_def / out["deficit"] if out["deficit"] else float("nan"),
                   kept=d_adv / out["advantage"] if out["advantage"] else float("nan"))
    return out


def decompose_records(teacher, sft, student=None):
    """decompose() per subdomain and overall, from evaluate()'s per-example records
    (risk = 0/1 error). -> {subdomain or 'all': decomposition}."""
    def risks(recs, keep):
        return [1.0 - r["correct"] for r in recs if keep(r)]
    subs = sorted({r["subdomain"] for r in teacher})
    out = {}
    for s in subs + ["all"]:
        keep = (lambda r: True) if s == "all" else (lambda r, s=s: r["subdomain"] == s)
        out[s] = decompose(risks(teacher, keep), risks(sft, keep), None if student is None else risks(student, keep))
    return out
