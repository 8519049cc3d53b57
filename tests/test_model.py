import pytest
import torch

from model import GPT, GPTConfig


def tiny(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32), **kw})).eval()


def test_causal_mask_future_tokens_do_not_change_earlier_logits():
    m = tiny()
    x = torch.randint(0, 64, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 64, (2, 5))  # change every token from position 7 on
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])  # and the later ones do change


def test_answer_only_head_equals_full_head():
    m = tiny()
    x = torch.randint(0, 64, (3, 10))
    mask = torch.rand(3, 10) < 0.3
    mask[0, 4] = True
    full = m(x)
    torch.testing.assert_close(m(x, positions=mask), full[mask])
    assert m(x, positions=mask).shape == (int(mask.sum()), 64)


def test_lm_head_is_tied_to_token_embedding():
    m = tiny()
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()
    # GPT-2 layout: names a converter can map one to one
    names = set(m.state_dict())
    for n in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight",
              "transformer.h.1.mlp.c_proj.bias", "transformer.ln_f.weight", "lm_head.weight"):
        assert n in names


def test_optimizer_groups_decay_only_block_matrices():
    m = tiny()
    opt = m.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    for name, p in m.named_parameters():
        expect = p.dim() == 2 and ".h." in name and "ln" not in name
        assert (id(p) in decayed) == expect, name


def test_batched_generate_equals_one_row_at_a_time_greedy():
    m = tiny()
    prompts = [[5, 9, 3], [7, 1, 2, 8, 4, 6], [11]]
    idx = torch.zeros(3, 6, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.tensor(p)
    outs = m.generate(idx, torch.tensor([3, 6, 1]), max_new_tokens=5, stop_id=63)
    for p, out in zip(prompts, outs):
        seq, expect = list(p), []
        for _ in range(5):  # plain greedy decoding, no batching, no padding
            nxt = int(m(torch.tensor([seq]))[0, -1].argmax())
            if nxt == 63:
                break
            seq.append(nxt)
            expect.append(nxt)
        assert out == expect


def test_logits_equal_hugging_face_gpt2_on_random_weights():
    """Parity with a reference we did not write: a randomly initialised transformers
    GPT2LMHeadModel (no download), converted by the same path as pretrained weights."""
    transformers = pytest.importorskip("transformers", reason="optional extra: pip install transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=101, n_positions=32, n_embd=48, n_layer=3, n_head=4,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    for p in hf.parameters():  # HF zero-initialises biases and sets LayerNorms to 1: perturb them all
        p.data += 0.02 * torch.randn_like(p)
    ours = GPT.from_hf(hf.state_dict(), GPTConfig(block_size=32, vocab_size=101, n_layer=3, n_head=4, n_embd=48)).eval()
    x = torch.randint(0, 101, (3, 20))
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    assert got.shape == ref.shape == (3, 20, 101)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)  # fp32, same arithmetic up to op order
