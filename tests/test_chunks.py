"""The losses at a 128k vocabulary: in pieces along the answer positions (scd.by_chunks) they
equal the one-piece values and gradients to 1e-6 (absolute, and relative: a CE near log V = 11.8
is known in float32 only to about 1e-6), and no piece holds more positions than asked, in the
forward pass or in the backward pass's recomputation."""
import pytest
import torch

import data
import scale
import scd

V = 128_256  # Llama 3's vocabulary


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(0)
    mask = torch.tensor([[False, True, True, True], [True, True, True, False]])  # 6 answer positions
    s, t = 3 * torch.randn(6, V), 3 * torch.randn(6, V)
    return s, t, torch.randint(0, V, (2, 4)), mask, torch.tensor([0.7, 0.2])


@pytest.mark.parametrize("chunk", [1, 2, 4])
@pytest.mark.parametrize("direction, temperature, aw", [("forward", 1.0, True), ("reverse", 2.0, False)])
def test_chunked_losses_and_gradients_equal_the_unchunked(batch, chunk, direction, temperature, aw):
    s, t, y, mask, anchor = batch
    out = []
    for c in (0, chunk):
        x = s.clone().requires_grad_(True)
        loss, terms = scd.distill_loss(x, t, y, mask, 0.3, anchor if aw else None, direction, temperature, chunk=c)
        loss.backward()
        out.append((loss.detach(), {k: v.detach() for k, v in terms.items()}, x.grad))
    (l0, t0, g0), (l1, t1, g1) = out
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    for k in ("ce", "kl", "w"):
        torch.testing.assert_close(t1[k], t0[k], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g1, g0, atol=1e-6, rtol=1e-6)


def test_no_piece_holds_more_positions_than_asked_forward_or_backward(batch):
    s, _, _, _, _ = batch
    seen = []

    def fn(lg):
        seen.append(lg.size(0))
        return torch.logsumexp(lg.float(), -1)
    x = s.clone().requires_grad_(True)
    scd.by_chunks(fn, x, chunk=4).sum().backward()
    assert seen == [4, 2, 2, 4]  # two pieces, each recomputed once in the backward pass (last first)
    torch.testing.assert_close(x.grad, torch.softmax(s, -1), atol=1e-6, rtol=1e-6)  # d logsumexp / d logits
    seen.clear()
    with torch.no_grad():
        scd.by_chunks(fn, s, chunk=4)
    assert seen == [4, 2]  # no gradients: no recomputation


def test_the_memory_plan_counts_one_piece_of_float32_logits():
    """At a 128k vocabulary, batch 8 x 128 answer tokens in bf16: in one piece four float32 copies
    of (1024 x V); in pieces of 130 positions (64 MiB of float32 logits each), the bf16 logits
    and gradient of the student, the teacher's, and four float32 copies of one piece."""
    from model import GPTConfig, build
    model = build(GPTConfig(vocab_size=V, n_layer=1, n_head=1, n_embd=8, block_size=16))
    chunk = data.logit_chunk(V)
    assert chunk == 2**26 // (4 * V) == 130
    one = scale.plan_parts(model, model, 8, 512, 128, "bfloat16", True)["logits"]
    pieces = scale.plan_parts(model, model, 8, 512, 128, "bfloat16", True, chunk)["logits"]
    assert one == 1024 * V * 4 * 4 and pieces == 1024 * V * 2 * 3 + 130 * V * 4 * 4
    assert pieces < 0.55 * one  # 1.06 GB against 2.10


def test_the_probe_is_scored_in_pieces_to_the_same_terms_and_choice():
    """Three candidates stored as their top-64 log-probs on a probe of two examples (7 answer
    positions) at a 128k vocabulary, and a student: scored 2 or 4 positions at a time, or one
    example per batch (scale.probe_pieces), scd.scd_checkpoint's terms and choice equal those of
    the candidates expanded whole to 1e-6, and in one piece they are the same floats."""
    from contextlib import nullcontext
    from model import GPTConfig, build
    torch.manual_seed(1)
    student = build(GPTConfig(vocab_size=V, n_layer=1, n_head=1, n_embd=8, block_size=16)).eval()
    probe = [([5, 6], [7, 8]), ([9], [10, 11, 12])]  # answers and their end tokens: 3 + 4 positions
    x, _, mask = data.make_batch(probe, range(2), 0)
    with torch.no_grad():
        s_lp = torch.log_softmax(student(x, positions=mask), -1)
    cache = [scd.compress_logprobs(torch.log_softmax(3 * torch.randn(7, V), -1), 64) for _ in range(3)]
    whole = scd.scd_checkpoint([(scd.dense_logprobs(*cache[2], V), [scd.dense_logprobs(*c, V) for c in cache], s_lp)])
    choice = lambda chunk, batch: scd.scd_checkpoint(scale.probe_pieces(student, probe, cache, 2, 0, "cpu", nullcontext(),
                                                                        chunk=chunk, batch_size=batch))
    for chunk, batch in ((2, 2), (4, 2), (7, 1), (3, 1)):
        k, b, s = choice(chunk, batch)
        assert b == pytest.approx(whole[1], abs=1e-6, rel=1e-6) and s == pytest.approx(whole[2], abs=1e-6, rel=1e-6)
        assert k == whole[0]
    assert choice(7, 2) == whole  # one piece: the same floats
