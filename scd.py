"""
The method's core as small pure functions: no I/O, no globals. Each docstring names the
equation of METHOD.md it implements and maps its symbols to arguments.
"""
import torch
from torch.nn import functional as F


# -----------------------------------------------------------------------------
# METHOD.md section 2, step 4: the per-example loss

def token_kl(p_logits, q_logits, temperature=1.0, n_real=None):
    """KL(p || q) at each position: sum_v p(v) (log p(v) - log q(v)), in float32.

    p_logits, q_logits: (N, V) logits at the N answer positions. n_real: the true vocabulary
    size when V is padded for speed (padding rows are not tokens, so they are cut before
    the softmax). Returns (N,).
    """
    p_logits, q_logits = p_logits[:, :n_real].float() / temperature, q_logits[:, :n_real].float() / temperature
    log_p, log_q = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def distill_kl(teacher_logits, student_logits, direction="forward", temperature=1.0, n_real=None):
    """KL(p_{c_k} || p_student) per answer token (forward, the default), or the reverse
    KL(p_student || p_{c_k}). Scaled by temperature**2 so gradients keep their size (Hinton et al.)."""
    p, q = (teacher_logits, student_logits) if direction == "forward" else (student_logits, teacher_logits)
    return token_kl(p, q, temperature, n_real) * temperature ** 2


def per_example(values, mask):
    """Mean of per-token values (N,) over each example's answer tokens; mask (B, T) -> (B,)."""
    rows = mask.nonzero()[:, 0]
    return torch.zeros(mask.size(0), device=values.device).index_add_(0, rows, values) / mask.sum(1).clamp(min=1)


def gold_ce(logits, y, mask):
    """CE(gold y_i; p) per example: the mean over example i's answer tokens, in float32.
    logits (N, V) at mask's True positions (row-major), y (B, T) targets -> (B,)."""
    return per_example(F.cross_entropy(logits.float(), y[mask], reduction="none"), mask)


def aw_weights(anchor_loss, ckpt_loss):
    """Adaptive Weighting: w_i = sigmoid(log(l_S(x_i) / l_{c_k}(x_i))) = l_S / (l_S + l_c).

    anchor_loss = l_S(x_i): the SFT student's stored loss on example i (fixed);
    ckpt_loss = l_{c_k}(x_i): the chosen teacher checkpoint's gold CE on example i.
    Returned detached: the weights are constants, gradients flow only through the student.
    """
    return torch.sigmoid(torch.log(anchor_loss) - torch.log(ckpt_loss)).detach()


def scd_loss(kl, ce, w):
    """L_i = w_i KL(p_{c_k} || p_student)_i + (1 - w_i) CE(y_i; p_student)_i, batch mean.
    kl, ce: per-example means over answer tokens (B,); w: scalar alpha or (B,) AW weights."""
    return (w * kl + (1 - w) * ce).mean()


# -----------------------------------------------------------------------------
# METHOD.md section 2, step 3: which teacher checkpoint each stage distils from

def student_term(student_lp, ckpt_lp, direction="flipped"):
    """The schedule's second term on the probe, a mean over its answer tokens.
    as_written: KL(p_student || p_c), as METHOD.md section 2.3 writes it;
    flipped: KL(p_c || p_student), our default (the README says why).
    Inputs are (N, V) log-probabilities; log_softmax leaves them unchanged inside token_kl."""
    p, q = (student_lp, ckpt_lp) if direction == "as_written" else (ckpt_lp, student_lp)
    return token_kl(p, q).mean().item()


def choose_checkpoint(policy, stage, n_stages, best, kl_best=None, kl_student=None, prev=None, monotone=False):
    """The teacher checkpoint c_k for stage k (0-based), by index into the candidate pool.

    scd: c_k = argmin_c KL(p_T* || p_c) + KL(p_student || p_c); kl_best[c] and kl_student[c]
         are the two terms for each candidate c, averaged over the probe's answer tokens
         (kl_student in either direction, see student_term).
         monotone=True: only candidates at or after prev (the previous stage's choice).
    kd:  T* (best) at every stage.
    cd:  a fixed order: stages walk evenly spaced checkpoints from the first to T*.
    """
    if policy == "kd":
        return best
    if policy == "cd":  # one stage has no room to walk: it distils from T*
        return best if n_stages == 1 else round(stage * best / (n_stages - 1))
    assert policy == "scd", f"unknown schedule policy {policy!r}"
    score = torch.as_tensor(kl_best) + torch.as_tensor(kl_student)
    if monotone and prev is not None:
        score[:prev] = float("inf")
    return int(score.argmin())


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
