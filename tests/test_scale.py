"""The scale paths (scale.py, data.in_pieces, plumbing.load_folder) at the shapes where they matter,
on the CPU: a half-precision teacher that is still the trained teacher at long positions, the
vocabulary-sized head never whole at 128k, a resume that reads its state wherever it was
written, and a model folder loaded with about one copy of its weights in memory."""
import json
from contextlib import nullcontext

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import data
import forked
import plumbing
import scale
import scd
import train_teacher as tt
from model import GPTConfig, build
from test_train import cfg

V = 128_256  # Llama 3's vocabulary


def test_a_half_precision_stage_teacher_is_the_trained_teacher_at_long_positions(tmp_path):
    """Under bf16 autocast the stage teacher keeps its parameters in bf16 and RoPE's frequencies
    in float32: at positions 512 to 1023 of a Llama with sharp attention (lab.gpu_check, which
    measures the same on a GPU) its distribution is the float32 teacher's within what bf16
    arithmetic itself costs (the same weights in float32 under autocast), while casting the
    whole model, buffers included, moves it about a hundred times further."""
    from lab.gpu_check import half_teacher
    kl = half_teacher("cpu", tmp_path)
    assert kl["teacher_dtypes"] == ["torch.bfloat16", "torch.float32"]  # parameters, RoPE's inverse frequencies
    assert kl["kl_stage_teacher"] < 3 * kl["kl_float32_weights_under_autocast"] + 1e-6, kl
    assert kl["kl_whole_model_cast"] > 30 * kl["kl_stage_teacher"], kl  # the test can tell: RoPE rounded is another model


class LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor any operation makes while active."""
    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


class Ids:
    """A stand-in tokenizer: text is space-separated ids."""
    eot, bos = 0, []
    encode = staticmethod(lambda text: [int(t) for t in text.split()])


def test_evaluation_anchor_losses_probe_and_teacher_signal_never_hold_the_whole_logits_at_128k():
    """Four examples with 40-token answers (164 answer positions with their end tokens) at a
    128,256-token vocabulary, in pieces of 32 positions: evaluation, the anchor losses, the
    probe's stored log-probs, the probe's terms and the offline teacher signal each make no
    tensor larger than one piece of float32 logits (32 x V x 4 bytes); the whole would be 5 times
    that. Their figures equal those made in one piece."""
    torch.manual_seed(0)
    model = build(GPTConfig(arch="llama", vocab_size=V, n_layer=1, n_head=2, n_embd=16, block_size=64, bias=False)).eval()
    g = torch.Generator().manual_seed(0)
    examples = [dict(prompt=" ".join(map(str, torch.randint(1, V, (6,), generator=g).tolist())),
                     answer=" ".join(map(str, torch.randint(1, V, (40,), generator=g).tolist())), subdomain="s") for _ in range(4)]
    enc = data.encode(examples, Ids(), 64)
    piece, cpu = 32 * V * 4, ("cpu", nullcontext())
    cache = [data.probe_logprobs(model, enc, 0, *cpu, topk=64, chunk=164)] * 2  # two candidates, made in one piece
    runs = dict(
        evaluate=lambda chunk: data.evaluate(model, examples, Ids(), chunk=chunk)[0]["loss"],
        anchor=lambda chunk: data.example_losses(model, enc, 0, *cpu, chunk=chunk),
        probe=lambda chunk: data.probe_logprobs(model, enc, 0, *cpu, topk=64, chunk=chunk)[0],
        terms=lambda chunk: scd.scd_checkpoint(scale.probe_pieces(model, enc, cache, 1, 0, *cpu, chunk=chunk))[1:],
        signal=lambda chunk: scale.teacher_logits(model, enc, 0, *cpu, max_gib=1, topk=64, chunk=chunk)[3][0],
    )
    for name, run in runs.items():
        with LargestTensor() as largest:
            pieces = run(32)
        assert largest.bytes <= piece, (name, largest.bytes / piece)
        whole = run(164)
        torch.testing.assert_close(torch.as_tensor(pieces), torch.as_tensor(whole), rtol=1e-5, atol=1e-6, msg=name)
    with LargestTensor() as largest:
        runs["evaluate"](164)
    assert largest.bytes >= 164 * V * 4  # the test can tell


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_the_loss_in_pieces_at_a_temperature_equals_the_loss_in_one_piece(temperature):
    """--temperature reaches every piece: the KL of pieces of 3 positions at T = 0.5 and 2 equals
    the one-piece KL, and both differ from the KL at T = 1 (so a dropped temperature shows)."""
    torch.manual_seed(0)
    s, t = torch.randn(10, 50, requires_grad=True), torch.randn(10, 50)
    y, mask = torch.randint(0, 50, (2, 6)), torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 1:6], mask[1, :5] = True, True
    loss = lambda T, chunk: scd.distill_loss(s, t, y, mask, 0.7, None, "forward", T, chunk)[0]
    one, pieces = loss(temperature, 0), loss(temperature, 3)
    torch.testing.assert_close(pieces, one)
    (g1,), (g3,) = torch.autograd.grad(one, s), torch.autograd.grad(pieces, s)
    torch.testing.assert_close(g3, g1)
    assert abs(pieces.item() - loss(1.0, 3).item()) > 1e-3


def test_a_resume_reads_its_state_on_the_cpu_whatever_the_runs_device(tiny_domain, tmp_path):
    """The state file is read onto the CPU and copied into the live model and optimizer,
    whatever device the run is on (here 'meta', where no tensor can be read to): weights,
    AdamW's moments and torch's CPU random state come back as written."""
    c = cfg(tiny_domain, tmp_path, stop_at_step=3)
    tt.train(c)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    splits, _, model, enc = plumbing.prepare(c.data, c.preset, c.seed, c.init_from)
    optimizer = model.configure_optimizer(c.lr, c.weight_decay, (0.9, 0.95), "cpu")
    probe = data.ProbeStore(tmp_path, enc["train"], data.fingerprint(splits["train"]), c.probe_size, c.seed, c.probe_topk)
    torch.manual_seed(123)
    _, step = plumbing.resume_sft(tmp_path, c, tt.TrainConfig, splits, model, optimizer, None, [probe], "meta")
    assert step == 3 and torch.equal(torch.get_rng_state(), state["rng"])
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    moments = [s["exp_avg"] for s in optimizer.state_dict()["state"].values()]
    assert moments and all(m.device.type == "cpu" for m in moments)
    assert all(torch.equal(a, b["exp_avg"]) for a, b in zip(moments, state["optimizer"]["state"].values()))


FOLDER = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
folder = Path(sys.argv[1]); folder.mkdir()
c = dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False)
(folder / "config.json").write_text(json.dumps(c))
g = torch.Generator().manual_seed(0)
w = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
sd = {"model.embed_tokens.weight": w(32000, 1024), "lm_head.weight": w(32000, 1024), "model.norm.weight": w(1024)}
for i in range(16):
    p = f"model.layers.{i}."
    sd.update({p + n: w(1024, 1024) for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                                               "self_attn.o_proj.weight")})
    sd.update({p + "mlp.gate_proj.weight": w(2816, 1024), p + "mlp.up_proj.weight": w(2816, 1024),
               p + "mlp.down_proj.weight": w(1024, 2816), p + "input_layernorm.weight": w(1024),
               p + "post_attention_layernorm.weight": w(1024)})
save_file(sd, folder / "model.safetensors")
# the same weights as one of this project's checkpoints (bf16, as a bf16 run saves them), and
# rank-4 adapters whose base is that checkpoint
sys.path.insert(0, sys.argv[2])
import plumbing
from dataclasses import asdict
ckpt, adapters = folder.parent / "ckpt.pt", folder.parent / "adapters.pt"
torch.save(dict(model=sd, model_config=asdict(plumbing.config_from_hf(c, folder)), vocab=None, lora=None), ckpt)
shapes = dict(q=(1024, 1024), k=(1024, 1024), v=(1024, 1024), o=(1024, 1024), gate=(2816, 1024), up=(2816, 1024), down=(1024, 2816))
lora = {}
for i in range(16):
    for n, (o, d) in shapes.items():
        name = f"model.layers.{i}." + ("mlp." if n in ("gate", "up", "down") else "self_attn.") + f"{n}_proj."
        lora.update({name + "lora_A": torch.randn(4, d, generator=g), name + "lora_B": torch.randn(o, 4, generator=g)})
torch.save(dict(model=lora, model_config=asdict(plumbing.config_from_hf(c, folder)), vocab=None,
                lora=dict(rank=4, alpha=8, dropout=0.0, base=str(ckpt.resolve()), sha256=plumbing.weights_sha(ckpt))), adapters)
"""

LOAD = """
import sys, torch
sys.path.insert(0, sys.argv[2])
import plumbing
status = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
before = status("VmRSS")
model = plumbing.load_folder(sys.argv[1]) if sys.argv[1].endswith("llama") else plumbing.load_checkpoint(sys.argv[1])[0]
print(status("VmHWM") - before, sum(p.numel() * 4 for p in model.parameters()), model.lm_head.weight[3, 5].item())
"""


LOADED = ("llama", "ckpt.pt", "adapters.pt")


@pytest.fixture(scope="module")
def big_llama(tmp_path_factory):
    """A generated Llama folder of 542 MB (bf16, 271M weights), the same weights as a checkpoint
    of this project (ckpt.pt), and adapters whose base is that checkpoint (adapters.pt); then each
    loaded by LOAD in a process of its own, one after the other (tests/forked.py) -> (the folder,
    {what: LOAD's three figures})."""
    pytest.importorskip("safetensors", reason="the folder is written with the optional extra")
    root, repo = tmp_path_factory.mktemp("big"), plumbing.Path(plumbing.__file__).parent
    (root / "folder.py").write_text(FOLDER), (root / "load.py").write_text(LOAD)
    runs = forked.run([forked.job(root, "folder.py", root / "llama", repo)]
                      + [forked.job(root, "load.py", root / what, repo) for what in LOADED], width=1)
    assert all(code == 0 for code, _, _ in runs), [err[-2000:] for _, _, err in runs]
    assert (root / "llama" / "model.safetensors").stat().st_size > 500e6 and (root / "ckpt.pt").stat().st_size > 500e6
    return root / "llama", {what: out.split() for what, (_, out, _) in zip(LOADED, runs[1:])}


@pytest.mark.parametrize("what", LOADED)
def test_a_folder_checkpoint_or_adapter_base_loads_with_about_one_copy_of_its_weights_in_memory(big_llama, what):
    """Loading the folder, the checkpoint or the adapters (with their base) into float32 raises
    the process's peak memory by about that float32 copy (1.08 GB) and one tensor more (1.17 GB
    measured for the folder), not by the file, a float32 copy of it and a randomly initialised
    model (2.18 GB measured before); the weights are the file's."""
    folder, loaded = big_llama
    grew, copy, value = loaded[what]
    # measured: 1.03 to 1.04 of the copy (1.08 in a fresh Python, up to 1.35 beside other jobs)
    assert int(grew) < 1.4 * int(copy), (int(grew) / 2**20, int(copy) / 2**20)
    from safetensors import safe_open
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert float(value) == f.get_tensor("lm_head.weight")[3, 5].float().item()


def test_the_memory_plan_agrees_with_the_trace_of_every_phase_at_a_small_shape():
    """lab.memtrace at small Llama shapes (the paper's proportions, a 4096-token vocabulary, the
    head in pieces of 16 as the paper's is in pieces of 130): all 22 phases of the three runs
    traced with every weight trained, and the plan (scale.plan_phases) within 15% of the trace
    in each; the SFT step holds at least the float32 weights, their gradients and
    AdamW's two moments (16 bytes a weight), which the tracer must see though no tensor has data."""
    from lab import memtrace
    cfg = memtrace.MemTraceConfig(small=True, batch_size=4, seq_len=64, answer_len=16, eval_batch=16, probe_size=16,
                                  logit_chunk=16)
    # (with adapters the paper shapes' command checks it: 0.91 to 1.06, docs/gpu.md)
    peaks, plan = (f(cfg, "tiny-teacher", "tiny-student", 0, False) for f in (memtrace.trace, memtrace.planned))
    assert len(peaks) == 22 and set(plan) == set(peaks)
    off = {p: round(plan[p] / peaks[p], 2) for p in peaks if not 0.85 <= plan[p] / peaks[p] <= 1.15}
    assert not off, off
    P = build(GPTConfig(**memtrace.SHAPES["tiny-student"])).num_params()
    assert 16 * P <= peaks["student SFT: SFT step"] < 16 * P + 64 * 2**20


def test_stored_probe_reads_each_candidate_cast_after_the_previous_one_is_gone(tiny_domain, tmp_path, monkeypatch):
    """Scoring a trail's probe (a probe the teacher did not store): each candidate arrives in the
    autocast dtype, and no earlier candidate is alive when the next is read (two teachers at once
    would be outside the plan)."""
    import weakref
    tt.train(cfg(tiny_domain, tmp_path / "t", preset="teacher"))
    pool = json.loads((tmp_path / "t" / "manifest.json").read_text())["checkpoints"]
    model, tok = plumbing.load_checkpoint(tmp_path / "t" / pool[0]["file"])
    enc = data.encode(data.load_domain(str(tiny_domain))["train"], tok, model.config.block_size)
    del model
    alive, seen, real_read, real_logprobs = [], [], scale.read_teacher, data.probe_logprobs

    def read(path, device, dtype, base=None):
        seen.append(sum(r() is not None for r in alive))  # earlier candidates still alive as this one is read
        m = real_read(path, device, dtype, base)
        alive.append(weakref.ref(m[0]))
        return m
    monkeypatch.setattr(scale, "read_teacher", read)
    monkeypatch.setattr(data, "probe_logprobs", lambda m, *a, **k: seen.append(m.lm_head.weight.dtype) or real_logprobs(m, *a, **k))
    probe, cache = scale.stored_probe(tmp_path / "t", pool, enc, "fp", size=16, seed=7, topk=8, eot=tok.eot, device="cpu",
                                      ctx=torch.autocast("cpu", dtype=torch.bfloat16))
    assert seen == [0, torch.bfloat16] * len(pool) and len(cache) == len(pool) == 4
