"""LoRA adapters (model.add_lora): a fresh adapter changes nothing, only adapters train, an
adapter checkpoint is a small fraction of the model, and base + adapter equals the merged weights;
the teacher's adapter trail (--lora_rank): adapters and the base's sha256 in each checkpoint,
reloaded to the run's own probe log-probs, swapped without reloading the base, refused on another
base, resumed bit for bit."""
import copy
import hashlib
import json
import shutil
from contextlib import nullcontext

import pytest
import torch

import data
import plumbing
import train_teacher as tt
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


@pytest.fixture(scope="module")
def trail(tiny_domain, tmp_path_factory):
    """A full-weights base of the student preset (base.pt), and a teacher trail of rank-4
    adapters fine-tuned on it: 2 epochs, 4 checkpoints."""
    root = tmp_path_factory.mktemp("trail")
    _, tok, model, _ = plumbing.prepare(str(tiny_domain), "student", seed=3)
    plumbing.atomic_save(plumbing.checkpoint_dict(model, tok), root / "base.pt")
    kw = dict(data=str(tiny_domain), preset="student", epochs=2, batch_size=16, ckpt_per_epoch=2, log_every=1000,
              init_from=str(root / "base.pt"), lora_rank=4, probe_size=16, lr=1e-2)
    tt.train(tt.TrainConfig(**kw, out_dir=str(root / "teacher")))
    return root, kw


def test_an_adapter_trail_stores_adapters_and_its_base_and_reloads_to_the_runs_own_logprobs(trail):
    root, kw = trail
    m = json.loads((root / "teacher" / "manifest.json").read_text())
    files = [root / "teacher" / c["file"] for c in m["checkpoints"]]
    ck = torch.load(files[0], weights_only=True)
    assert set(ck["model"]) and all(".lora_" in k for k in ck["model"])  # the adapters alone
    assert ck["lora"]["sha256"] == hashlib.sha256((root / "base.pt").read_bytes()).hexdigest()
    # the student preset (2 x 64, a compact vocabulary): rank-4 adapters are 8,192 of its 128,512 parameters (6.4%),
    # the file 40 KB against the base's 524 KB
    assert sum(v.numel() for v in ck["model"].values()) == 8192
    assert files[0].stat().st_size < 0.1 * (root / "base.pt").stat().st_size
    # base + adapters, reloaded, give the log-probs the run stored for the probe at each checkpoint
    enc = plumbing.prepare(str(root / "x"), "student", 0, splits=data.load_domain(kw["data"]))[3]
    store = data.ProbeStore(root / "teacher", enc["train"], m["fingerprint"], 16, 0, 64)
    assert store.load()
    model = None
    for f, c, (values, indices) in zip(files, m["checkpoints"], store.get([c["step"] for c in m["checkpoints"]], "cpu")):
        again, tok = plumbing.load_checkpoint(f, into=model)
        assert model is None or again is model  # the same base in memory, only the adapters swapped
        model = again
        torch.testing.assert_close(data.probe_logprobs(model, store.probe, tok.eot, "cpu", nullcontext(), 64)[0], values,
                                   atol=1e-5, rtol=0)
        fresh, _ = plumbing.load_checkpoint(f)  # a swap equals a fresh load
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_a_trail_whose_base_changed_is_refused_at_load(trail, tmp_path):
    root, _ = trail
    shutil.copytree(root / "teacher", tmp_path / "teacher")
    ck = torch.load(tmp_path / "teacher" / "ckpt_000003.pt", weights_only=True)
    other = torch.load(root / "base.pt", weights_only=True)
    other["model"] = {k: v + 0.01 for k, v in other["model"].items()}
    torch.save(other, tmp_path / "other.pt")
    torch.save({**ck, "lora": {**ck["lora"], "base": str(tmp_path / "other.pt")}}, tmp_path / "teacher" / "ckpt_000003.pt")
    with pytest.raises(plumbing.RunError, match=r"its adapters belong to the base .*other.pt of sha256 \w{16}, and the "
                                                r"weights there now have sha256 \w{16}"):
        plumbing.load_checkpoint(tmp_path / "teacher" / "ckpt_000003.pt")
    with pytest.raises(plumbing.RunError, match="adapters need a base of full weights on disk"):
        plumbing.prepare(str(root / "x"), "student", 0, "", splits=data.load_domain(str(trail[1]["data"])), lora=(4, 0, 0))


def test_an_interrupted_adapter_run_resumes_to_the_same_trail(trail, tmp_path):
    root, kw = trail
    assert tt.train(tt.TrainConfig(**kw, out_dir=str(tmp_path / "t"), stop_at_step=5)) is None
    assert set(torch.load(tmp_path / "t" / "state.pt", weights_only=True)["model"]) == set(
        torch.load(root / "teacher" / "ckpt_000003.pt", weights_only=True)["model"])  # the state holds the adapters alone
    tt.train(tt.TrainConfig(**kw, out_dir=str(tmp_path / "t")))
    for c in json.loads((root / "teacher" / "manifest.json").read_text())["checkpoints"]:
        a, b = (torch.load(d / c["file"], weights_only=True)["model"] for d in (root / "teacher", tmp_path / "t"))
        assert all(torch.equal(a[k], b[k]) for k in a)
