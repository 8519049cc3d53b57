import json

import pytest
import torch

import data
import scd
import train_teacher as tt


@pytest.fixture(scope="module")
def tiny_domain(tmp_path_factory):
    """A folder of JSONL cut from the default domain: small enough for seconds of training."""
    folder = tmp_path_factory.mktemp("domain")
    d = data.default_domain(0)
    for split, n in (("train", 96), ("val", 24), ("test", 24)):
        data.write_jsonl(d[split][::len(d[split]) // n][:n], folder / f"{split}.jsonl")
    return folder


def cfg(tiny_domain, out, **kw):
    return tt.TrainConfig(**{**dict(data=str(tiny_domain), preset="student", out_dir=str(out), epochs=2,
                                     batch_size=16, ckpt_per_epoch=2, log_every=1000), **kw})


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_lr_schedule_warmup_then_cosine_to_zero():
    assert tt.lr_at(0, 100, 1.0, 0.1) == pytest.approx(0.1)     # step 1 of 10 warm-up steps
    assert tt.lr_at(9, 100, 1.0, 0.1) == pytest.approx(1.0)     # peak at the end of warm-up
    assert tt.lr_at(55, 100, 1.0, 0.1) == pytest.approx(0.5)    # half way through the cosine
    assert tt.lr_at(100, 100, 1.0, 0.1) == pytest.approx(0.0)


def test_manifest_lists_evenly_spaced_checkpoints_and_the_best(tiny_domain, tmp_path):
    tt.train(cfg(tiny_domain, tmp_path))
    m = json.loads((tmp_path / "manifest.json").read_text())
    steps = [c["step"] for c in m["checkpoints"]]
    assert steps == [3, 6, 9, 12]  # 96 // 16 = 6 steps per epoch, 2 checkpoints per epoch, 2 epochs
    vals = [c["val_loss"] for c in m["checkpoints"]]
    assert m["best"] == vals.index(min(vals))
    for c in m["checkpoints"]:
        assert (tmp_path / c["file"]).exists() and set(c) >= {"train_loss", "val_loss", "val_acc", "epoch"}
    # a saved checkpoint reproduces its logged validation loss
    best = m["checkpoints"][m["best"]]
    model, tok = tt.load_checkpoint(tmp_path / best["file"])
    summary, _ = data.evaluate(model, data.load_domain(str(tiny_domain))["val"], tok)
    assert summary["loss"] == pytest.approx(best["val_loss"], abs=1e-4)
    # the AW anchor: one training loss per example, tied to the data by fingerprint
    anchor = json.loads((tmp_path / "train_losses.json").read_text())
    assert len(anchor["loss"]) == 96 and anchor["fingerprint"] == m["fingerprint"]
    assert len((tmp_path / "test_records.jsonl").read_text().splitlines()) == 24


def test_interrupted_run_resumes_to_identical_weights(tiny_domain, tmp_path):
    tt.train(cfg(tiny_domain, tmp_path / "a"))
    assert tt.train(cfg(tiny_domain, tmp_path / "b", stop_at_step=7)) is None  # "killed" after step 7
    assert not (tmp_path / "b" / "ckpt_000009.pt").exists()
    tt.train(cfg(tiny_domain, tmp_path / "b"))  # the same command again resumes from step 6's state
    for name in ("ckpt_000003.pt", "ckpt_000006.pt", "ckpt_000009.pt", "ckpt_000012.pt"):
        wa, wb = weights(tmp_path / "a" / name), weights(tmp_path / "b" / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    ma, mb = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab")
    assert ma["checkpoints"] == mb["checkpoints"]


def test_resume_refuses_a_different_config(tiny_domain, tmp_path):
    tt.train(cfg(tiny_domain, tmp_path, stop_at_step=3))
    with pytest.raises(SystemExit, match="another config"):
        tt.train(cfg(tiny_domain, tmp_path, lr=1e-4))


def test_corrupt_checkpoint_is_named_in_the_error(tmp_path):
    (tmp_path / "ckpt_000001.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="ckpt_000001.pt: not a readable checkpoint"):
        tt.load_checkpoint(tmp_path / "ckpt_000001.pt")


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


def test_cpu_bf16_autocast_trains_with_finite_float32_losses(tiny_domain, tmp_path):
    summary = tt.train(cfg(tiny_domain, tmp_path, dtype="bfloat16", epochs=1))
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert all(torch.isfinite(torch.tensor([c["train_loss"], c["val_loss"]])).all() for c in m["checkpoints"])
    assert torch.isfinite(torch.tensor(summary["loss"]))
    _, _, ctx, scaler, _, _ = tt.setup_device("cpu", "bfloat16")
    assert scaler is None  # only fp16 needs a gradient scaler
    model, tok = tt.load_checkpoint(tmp_path / m["checkpoints"][-1]["file"])
    x = torch.randint(0, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    with ctx:
        logits = model(x, positions=mask)
        ce = scd.gold_ce(logits, x, mask)
    assert logits.dtype == torch.bfloat16 and ce.dtype == torch.float32


def test_init_from_gpt2_weights_uses_the_full_vocabulary(tiny_domain, tmp_path, monkeypatch):  # noqa: F811
    """--init_from with a stand-in for the download: a small random GPT-2 from transformers."""
    transformers = pytest.importorskip("transformers", reason="optional extra: pip install transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=128, n_embd=32, n_layer=1, n_head=2))
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", classmethod(lambda cls, name: hf))
    tt.train(cfg(tiny_domain, tmp_path, init_from="gpt2", epochs=1, ckpt_per_epoch=1))
    model, tok = tt.load_checkpoint(tmp_path / "ckpt_000006.pt")
    assert tok.ids is None and tok.eot == 50256 and model.config.vocab_size == 50257
    assert model.config.block_size == 128 and model.config.n_layer == 1
    enc = data.encode(data.load_domain(str(tiny_domain))["test"][:1], tok, 128)
    assert enc[0][0] == data.gpt2_encoding().encode_ordinary(data.load_domain(str(tiny_domain))["test"][0]["prompt"])
