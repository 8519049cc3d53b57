import math

import pytest
import torch
from torch.nn import functional as F

import scd


def test_token_kl_matches_torch_kl_div():
    torch.manual_seed(0)
    p, q = torch.randn(7, 11), torch.randn(7, 11)
    ref = F.kl_div(F.log_softmax(q, -1), F.log_softmax(p, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(scd.token_kl(p, q), ref)
    torch.testing.assert_close(scd.token_kl(p, p), torch.zeros(7), atol=1e-6, rtol=0)


def test_kl_ignores_padded_vocabulary_rows_and_runs_in_float32():
    torch.manual_seed(0)
    p, q = torch.randn(5, 10), torch.randn(5, 10)
    pad_p = torch.cat([p, torch.full((5, 6), 30.0)], 1)  # huge logits in 6 padding columns
    pad_q = torch.cat([q, torch.full((5, 6), -30.0)], 1)
    torch.testing.assert_close(scd.token_kl(pad_p.bfloat16(), pad_q.bfloat16(), n_real=10),
                               scd.token_kl(p.bfloat16().float(), q.bfloat16().float()))
    assert scd.token_kl(p.bfloat16(), q.bfloat16()).dtype == torch.float32


def test_directions_and_temperature():
    torch.manual_seed(0)
    t, s = torch.randn(4, 9), torch.randn(4, 9)
    torch.testing.assert_close(scd.distill_kl(t, s), scd.token_kl(t, s))
    torch.testing.assert_close(scd.distill_kl(t, s, "reverse"), scd.token_kl(s, t))
    torch.testing.assert_close(scd.distill_kl(t, s, temperature=2.0), 4 * scd.token_kl(t / 2, s / 2))


def test_per_example_mean_ignores_positions_outside_the_mask():
    mask = torch.tensor([[False, True, True, False], [True, False, False, False]])
    # values exist only at the 3 masked positions (row-major): example 0 gets 1 and 3, example 1 gets 5
    torch.testing.assert_close(scd.per_example(torch.tensor([1.0, 3.0, 5.0]), mask), torch.tensor([2.0, 5.0]))


def test_aw_weights_by_hand_and_constant():
    l_s = torch.tensor([1.0, 3.0, 1.0], requires_grad=True)
    l_c = torch.tensor([1.0, 1.0, 3.0], requires_grad=True)
    w = scd.aw_weights(l_s, l_c)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.75, 0.25]))
    assert not w.requires_grad  # weights are constants


def test_scd_loss_gradient_reaches_the_student_only():
    torch.manual_seed(0)
    teacher = torch.randn(6, 8, requires_grad=True)
    student = torch.randn(6, 8, requires_grad=True)
    y = torch.randint(0, 8, (6,))
    mask = torch.tensor([[True, True, True], [True, True, True]])
    kl = scd.per_example(scd.distill_kl(teacher.detach(), student), mask)
    ce = scd.per_example(F.cross_entropy(student, y, reduction="none"), mask)
    l_c = scd.per_example(F.cross_entropy(teacher, y, reduction="none"), mask)
    w = scd.aw_weights(torch.tensor([2.0, 0.5]), l_c)
    scd.scd_loss(kl, ce, w).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    # and it is the weighted mean of the two terms, by hand
    expect = ((w * kl + (1 - w) * ce).sum() / 2).item()
    assert scd.scd_loss(kl, ce, w).item() == pytest.approx(expect)


def logits(probs):
    return torch.tensor([probs]).log()


def test_scd_argmin_on_a_pool_with_a_known_answer():
    # student A = uniform over 4 tokens, best teacher B = peaked. Pool: [C (far), A, B].
    A, B, C = logits([0.25] * 4), logits([0.97, 0.01, 0.01, 0.01]), logits([0.01, 0.01, 0.01, 0.97])
    pool = [C, A, B]
    kl_best = [scd.token_kl(B, c).mean().item() for c in pool]
    kl_student = [scd.token_kl(A, c).mean().item() for c in pool]
    # by hand: c=A scores KL(B||A) = log 4 - H(B) = 1.2184; c=B scores KL(A||B) = 2.0805
    assert kl_best[1] + kl_student[1] == pytest.approx(math.log(4) + (0.97 * math.log(0.97) + 0.03 * math.log(0.01)), abs=1e-4)
    assert kl_best[2] + kl_student[2] == pytest.approx(0.25 * math.log(0.25 / 0.97) + 0.75 * math.log(25), abs=1e-4)
    assert scd.choose_checkpoint("scd", 0, 3, best=2, kl_best=kl_best, kl_student=kl_student) == 1
    # monotone: never back before the previous stage's choice
    assert scd.choose_checkpoint("scd", 1, 3, best=2, kl_best=kl_best, kl_student=kl_student, prev=2, monotone=True) == 2


def test_kd_and_cd_schedules():
    assert [scd.choose_checkpoint("kd", k, 4, best=6) for k in range(4)] == [6, 6, 6, 6]
    assert [scd.choose_checkpoint("cd", k, 4, best=6) for k in range(4)] == [0, 2, 4, 6]
    assert scd.choose_checkpoint("cd", 0, 1, best=6) == 6  # one stage: straight to T*


def test_student_term_directions_by_hand():
    """A uniform student and a sharp checkpoint over 4 tokens: the two directions differ, and
    as written (KL(student || c)) punishes the sharp checkpoint more, which is how the
    as-written schedule can stall on early, diffuse checkpoints (METHOD.md section 2)."""
    student = torch.full((1, 4), 0.25).log()
    sharp = torch.tensor([[0.97, 0.01, 0.01, 0.01]]).log()
    as_written = 0.25 * math.log(0.25 / 0.97) + 0.75 * math.log(0.25 / 0.01)
    flipped = math.log(4) + 0.97 * math.log(0.97) + 0.03 * math.log(0.01)  # log V - H(c)
    assert scd.student_term(student, sharp, "as_written") == pytest.approx(as_written, rel=1e-5)
    assert scd.student_term(student, sharp, "flipped") == pytest.approx(flipped, rel=1e-5)
    assert as_written > flipped
