"""
The method's core as small pure functions: no I/O, no globals. Each docstring names the
equation of METHOD.md (this repository's description of the method) it implements and
maps its symbols to arguments.
"""
import torch
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


# -----------------------------------------------------------------------------
# METHOD.md section 2.4: the per-example loss

def token_kl(p_logits, q_logits, temperature=1.0):
    """KL(p || q) at each position: sum_v p(v) (log p(v) - log q(v)), in float32.
    p_logits, q_logits: (N, V) logits (or log-probabilities) at N answer positions -> (N,):
    one value per position, summed over the vocabulary only (callers average over tokens)."""
    log_p = F.log_softmax(p_logits.float() / temperature, -1)
    log_q = F.log_softmax(q_logits.float() / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def distill_kl(teacher_logits, student_logits, direction="forward", temperature=1.0):
    """KL(p_{c_k} || p_student) per answer token (forward, the default), or the reverse
    KL(p_student || p_{c_k}). Times temperature**2, so gradients keep their size as the
    temperature changes (Hinton et al., 2015)."""
    p, q = (teacher_logits, student_logits) if direction == "forward" else (student_logits, teacher_logits)
    return token_kl(p, q, temperature) * temperature ** 2


def per_example(values, mask):
    """Each example's mean of per-token values over its answer tokens (a mean, not a sum).
    values (N,): one per True position of mask, in row-major order (example 0's first);
    mask (B, T) bool -> (B,) float32; an example with no answer token gets 0."""
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(mask.size(0), device=values.device).index_add_(0, rows, values.float())
    return sums / mask.sum(1).clamp(min=1)


def gold_ce(logits, y, mask, chunk=0):
    """CE(gold y_i; p) per example: the mean over example i's answer tokens, in float32.
    logits (N, V) at mask's True positions (row-major), y (B, T) targets -> (B,).
    chunk: answer positions per piece (by_chunks; 0: one piece)."""
    token_ce = lambda lg, t: F.cross_entropy(lg.float(), t, reduction="none")
    return per_example(by_chunks(token_ce, logits, y[mask], chunk=chunk), mask)


def by_chunks(fn, *rows, chunk=0):
    """fn over consecutive pieces of `chunk` rows of (N, ...) tensors, concatenated: the values
    of fn(*rows), with no more than chunk x V float32 values of a per-token loss alive at once.
    At a 128k vocabulary the float32 copies of the logits are the memory; with gradients each
    piece is recomputed in the backward pass instead of kept. chunk=0 (or >= N): one piece."""
    n = rows[0].size(0)
    if not chunk or chunk >= n:
        return fn(*rows)
    grad = torch.is_grad_enabled() and any(r.requires_grad for r in rows)
    piece = (lambda *r: checkpoint(fn, *r, use_reentrant=False)) if grad else fn
    return torch.cat([piece(*(r[i:i + chunk] for r in rows)) for i in range(0, n, chunk)])


def aw_weights(anchor_loss, ckpt_loss, floor=1e-8):
    """Adaptive Weighting: w_i = sigmoid(log(l_S(x_i) / l_{c_k}(x_i))) = l_S / (l_S + l_c).

    anchor_loss = l_S(x_i): the SFT student's stored loss on example i (fixed);
    ckpt_loss = l_{c_k}(x_i): the chosen teacher checkpoint's gold CE on example i.
    Converged models give losses of exactly 0 in float32, where the ratio is 0/0: both
    losses are floored at `floor` first, so equal losses (two zeros included) give 0.5 and
    a zero against a real loss gives the limit, 0 or 1. Returned detached: the weights are
    constants, gradients flow only through the student.
    """
    l_s, l_c = anchor_loss.float().clamp_min(floor), ckpt_loss.float().clamp_min(floor)
    return torch.sigmoid(torch.log(l_s) - torch.log(l_c)).detach()


def scd_loss(kl, ce, w):
    """L_i = w_i KL(p_{c_k} || p_student)_i + (1 - w_i) CE(y_i; p_student)_i, batch mean.
    kl, ce: per-example means over answer tokens (B,); w: scalar alpha or (B,) AW weights."""
    return (w * kl + (1 - w) * ce).mean()


def distill_loss(student_logits, teacher_logits, y, mask, alpha=0.5, anchor_loss=None,
                 direction="forward", temperature=1.0, chunk=0):
    """One batch of section 2.4 -> (loss, terms). Logits (N, V) at mask's answer positions.

    teacher_logits=None is SFT (w = 0). anchor_loss: l_S of the batch's examples, (B,), for
    AW; None uses the fixed w = alpha. terms holds the per-example ce, kl and w (for logs
    and for naming the term that went bad). chunk: answer positions per piece of the KL and
    both CEs (by_chunks; 0: one piece).
    """
    ce = gold_ce(student_logits, y, mask, chunk)                   # CE(y_i; p_student)
    if teacher_logits is None:
        return ce.mean(), dict(ce=ce, kl=torch.zeros_like(ce), w=torch.zeros_like(ce))
    teacher_logits = teacher_logits.detach()  # the target is a constant
    kl_fn = lambda t, s: distill_kl(t, s, direction, temperature)  # KL(p_{c_k} || p_student) per token
    kl = per_example(by_chunks(kl_fn, teacher_logits, student_logits, chunk=chunk), mask)
    if anchor_loss is None:
        w = alpha * torch.ones_like(ce)  # the fixed weight
    else:                                # AW: l_S against the checkpoint's own gold CE
        w = aw_weights(anchor_loss, gold_ce(teacher_logits, y, mask, chunk))
    return scd_loss(kl, ce, w), dict(ce=ce, kl=kl, w=w)


# -----------------------------------------------------------------------------
# METHOD.md sections 2.1 and 2.3: the best teacher, and which checkpoint each stage distils from

def best_checkpoint(val_losses):
    """T*: the checkpoint with the lowest validation loss (the earliest on a tie)."""
    return min(range(len(val_losses)), key=val_losses.__getitem__)


def scd_checkpoint(pieces, student_term="flipped", weight=1.0, prev=None, monotone=False):
    """Section 2.3, the choice of stage k's checkpoint, whole:

        c_k = argmin_c  weight * KL(p_T* || p_c) + D(p_student, p_c)

    each term the mean over the probe's answer tokens. D, the student term, is by default
    ("flipped") KL(p_c || p_student); "as_written" is KL(p_student || p_c), the direction the
    paper's notes write (METHOD.md section 2.3 says why the default differs). weight: the
    T* term's weight, lambda (1: the paper's plain sum; --schedule_weight). monotone with prev
    (the previous stage's choice): no candidate before prev (--monotone).

    pieces: the probe's answer tokens, whole or a few positions at a time (at a 128k
    vocabulary no (tokens x V) array of the probe is ever made: distill.py's pieces come from
    scale.probe_pieces); each piece is (best_lp, ckpt_lps, student_lp): T*'s, every
    candidate's (a list, or any iterable made one at a time) and the current student's
    log-probs, each (n, V). The whole probe as one piece: [(best_lp, ckpt_lps, student_lp)].
    -> (c_k, kl_best, kl_student): the index of the smallest weighted sum (the earliest on a
    tie), and both terms of every candidate, unweighted, as the run logs them.
    """
    tokens_best, tokens_student = [], []  # per candidate: its per-token terms, piece after piece
    for best_lp, ckpt_lps, student_lp in pieces:
        for c, ckpt_lp in enumerate(ckpt_lps):
            if c == len(tokens_best):
                tokens_best.append([]), tokens_student.append([])
            b, s = schedule_terms(best_lp, ckpt_lp, student_lp, student_term)
            tokens_best[c].append(b), tokens_student[c].append(s)
    kl_best = [torch.cat(b).mean().item() for b in tokens_best]           # KL(p_T* || p_c), mean over the probe
    kl_student = [torch.cat(s).mean().item() for s in tokens_student]     # D(p_student, p_c), likewise
    score = torch.tensor([weight * b for b in kl_best]) + torch.tensor(kl_student)
    if monotone and prev is not None:
        score[:prev] = float("inf")  # never back before the previous stage's choice
    return int(score.argmin()), kl_best, kl_student


def schedule_terms(best_lp, ckpt_lp, student_lp, student_term="flipped"):
    """One candidate c's two terms at each probe token: KL(p_T* || p_c), and the student term,
    KL(p_c || p_student) ("flipped", the default) or KL(p_student || p_c) ("as_written").
    best_lp, ckpt_lp, student_lp: (N, V) log-probs at N probe tokens -> two (N,) tensors, one
    value per token (scd_checkpoint averages them over the probe)."""
    p, q = (student_lp, ckpt_lp) if student_term == "as_written" else (ckpt_lp, student_lp)
    return token_kl(best_lp, ckpt_lp), token_kl(p, q)


def fixed_checkpoint(policy, stage, n_stages, best):
    """The fixed schedules, by index into the pool. kd: T* (best) at every stage. cd: stages
    walk evenly spaced checkpoints from the first to T*, rounded to the nearest; a single
    stage has no room to walk and distils from T*."""
    if policy == "kd" or n_stages == 1:
        return best
    assert policy == "cd", f"unknown fixed schedule {policy!r}"
    return round(stage * best / (n_stages - 1))


def compress_logprobs(lp, k):
    """Keep a checkpoint's probe log-probs (N, V) small: the k largest per token, and the
    rest of the mass, which dense_logprobs spreads evenly over the other V - k tokens.
    -> (values (N, k), indices (N, k)). At GPT-2's vocabulary this stores k/50257 of the
    dense array; the KL error it causes is measured in the tests and the README."""
    values, indices = lp.float().topk(min(k, lp.size(-1)), dim=-1)
    return values, indices.int()


def dense_logprobs(values, indices, vocab_size):
    """The inverse of compress_logprobs: (N, V) log-probs, the tail mass spread evenly."""
    N, k = values.shape
    if k == vocab_size:
        return torch.empty(N, vocab_size, device=values.device).scatter_(1, indices.long(), values)
    tail = (1 - values.exp().sum(-1, keepdim=True)).clamp_min(1e-12) / (vocab_size - k)  # (N, 1)
    return tail.log().expand(N, vocab_size).clone().scatter_(1, indices.long(), values)


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

    -> dict: n; p_tfs, p_sfs (the shares of TFS and SFS examples); R_teacher, R_sft (the mean
    risks); deficit, advantage (the two sides above, each already multiplied by its share, so
    R_sft - R_teacher = deficit - advantage). With r_student also R_student; student_deficit,
    student_advantage (D's, on S's TFS and SFS examples); recovered = 1 - student_deficit /
    deficit and kept = student_advantage / advantage, each NaN (float("nan")) where its
    denominator is 0 (no TFS, or no SFS, example).
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
