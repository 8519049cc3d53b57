import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import plumbing
import data
import scd
import train_teacher as tt

ROOT = Path(__file__).resolve().parent.parent


def cfg(tiny_domain, out, **kw):
    """A tiny run; it stores the run's probe alone, of the 16 examples the tests' distillations ask
    for (they score the resampled ones themselves)."""
    return tt.TrainConfig(**{**dict(data=str(tiny_domain), preset="student", out_dir=str(out), epochs=2, batch_size=16,
                                     ckpt_per_epoch=2, log_every=1000, probe_size=16, probe_resamples=0), **kw})


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_lr_schedule_warmup_then_cosine_to_zero():
    assert plumbing.lr_at(0, 100, 1.0, 0.1) == pytest.approx(0.1)     # step 1 of 10 warm-up steps
    assert plumbing.lr_at(9, 100, 1.0, 0.1) == pytest.approx(1.0)     # peak at the end of warm-up
    assert plumbing.lr_at(55, 100, 1.0, 0.1) == pytest.approx(0.5)    # half way through the cosine
    assert plumbing.lr_at(100, 100, 1.0, 0.1) == pytest.approx(0.0)


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
    model, tok = plumbing.load_checkpoint(tmp_path / best["file"])
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


def test_a_teacher_with_dropout_interrupted_between_checkpoints_resumes_bit_for_bit(tiny_domain, tmp_path):
    """The teacher preset draws dropout masks at every step: a resume must restore torch's random
    state with the weights, or the steps after the restart see other masks."""
    teacher = lambda out, **kw: cfg(tiny_domain, out, preset="teacher", **kw)
    tt.train(teacher(tmp_path / "a"))
    assert tt.train(teacher(tmp_path / "b", stop_at_step=7)) is None  # between the checkpoints at steps 6 and 9
    tt.train(teacher(tmp_path / "b"))
    for name in ("ckpt_000009.pt", "ckpt_000012.pt"):
        wa, wb = weights(tmp_path / "a" / name), weights(tmp_path / "b" / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    ma, mb = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in "ab")
    assert ma["checkpoints"] == mb["checkpoints"]


def test_resume_refuses_a_different_config(tiny_domain, tmp_path):
    tt.train(cfg(tiny_domain, tmp_path, stop_at_step=3))
    with pytest.raises(plumbing.RunError, match="another config"):
        tt.train(cfg(tiny_domain, tmp_path, lr=1e-4))


def test_corrupt_checkpoint_is_named_in_the_error(tmp_path):
    (tmp_path / "ckpt_000001.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(plumbing.RunError, match="ckpt_000001.pt: not a readable checkpoint"):
        plumbing.load_checkpoint(tmp_path / "ckpt_000001.pt")


def test_cpu_bf16_autocast_trains_with_finite_float32_losses(tiny_domain, tmp_path):
    summary = tt.train(cfg(tiny_domain, tmp_path, dtype="bfloat16", epochs=1))
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert all(torch.isfinite(torch.tensor([c["train_loss"], c["val_loss"]])).all() for c in m["checkpoints"])
    assert torch.isfinite(torch.tensor(summary["loss"]))
    _, _, ctx, scaler, _, _ = plumbing.setup_device("cpu", "bfloat16")
    assert scaler is None  # only fp16 needs a gradient scaler
    model, tok = plumbing.load_checkpoint(tmp_path / m["checkpoints"][-1]["file"])
    x = torch.randint(0, 50, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.bool)
    with ctx:
        logits = model(x, positions=mask)
        ce = scd.gold_ce(logits, x, mask)
    assert logits.dtype == torch.bfloat16 and ce.dtype == torch.float32


def test_init_from_gpt2_weights_uses_the_full_vocabulary(tiny_domain, tmp_path, monkeypatch):
    """--init_from with a stand-in for the download: a small random GPT-2 from transformers."""
    transformers = pytest.importorskip("transformers", reason="optional extra: pip install transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=128, n_embd=32, n_layer=1, n_head=2))
    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", classmethod(lambda cls, name: hf))
    tt.train(cfg(tiny_domain, tmp_path, init_from="gpt2", epochs=1, ckpt_per_epoch=1))
    model, tok = plumbing.load_checkpoint(tmp_path / "ckpt_000006.pt")
    assert tok.ids is None and tok.eot == 50256 and model.config.vocab_size == 50257
    assert model.config.block_size == 128 and model.config.n_layer == 1
    enc = data.encode(data.load_domain(str(tiny_domain))["test"][:1], tok, 128)
    assert enc[0][0] == data.gpt2_encoding().encode_ordinary(data.load_domain(str(tiny_domain))["test"][0]["prompt"])


def test_exact_match_from_one_forward_pass_equals_greedy_decoding(tmp_path):
    """Two ways to score exact match, on real checkpoints: the argmax at every answer position
    with the gold answer fed in (what validation uses), and greedy generation. They can only
    differ where another token sequence decodes to the same text; here they never do."""
    d = {s: [e for e in v if not e.get("noisy")] for s, v in data.load_domain("default").items()}  # correct labels only
    pick = lambda split, sub, n, keep=lambda e: True: [e for e in d[split] if e["subdomain"] == sub and keep(e)][:n]
    people = {m for e in pick("train", "qa_en", 48) for m in re.findall(r"[A-Z][a-z]+ [A-Z][a-z]+", e["prompt"])}
    asks_known = lambda e: any(p in e["prompt"] for p in people)  # held-out questions about the 6 people in train
    for split, n in (("train", 48), ("val", 12), ("test", 12)):  # short answers: learnt in seconds
        data.write_jsonl(pick(split, "cls_en", n) + pick(split, "qa_en", n, asks_known), tmp_path / "dom" / f"{split}.jsonl")
    tt.train(cfg(tmp_path / "dom", tmp_path / "run", preset="teacher", epochs=12, ckpt_per_epoch=1, lr=1e-2))
    m = json.loads((tmp_path / "run" / "manifest.json").read_text())
    splits = data.load_domain(str(tmp_path / "dom"))
    both = []
    for c in m["checkpoints"][::3]:
        model, tok = plumbing.load_checkpoint(tmp_path / "run" / c["file"])
        for split in ("train", "val"):
            forced = [r["correct"] for r in data.evaluate(model, splits[split], tok)[1]]
            decoded = [r["correct"] for r in data.evaluate(model, splits[split], tok, decode=True)[1]]
            assert forced == decoded, f"{c['file']} on {split}: forced and decoded exact match differ"
            both += forced
    assert 0.1 < sum(both) / len(both) < 0.9, "the check needs checkpoints that get some answers right and some wrong"


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_state(tiny_domain, tmp_path, monkeypatch):
    calls, real = [0], scd.gold_ce

    def nan_at_call_7(*a):  # steps 1-6 (validation scores in pieces, without gold_ce), then step 7
        calls[0] += 1
        out = real(*a)
        return out * float("nan") if calls[0] == 7 else out
    monkeypatch.setattr(tt.scd, "gold_ce", nan_at_call_7)
    with pytest.raises(plumbing.RunError, match=r"non-finite loss at step 7"):
        tt.train(cfg(tiny_domain, tmp_path, ckpt_per_epoch=2))
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 6  # the checkpoint before the bad step; nothing after it was written
    assert [c["step"] for c in json.loads((tmp_path / "manifest.json").read_text())["checkpoints"]] == [3, 6]


def test_fp16_autocast_with_gradient_scaler_skips_and_counts_an_overflowing_step(tiny_domain, tmp_path, monkeypatch, capsys):
    """The script's own step under fp16 autocast: a loss whose gradients overflow in the scaled
    backward is skipped by the GradScaler (the weights stay, the scale halves) and counted,
    one more than in the same run without it; the run goes on."""
    _, dtype, ctx, scaler, _, _ = plumbing.setup_device("cpu", "float16")
    assert scaler is not None and dtype == "float16"
    model = torch.nn.Linear(8, 4)
    with ctx:
        assert model(torch.randn(2, 8)).dtype == torch.float16  # autocast runs the matmul in fp16
    skipped = lambda out: int(re.search(r"scaler skipped (\d+) steps", out).group(1))
    tt.train(cfg(tiny_domain, tmp_path / "plain", dtype="float16", epochs=1))
    plain = skipped(capsys.readouterr().out)
    calls, real = [0], scd.gold_ce

    def huge_at_call_4(*a):
        calls[0] += 1
        return real(*a) * (1e6 if calls[0] == 4 else 1)  # finite in float32, inf in the fp16 backward
    monkeypatch.setattr(tt.scd, "gold_ce", huge_at_call_4)
    summary = tt.train(cfg(tiny_domain, tmp_path / "huge", dtype="float16", epochs=1))
    assert skipped(capsys.readouterr().out) == plain + 1 and torch.isfinite(torch.tensor(summary["loss"]))


@pytest.mark.parametrize("argv, message", [
    (["--aw", "ture"], "'ture' is neither true nor false"),
    (["--method", "foo"], "invalid choice: 'foo'"),
    (["--stages", "0"], "below the lowest allowed value"),
    (["--steps_per_stage", "-3"], "below the lowest allowed value"),
    (["--probe_size", "0"], "below the lowest allowed value"),
    (["--device", "gpu"], "is not auto, cpu, cuda"),
    (["--kl_direction", "backward"], "invalid choice"),
])
def test_bad_flags_are_refused_by_the_parser(argv, message, monkeypatch, capsys, tmp_path):
    import distill
    monkeypatch.setattr("sys.argv", ["distill.py", f"--out_dir={tmp_path / 'x'}", *argv])
    with pytest.raises(SystemExit) as e:
        plumbing.parse_config(distill.DistillConfig, "d")
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_yes_no_flags_and_descriptions(monkeypatch, capsys):
    import distill
    import runpy
    monkeypatch.setattr("sys.argv", ["distill.py", "--aw", "True", "--monotone", "false", "--epochs_unused"][:5])
    c = plumbing.parse_config(distill.DistillConfig, "staged distillation")
    assert c.aw is True and c.monotone is False
    for script, words in (("train_teacher.py", "SFT of a teacher"), ("distill.py", "Staged distillation")):
        monkeypatch.setattr("sys.argv", [script, "--help"])  # the script's own entry point, in this process
        with pytest.raises(SystemExit):
            runpy.run_path(str(ROOT / script), run_name="__main__")
        out = capsys.readouterr().out
        assert words in out.split("\n\n")[1], f"{script} --help: {out[:300]}"


@pytest.mark.parametrize("epochs, batch, message", [(2, 500, "larger than the 96 training examples")])
def test_sizes_checked_before_anything_is_written(tiny_domain, tmp_path, epochs, batch, message):
    with pytest.raises(plumbing.RunError, match=message):
        tt.train(cfg(tiny_domain, tmp_path / "out", epochs=epochs, batch_size=batch))
    assert not (tmp_path / "out").exists()


def test_bad_output_folders_and_bad_data_leave_nothing_behind(tiny_domain, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(plumbing.RunError, match="is a file, not a folder"):
        tt.train(cfg(tiny_domain, tmp_path / "file"))
    with pytest.raises(plumbing.RunError, match="cannot write there"):
        tt.train(cfg(tiny_domain, tmp_path / "file" / "sub"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for s in ("train", "val", "test"):
        (bad / f"{s}.jsonl").write_text('{"prompt": "a", "answer": "b"}\n' * 20)
    (bad / "test.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": "' + "x " * 200 + '", "answer": "b"}\n')
    with pytest.raises(data.DataError, match=r"test.jsonl:2: field 'prompt'\+'answer' is 202 tokens, more than the model's context of 128"):
        tt.train(cfg(str(bad), tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    r = subprocess.run([sys.executable, "train_teacher.py", f"--data={bad}", f"--out_dir={tmp_path / 'out'}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


def test_resume_checks_every_split_and_a_moved_or_relogged_folder_still_resumes(tiny_domain, tmp_path):
    dom = tmp_path / "dom"
    shutil.copytree(tiny_domain, dom)
    tt.train(cfg(str(dom), tmp_path / "a", stop_at_step=6))
    shutil.move(tmp_path / "a", tmp_path / "b")  # a moved run folder resumes where it was,
    tt.train(cfg(str(dom), tmp_path / "b", stop_at_step=9, log_every=5))  # also when it prints more often
    assert torch.load(tmp_path / "b" / "state.pt", weights_only=True)["step"] == 9
    lines = (dom / "test.jsonl").read_text().splitlines()
    (dom / "test.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # only test.jsonl changes
    with pytest.raises(plumbing.RunError, match="another config or other data"):
        tt.train(cfg(str(dom), tmp_path / "b"))


def test_truncated_manifest_is_named(tmp_path):
    (tmp_path / "manifest.json").write_text('{"checkpoints": [')
    with pytest.raises(plumbing.RunError, match="manifest.json: not valid JSON"):
        plumbing.read_json(tmp_path / "manifest.json")


def test_the_shared_step_clips_the_unscaled_gradients_and_counts_a_skipped_step():
    """distill.amp_step, the one step both scripts take. With an fp16 GradScaler of scale
    1024 and plain SGD (lr 1), a gradient of norm 5 clipped to 1 moves the weights by exactly 1:
    clipped before unscaling it would move them by 1/1024. A gradient of inf is skipped (the
    weights stay) and counted once; a finite step counts 0. Clip 0 is off: the full step, 5."""
    import train_teacher as tt
    from torch.amp import GradScaler

    def run(scaler, clip, grad):
        w = torch.nn.Parameter(torch.zeros(2))
        model = torch.nn.Module()
        model.w = w
        opt = torch.optim.SGD([w], lr=1.0)
        loss = (w * torch.tensor(grad)).sum()  # the gradient is `grad`
        skipped = tt.amp_step(loss, opt, scaler, model, clip, "step 1")
        return w.detach(), skipped

    w, skipped = run(GradScaler("cpu", init_scale=1024.0), 1.0, [3.0, 4.0])
    assert torch.linalg.norm(w).item() == pytest.approx(1.0, rel=1e-5) and skipped == 0
    w, skipped = run(None, 0.0, [3.0, 4.0])
    assert torch.linalg.norm(w).item() == pytest.approx(5.0, rel=1e-5) and skipped == 0
    w, skipped = run(GradScaler("cpu", init_scale=1024.0), 1.0, [float("inf"), 4.0])
    assert torch.equal(w, torch.zeros(2)) and skipped == 1
    with pytest.raises(plumbing.RunError, match="grad_norm"):  # without a scaler a non-finite norm stops the run
        run(None, 1.0, [float("nan"), 4.0])
