"""The method's equations (METHOD.md), each checked on a case small enough to verify by hand.
Expected values come from plain-Python formulas here, never from the code under test, so a
plausible one-line bug (a swapped direction, an inverted ratio, a missing factor) fails
with the expected and the computed value side by side."""
import math

import pytest
import torch
from torch.nn import functional as F

import scd


def kl(p, q):
    """KL(p || q) of two probability lists, by the textbook formula."""
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def logits(*rows):
    """Probability rows -> logits whose softmax gives them back."""
    return torch.tensor(rows, dtype=torch.float64).log().float()


TEACHER, STUDENT = [0.9, 0.1], [0.5, 0.5]


def choose(best, candidates, student, *args, **kw):
    """scd.scd_checkpoint on a probe scored whole: one piece."""
    return scd.scd_checkpoint([(best, candidates, student)], *args, **kw)


# --- section 2.4: the distillation KL -------------------------------------------------

@pytest.mark.part1
def test_token_kl_matches_torch_kl_div_and_is_zero_on_itself():
    torch.manual_seed(0)
    p, q = torch.randn(7, 11), torch.randn(7, 11)
    ref = F.kl_div(F.log_softmax(q, -1), F.log_softmax(p, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(scd.token_kl(p, q), ref)
    torch.testing.assert_close(scd.token_kl(p, p), torch.zeros(7), atol=1e-6, rtol=0)


@pytest.mark.part1
def test_forward_kl_is_teacher_to_student_and_reverse_the_other_way():
    t, s = logits(TEACHER), logits(STUDENT)
    # forward KL(p_c || p_student) = 0.9 ln 1.8 + 0.1 ln 0.2 = 0.3681; reverse = 0.5108
    assert scd.distill_kl(t, s).item() == pytest.approx(kl(TEACHER, STUDENT), abs=1e-5)
    assert scd.distill_kl(t, s, "reverse").item() == pytest.approx(kl(STUDENT, TEACHER), abs=1e-5)


@pytest.mark.part1
def test_temperature_softens_both_and_scales_by_its_square():
    teacher, student, T = [0.9, 0.1], [0.3, 0.7], 2.0  # neither uniform, so both sides feel the temperature
    soft = lambda p: [x ** (1 / T) / sum(y ** (1 / T) for y in p) for x in p]  # softmax(log p / T)
    got = scd.distill_kl(logits(teacher), logits(student), temperature=T).item()
    want = T ** 2 * kl(soft(teacher), soft(student))
    assert got == pytest.approx(want, abs=1e-5), f"expected T^2 KL(softmax(t/T) || softmax(s/T)) = {want:.5f}, got {got:.5f}"
    assert scd.distill_kl(logits(teacher), logits(student), temperature=1.0).item() == pytest.approx(kl(teacher, student), abs=1e-5)


@pytest.mark.part1
def test_kl_runs_in_float32_for_low_precision_logits():
    torch.manual_seed(0)
    p, q = torch.randn(5, 10), torch.randn(5, 10)
    assert scd.token_kl(p.bfloat16(), q.bfloat16()).dtype == torch.float32
    torch.testing.assert_close(scd.token_kl(p.bfloat16(), q.bfloat16()), scd.token_kl(p.bfloat16().float(), q.bfloat16().float()))


# --- section 2.4: per-example means, gold CE, AW, the mixed loss ------------------------

@pytest.mark.part1
def test_per_example_mean_ignores_positions_outside_the_mask():
    mask = torch.tensor([[False, True, True, False], [True, False, False, False]])
    # values exist only at the 3 masked positions (row-major): example 0 gets 1 and 3, example 1 gets 5
    got = scd.per_example(torch.tensor([1.0, 3.0, 5.0]), mask)
    assert got.tolist() == [2.0, 5.0], f"expected [2.0, 5.0] (example 0: mean of 1 and 3; example 1: 5), got {got.tolist()}"


@pytest.mark.part1
def test_gold_ce_is_the_mean_over_each_examples_answer_tokens():
    mask = torch.tensor([[True, True], [True, False]])
    y = torch.tensor([[0, 1], [1, 0]])
    lg = logits([0.5, 0.5], [0.25, 0.75], [0.8, 0.2])  # the three answer positions, in row-major order
    want = [(-math.log(0.5) - math.log(0.75)) / 2, -math.log(0.2)]
    torch.testing.assert_close(scd.gold_ce(lg, y, mask), torch.tensor(want), atol=1e-5, rtol=0)


@pytest.mark.part2
def test_aw_weight_by_hand_and_constant():
    l_s = torch.tensor([1.0, 3.0, 1.0], requires_grad=True)
    l_c = torch.tensor([1.0, 1.0, 3.0], requires_grad=True)
    w = scd.aw_weights(l_s, l_c)
    # w = l_S / (l_S + l_c): equal losses 0.5; the SFT student worse (3 vs 1): 0.75, imitate the teacher
    assert w.tolist() == pytest.approx([0.5, 0.75, 0.25]), f"expected l_S / (l_S + l_c) = [0.5, 0.75, 0.25], got {w.tolist()}"
    assert not w.requires_grad  # weights are constants


@pytest.mark.part2
def test_aw_weight_is_defined_at_zero_and_tiny_losses():
    # converged models give losses of exactly 0: equal losses (zeros too) mean 0.5; a zero
    # against a real loss is the limit of l_S / (l_S + l_c)
    l_s = torch.tensor([0.0, 0.0, 0.5, 1e-30, 1e-7, 0.0])
    l_c = torch.tensor([0.0, 0.5, 0.0, 1e-30, 1e-7, float.fromhex("0x1p-149")])  # the last: the smallest float32
    w = scd.aw_weights(l_s, l_c)
    assert torch.isfinite(w).all(), f"AW weights must be finite, got {w.tolist()}"
    assert w.tolist() == pytest.approx([0.5, 0.0, 1.0, 0.5, 0.5, 0.5], abs=1e-6)


@pytest.mark.part2
def test_mixed_loss_weights_the_kl_by_w_and_the_ce_by_one_minus_w():
    kl_, ce = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    # example 0: 0.75 * 2 = 1.5; example 1: (1 - 0.25) * 4 = 3; mean 2.25
    got = scd.scd_loss(kl_, ce, torch.tensor([0.75, 0.25])).item()
    assert got == pytest.approx(2.25), f"expected mean(0.75*2 + 0.25*0, 0.25*0 + 0.75*4) = 2.25, got {got}"
    assert scd.scd_loss(kl_, ce, 0.5).item() == pytest.approx(1.5)


@pytest.mark.part2
def test_distill_loss_by_hand_for_sft_fixed_alpha_and_aw():
    mask = torch.tensor([[True], [True]])
    y = torch.tensor([[0], [0]])
    s, t = logits(STUDENT, STUDENT), logits(TEACHER, [0.5, 0.5])
    ce, kl0 = -math.log(0.5), kl(TEACHER, STUDENT)  # the student's CE on either example; example 0's KL (example 1's is 0)
    loss, terms = scd.distill_loss(s, None, y, mask)
    assert loss.item() == pytest.approx(ce, abs=1e-5) and terms["w"].tolist() == [0.0, 0.0]  # SFT: w = 0
    loss, terms = scd.distill_loss(s, t, y, mask, alpha=0.2)
    assert loss.item() == pytest.approx((0.2 * kl0 + 0.8 * ce + 0.8 * ce) / 2, abs=1e-5)
    # AW: the checkpoint's gold CE is -ln 0.9 on example 0 and -ln 0.5 on example 1
    anchor = torch.tensor([0.3, 0.1])
    loss, terms = scd.distill_loss(s, t, y, mask, anchor_loss=anchor)
    w = [0.3 / (0.3 - math.log(0.9)), 0.1 / (0.1 - math.log(0.5))]
    assert terms["w"].tolist() == pytest.approx(w, abs=1e-5), f"expected w = l_S / (l_S + l_c) = {w}, got {terms['w'].tolist()}"
    assert loss.item() == pytest.approx((w[0] * kl0 + (1 - w[0]) * ce + (1 - w[1]) * ce) / 2, abs=1e-5)



@pytest.mark.part2
def test_distill_loss_averages_the_kl_over_each_example_s_answer_tokens():
    """Example 0 has two answer tokens, example 1 one: each example's KL is the mean over its
    tokens (a sum would double example 0's), and the loss the batch mean of the examples'."""
    mask = torch.tensor([[True, True], [True, False]])
    y = torch.tensor([[0, 1], [1, 0]])
    t_rows, s_rows = [TEACHER, [0.2, 0.8], [0.6, 0.4]], [STUDENT, [0.5, 0.5], [0.3, 0.7]]
    loss, terms = scd.distill_loss(logits(*s_rows), logits(*t_rows), y, mask, alpha=1.0)
    want = [(kl(t_rows[0], s_rows[0]) + kl(t_rows[1], s_rows[1])) / 2, kl(t_rows[2], s_rows[2])]
    assert terms["kl"].tolist() == pytest.approx(want, abs=1e-5), \
        f"per-example KL, the mean over each example's answer tokens: expected {want}, got {terms['kl'].tolist()}"
    assert loss.item() == pytest.approx(sum(want) / 2, abs=1e-5)

@pytest.mark.part2
def test_a_distillation_step_stays_finite_with_zero_and_tiny_losses():
    """The failure seen on converged runs: anchor losses of exactly 0 and a teacher whose gold
    CE is 0 in float32 made w = 0/0 = NaN, and the run trained on NaN."""
    torch.manual_seed(0)
    student = torch.nn.Linear(4, 6)
    h = torch.randn(5, 4)
    y = torch.tensor([[1], [2], [3], [4], [5]])
    mask = torch.ones(5, 1, dtype=torch.bool)
    teacher = torch.full((5, 6), -200.0).scatter(1, y, 200.0)  # a converged teacher: CE exactly 0 in float32
    assert (scd.gold_ce(teacher, y, mask) == 0).all()
    for anchor in (torch.zeros(5), torch.full((5,), 1e-30), torch.tensor([0, 1e-30, 1e-7, 0.5, 0])):
        loss, terms = scd.distill_loss(student(h), teacher, y, mask, anchor_loss=anchor)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in terms.values())
        assert all(torch.isfinite(p.grad).all() for p in student.parameters())
        student.zero_grad()


@pytest.mark.part2
def test_only_the_student_gets_gradients():
    torch.manual_seed(0)
    teacher, student = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    y, mask = torch.randint(0, 8, (2, 3)), torch.ones(2, 3, dtype=torch.bool)
    loss, _ = scd.distill_loss(student, teacher, y, mask, anchor_loss=torch.tensor([2.0, 0.5]))
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


# --- sections 2.1 and 2.3: the best teacher and the schedule ---------------------------

def test_best_teacher_is_the_lowest_validation_loss_earliest_on_ties():
    assert scd.best_checkpoint([0.9, 0.31, 0.4, 0.31, 0.5]) == 1


# a pool built so that each plausible error picks another candidate: T* is candidate 1
U, B, M, X = [0.34, 0.33, 0.33], [0.9, 0.05, 0.05], [0.5, 0.4, 0.1], [0.7, 0.28, 0.02]
POOL, S = [U, B, M, X], [0.4, 0.3, 0.3]


@pytest.mark.part3
def test_schedule_terms_and_argmin_by_hand():
    k, kl_best, kl_student = choose(logits(B), [logits(c) for c in POOL], logits(S))
    want_best = [kl(B, c) for c in POOL]      # KL(p_T* || p_c)
    want_student = [kl(c, S) for c in POOL]   # flipped: KL(p_c || p_student)
    assert kl_best == pytest.approx(want_best, abs=1e-5), f"KL(p_T* || p_c): expected {want_best}, got {kl_best}"
    assert kl_student == pytest.approx(want_student, abs=1e-5), f"KL(p_c || p_student): expected {want_student}, got {kl_student}"
    # the sums: U 0.695, B 0.551, M 0.507, X 0.504 -> X. KL(p_c || p_T*) instead would choose B,
    # KL(p_T* || p_c) alone B, the student term alone U
    assert k == 3, f"expected candidate 3 (the smallest sum), got {k}"



@pytest.mark.part3
def test_schedule_terms_are_per_probe_token_and_the_choice_uses_their_means():
    """A probe of two tokens: schedule_terms gives one value per token, and the terms logged for
    each candidate are their means over the probe (a sum would double them)."""
    best, cand, student = logits(B, U), logits(M, X), logits(S, S)
    kl_best, kl_student = scd.schedule_terms(best, cand, student)
    want_b, want_s = [kl(B, M), kl(U, X)], [kl(M, S), kl(X, S)]
    assert list(kl_best.shape) == [2] and list(kl_student.shape) == [2], \
        f"one value per probe token: expected shapes [2] and [2], got {list(kl_best.shape)} and {list(kl_student.shape)}"
    assert kl_best.tolist() == pytest.approx(want_b, abs=1e-5), f"KL(p_T* || p_c) per token: expected {want_b}, got {kl_best.tolist()}"
    assert kl_student.tolist() == pytest.approx(want_s, abs=1e-5), \
        f"KL(p_c || p_student) per token: expected {want_s}, got {kl_student.tolist()}"
    _, mean_b, mean_s = choose(best, [cand], student)
    assert mean_b[0] == pytest.approx(sum(want_b) / 2, abs=1e-5) and mean_s[0] == pytest.approx(sum(want_s) / 2, abs=1e-5)


@pytest.mark.part3
def test_the_choice_takes_the_smallest_weighted_sum_earliest_on_ties_and_respects_monotone():
    """T* = B, student S, the pool U, B, M, X: sums KL(B || c) + KL(c || S) of 0.695, 0.551,
    0.507, 0.504 (X); with weight 2 on the T* term 1.382, 0.551, 0.898, 0.690 (B); with 0.5,
    0.351, 0.551, 0.312, 0.411 (M). Candidates B and S tie at KL(B || S) = 0.368."""
    pool = [logits(c) for c in POOL]
    for weight, want in ((1.0, 3), (2.0, 1), (0.5, 2)):
        k, kl_best, _ = choose(logits(B), pool, logits(S), weight=weight)
        assert k == want, f"weight {weight} on KL(p_T* || p_c): expected candidate {want}, got {k}"
        assert kl_best == pytest.approx([kl(B, c) for c in POOL], abs=1e-5), "the terms are logged unweighted"
    for tie in ([logits(B), logits(S)], [logits(S), logits(B)]):
        k = choose(logits(B), tie, logits(S))[0]
        assert k == 0, f"a tie (both sums {kl(B, S):.3f}): expected the earliest, 0, got {k}"
    pool = [logits(X), logits(B), logits(M)]  # sums 0.504, 0.551, 0.507
    assert choose(logits(B), pool, logits(S))[0] == 0
    k = choose(logits(B), pool, logits(S), prev=1, monotone=True)[0]
    assert k == 2, f"monotone from candidate 1: X (0.504) is not allowed; expected M (0.507 < 0.551), got {k}"


@pytest.mark.part3
def test_the_choice_over_pieces_of_the_probe_averages_every_token():
    """Two probe tokens in two pieces of one token each: the terms are the means over both
    tokens, as if scored whole (a mean of the pieces' sums, or the last piece alone, is not)."""
    best, cand, student = logits(B, U), logits(M, X), logits(S, S)
    whole = choose(best, [cand, best], student)
    pieces = [(best[i:i + 1], [cand[i:i + 1], best[i:i + 1]], student[i:i + 1]) for i in (0, 1)]
    k, kl_best, kl_student = scd.scd_checkpoint(pieces)
    assert kl_best == pytest.approx(whole[1], abs=1e-6) and kl_student == pytest.approx(whole[2], abs=1e-6)
    assert kl_best[0] == pytest.approx((kl(B, M) + kl(U, X)) / 2, abs=1e-5) and k == whole[0]


@pytest.mark.part3
def test_schedule_student_term_as_written():
    k, _, kl_student = choose(logits(B), [logits(c) for c in POOL], logits(S), "as_written")
    want = [kl(S, c) for c in POOL]  # KL(p_student || p_c)
    assert kl_student == pytest.approx(want, abs=1e-5), f"KL(p_student || p_c): expected {want}, got {kl_student}"
    assert k == 2, f"expected candidate 2 as written (sums 0.695, 0.751, 0.470, 0.491), got {k}"


@pytest.mark.part3
def test_schedule_monotone_never_goes_back():
    assert choose(logits(B), [logits(c) for c in POOL], logits(S), monotone=True, prev=3)[0] == 3
    assert choose(logits(B), [logits(c) for c in POOL], logits(S), monotone=False, prev=3)[0] == 3
    k, _, _ = choose(logits(B), [logits(c) for c in POOL[:3]] + [logits(U)], logits(S), monotone=True, prev=3)
    assert k == 3  # only candidate 3 is allowed, however bad


@pytest.mark.part3
def test_student_term_directions_on_a_sharp_checkpoint():
    """A uniform student and a sharp checkpoint: as written, KL(p_student || p_c) charges the
    sharp checkpoint log(0.25/0.01) on each of the student's three wrong tokens, far more than
    the flipped direction: how the as-written schedule can stall on early, diffuse checkpoints."""
    uniform, sharp = [0.25] * 4, [0.97, 0.01, 0.01, 0.01]
    _, _, as_written = choose(logits(sharp), [logits(sharp)], logits(uniform), "as_written")
    _, _, flipped = choose(logits(sharp), [logits(sharp)], logits(uniform), "flipped")
    assert as_written[0] == pytest.approx(kl(uniform, sharp), abs=1e-5) and flipped[0] == pytest.approx(kl(sharp, uniform), abs=1e-5)
    assert as_written[0] > 1.5 * flipped[0]  # 2.08 vs 1.22


@pytest.mark.part3
def test_kd_and_cd_schedules():
    assert [scd.fixed_checkpoint("kd", k, 4, best=6) for k in range(4)] == [6, 6, 6, 6]
    assert [scd.fixed_checkpoint("cd", k, 4, best=6) for k in range(4)] == [0, 2, 4, 6]
    got = [scd.fixed_checkpoint("cd", k, 4, best=5) for k in range(4)]
    assert got == [0, 2, 3, 5], f"evenly spaced from 0 to T* = 5, rounded to the nearest (0, 1.67, 3.33, 5): expected [0, 2, 3, 5], got {got}"
    assert scd.fixed_checkpoint("cd", 0, 1, best=6) == 6  # one stage: straight to T*


def test_compressed_probe_is_exact_when_it_keeps_everything_and_close_when_it_keeps_the_top():
    torch.manual_seed(0)
    lp = torch.log_softmax(3 * torch.randn(50, 40), -1)
    v, i = scd.compress_logprobs(lp, 40)
    torch.testing.assert_close(scd.dense_logprobs(v, i, 40), lp)
    v, i = scd.compress_logprobs(lp, 8)
    approx = scd.dense_logprobs(v, i, 40)
    torch.testing.assert_close(approx.logsumexp(-1), torch.zeros(50), atol=1e-5, rtol=0)  # still sums to 1
    torch.testing.assert_close(approx.gather(1, i.long()), lp.gather(1, i.long()))  # the kept log-probs are exact
    other = torch.log_softmax(3 * torch.randn(50, 40), -1)
    exact, got = scd.token_kl(lp, other).mean(), scd.token_kl(approx, other).mean()
    assert abs(got - exact) < 0.02 * exact, f"top-8 of 40 changed a KL of {exact:.4f} to {got:.4f}"


# --- section 1: the SFS/TFS decomposition ----------------------------------------------

@pytest.mark.part3
def test_decomposition_by_hand():
    # 6 examples, 0/1 errors.      TFS = {0, 1} (teacher right, SFT wrong); SFS = {2}; ties {3, 4, 5}
    r_t = [0, 0, 1, 0, 1, 0]
    r_s = [1, 1, 0, 0, 1, 0]
    r_d = [0, 1, 0, 1, 1, 0]  # a distilled student: fixes example 0, keeps SFS example 2
    d = scd.decompose(r_t, r_s, r_d)
    assert d["p_tfs"] == pytest.approx(2 / 6) and d["p_sfs"] == pytest.approx(1 / 6)
    assert d["deficit"] == pytest.approx(2 / 6) and d["advantage"] == pytest.approx(1 / 6)
    assert d["R_sft"] - d["R_teacher"] == pytest.approx(d["deficit"] - d["advantage"])  # the identity
    assert d["recovered"] == pytest.approx(0.5)  # 1 of the 2 TFS errors fixed
    assert d["kept"] == pytest.approx(1.0)       # the SFS example is still right


@pytest.mark.part3
def test_decomposition_per_subdomain_and_nothing_to_recover():
    rec = lambda sub, c: dict(subdomain=sub, correct=c)
    t = [rec("a", True), rec("a", False), rec("b", True)]
    s = [rec("a", False), rec("a", True), rec("b", True)]
    d = scd.decompose_records(t, s, [rec("a", True), rec("a", True), rec("b", False)])
    assert d["a"]["recovered"] == 1.0 and d["a"]["kept"] == 1.0
    assert math.isnan(d["b"]["recovered"]) and math.isnan(d["b"]["kept"])  # no TFS or SFS example in b
    assert d["all"]["n"] == 3 and d["all"]["p_tfs"] == pytest.approx(1 / 3)
