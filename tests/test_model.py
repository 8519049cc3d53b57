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
