"""LoRA adapters (model.add_lora): a fresh adapter changes nothing, only adapters train, an
adapter checkpoint is a small fraction of the model, and base + adapter equals the merged weights."""
import copy

import pytest
import torch

from lab import bench
from model import GPTConfig, LoRALinear, add_lora, build, lora_state, merge_lora

CONFIGS = {"gpt2": GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=16),
           "llama": GPTConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, vocab_size=50, block_size=16,
                              intermediate_size=48, bias=False, tie_embeddings=False)}


def logits(model, idx):
    return model.eval()(idx)


@pytest.mark.parametrize("arch", CONFIGS)
def test_a_fresh_adapter_changes_nothing_and_only_adapters_train(arch):
    torch.manual_seed(0)
    base = build(CONFIGS[arch])
    idx = torch.randint(0, 50, (3, 10))
    want = logits(base, idx)
    model = add_lora(copy.deepcopy(base), rank=4)
    assert torch.equal(logits(model, idx), want)  # B = 0: the update is exactly zero
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == (4 if arch == "gpt2" else 7) * 2  # every projection of both blocks, never the head
    model.train()
    model(idx).logsumexp(-1).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_state(model))
    opt = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu")
    assert sum(len(g["params"]) for g in opt.param_groups) == 2 * len(wrapped)  # A and B of each adapter


@pytest.mark.parametrize("arch", CONFIGS)
def test_base_plus_adapter_gives_the_merged_weights_logits(arch):
    torch.manual_seed(1)
    model = add_lora(build(CONFIGS[arch]), rank=4, alpha=8)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.1)  # a trained adapter: B is no longer zero
    idx = torch.randint(0, 50, (3, 10))
    adapted = logits(model, idx)
    merged = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(build(CONFIGS[arch]).state_dict())  # the plain model's names
    torch.testing.assert_close(logits(merged, idx), adapted, atol=1e-5, rtol=0)
    assert (logits(merged, idx) - logits(build(CONFIGS[arch]), idx)).abs().max() > 1e-3  # the adapter did something


def test_an_adapter_checkpoint_is_a_small_fraction_of_the_model():
    """Rank 16 on every projection: 0.91% of Llama 3.2 1B's parameters, 0.52% of Llama 3.1 8B's
    (41.9M: 160 MiB in float32, against 15.0 GiB for the 8B weights in bf16)."""
    for name, share in (("llama-3.2-1b", 0.0091), ("llama-3.2-3b", 0.0076), ("llama-3.1-8b", 0.0052)):
        with torch.device("meta"):
            model = build(GPTConfig(**bench.SHAPES[name]))
            full = model.num_params()
            add_lora(model, rank=16)
        adapters = sum(v.numel() for v in lora_state(model).values())
        assert adapters / full == pytest.approx(share, abs=5e-5), (name, adapters / full)
    assert adapters == 32 * 16 * 81_920  # 8B: layers x rank x (in + out features, summed over its 7 projections)
