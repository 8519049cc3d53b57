"""
The memory of every phase of a run at the paper's shapes, traced on this CPU without a GPU and
without allocating: torch's FakeTensorMode gives tensors shapes and no data, and MemTracker
(torch.distributed._tools.mem_tracker) records the peak of the live bytes while the functions
that train_teacher.py and distill.py call run on them: the models' forward and backward, the
losses in pieces, clipping and the AdamW step, evaluation, the anchor losses, the probe's
scoring, the stage teacher in half precision and its signal. Each phase's peak is printed
beside the memory plan's figure for it (scale.plan), and the last line gives the worst ratio.

    python -m lab.memtrace                   # Llama 3.2 3B -> 1B and 3.1 8B -> 3B, batch 8 x 512, answers of 128
    python -m lab.memtrace --small true      # tiny Llama shapes: what the tests run

The values are never computed: a loss is 0, a mask has `answer_len` positions per row.
"""
import gc
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._subclasses import fake_impls
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

import data
import scale
import scd
from lab.bench import SHAPES
from model import GPTConfig, add_lora, build
from plumbing import arg, parse_config, run_main

@dataclass
class MemTraceConfig:
    pairs: str = arg("llama-3.2-3b:llama-3.2-1b,llama-3.1-8b:llama-3.2-3b", "teacher:student pairs (lab.bench.SHAPES)")
    batch_size: int = arg(8, "examples per training step", low=1)
    seq_len: int = arg(512, "tokens per example", low=2)
    answer_len: int = arg(128, "answer positions per example (the answer and its end token)", low=1)
    eval_batch: int = arg(256, "examples per evaluation batch (data.evaluate's default)", low=1)
    probe_size: int = arg(256, "probe examples", low=1)
    candidates: int = arg(4, "candidates on the probe", low=1)
    lora_rank: int = arg(16, "the adapters' rank in the adapter settings", low=1)
    small: bool = arg(False, "tiny shapes (the test)")
    out: str = arg("", "also write every row as JSON here")


@contextmanager
def shapes_only(answer_len):
    """FakeTensorMode where what depends on values has a stand-in: a (B, T) mask selects
    answer_len positions per row, a scalar is 0, a truth value is True, a list of ints is
    answer_len per row. Restored on exit."""
    real = fake_impls.op_implementations_dict[torch.ops.aten.nonzero.default], FakeTensor.item, FakeTensor.tolist, FakeTensor.__bool__

    def nonzero(fake_mode, func, arg):
        n = arg.shape[0] * answer_len if arg.dim() == 2 else arg.numel()
        return arg.new_empty((n, arg.dim()), dtype=torch.int64)

    def tolist(self):
        return [answer_len if not self.is_floating_point() else 0.0] * self.shape[0] if self.dim() == 1 else 0.0
    fake_impls.op_implementations_dict[torch.ops.aten.nonzero.default] = nonzero
    FakeTensor.item, FakeTensor.tolist, FakeTensor.__bool__ = (lambda self: 0.0), tolist, (lambda self: True)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        fake_impls.op_implementations_dict[torch.ops.aten.nonzero.default] = real[0]
        FakeTensor.item, FakeTensor.tolist, FakeTensor.__bool__ = real[1:]


class Tracker(MemTracker):
    """MemTracker, for the peak of the whole process only: a model called again at the top
    level (the next step, the next batch) starts its module statistics afresh."""
    def _pre_fw_hook(self, module, inputs):
        parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
        if module in self.memory_tracking and not self._mod_tracker.is_bw and parents == {"Global"}:
            self.reset_mod_stats()
        super()._pre_fw_hook(module, inputs)

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):  # frozen weights take no gradient hook
        frozen = any(not p.requires_grad for p in module.parameters())
        return super()._track_module_params_and_buffers(module, install_grad_hooks and not frozen)


class Ids:
    """Text is space-separated token ids (the examples are made of ids)."""
    eot = 0
    encode = staticmethod(lambda text: [int(t) for t in text.split()])


def examples(n, seq_len, answer_len):
    """n examples of seq_len tokens whose last answer_len - 1 are the answer (its end token makes answer_len)."""
    prompt, answer = " ".join(["1"] * (seq_len - answer_len + 1)), " ".join(["2"] * (answer_len - 1))
    return [dict(prompt=prompt, answer=answer, subdomain="s") for _ in range(n)]


def trace(cfg, teacher_name, student_name, lora, grad_ckpt, small=False):
    """Every phase's peak (bytes) on one setting -> {phase: bytes}."""
    B, L, A = cfg.batch_size, cfg.seq_len, cfg.answer_len
    dtype, ctx = torch.bfloat16, torch.autocast("cpu", dtype=torch.bfloat16)  # CUDA's autocast makes the same casts here
    enc = data.encode(examples(max(B, cfg.eval_batch, cfg.probe_size), L, A), Ids(), L)
    peaks, mt = {}, None
    with shapes_only(A):
        def model(name, frozen=False):
            m = build(GPTConfig(**{**SHAPES[name], "block_size": L}))
            if lora and not frozen:
                add_lora(m, lora)
            for p in m.parameters():  # a frozen model or base in the autocast dtype (scale.StageTeacher, scale.start)
                if frozen or not p.requires_grad and lora:
                    p.data = p.data.to(dtype)
            m.grad_checkpointing = grad_ckpt
            return m

        def phase(name, fn):
            gc.collect()
            with mt:
                fn()
            peaks[name] = max(v["Total"] for v in mt.get_tracker_snapshot("peak").values())

        def steps(m, opt, teacher=None, signal=None, n=2):
            """The scripts' step, n times: forward, the loss in pieces, backward, clip, AdamW, grads freed."""
            chunk = data.logit_chunk(m.config.vocab_size)
            anchor = torch.ones(B)
            for i in range(n):
                x, y, mask = data.make_batch(enc, range(B), 0)
                with ctx:
                    s_logits = m(x, positions=mask)
                    if teacher is None and signal is None:
                        loss = data.answer_ce(s_logits, y, mask, chunk).mean()
                    else:
                        with torch.no_grad():
                            t_logits = teacher(x, positions=mask) if teacher is not None else \
                                scd.dense_logprobs(*signal, m.config.vocab_size)
                        loss, _ = scd.distill_loss(s_logits, t_logits, y, mask, 1.0, anchor, "forward", 1.0, chunk)
                loss.backward()
                scale.clip_grads(m, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

        for role, name in (("teacher", teacher_name), ("student", student_name)):
            m = model(name)
            opt = m.configure_optimizer(1e-4, 0.1, (0.9, 0.95), "cuda")
            mt = Tracker()  # a tracker per model: its hooks hold what it tracked, and a model let go must go
            mt.track_external(m, opt)
            phase(f"{role} SFT step", lambda: steps(m, opt))
            phase(f"{role} evaluation", lambda: data.evaluate(m, examples(cfg.eval_batch, L, A), Ids(), ctx=ctx))
            phase(f"{role} probe log-probs", lambda: data.probe_logprobs(m, enc[:cfg.probe_size], 0, "cpu", ctx, 64))
            if role == "student":
                phase("anchor losses", lambda: data.example_losses(m, enc, 0, "cpu", ctx))
            del m, opt
        mt = None
        gc.collect()

        s = model(student_name)
        opt = s.configure_optimizer(1e-4, 0.1, (0.9, 0.95), "cuda")
        t = model(teacher_name, frozen=True)
        mt = Tracker()
        mt.track_external(s, opt, t)
        phase("distillation step, teacher in the loop", lambda: steps(s, opt, teacher=t))
        # a stage's start: the candidates' stored log-probs on the probe, the last stage's teacher still held
        n_probe = cfg.probe_size * A
        cache = [(torch.zeros(n_probe, 64), torch.zeros(n_probe, 64, dtype=torch.int32)) for _ in range(cfg.candidates)]
        mt.track_external(*[v for c in cache for v in c])
        phase("probe terms (stage start)", lambda: scale.probe_terms(s, enc[:cfg.probe_size], cache, 0, 0, "cpu", ctx, "flipped"))
        phase("student evaluation, training state alive", lambda: data.evaluate(s, examples(cfg.eval_batch, L, A), Ids(), ctx=ctx))
        phase("stage teacher's offline signal", lambda: scale.teacher_logits(t, enc[:64], 0, "cpu", ctx, 1e9, topk=64))
        del t, cache  # with --teacher_topk the teacher is let go once its signal is kept
        N = B * A
        signal = (torch.zeros(N, 64), torch.zeros(N, 64, dtype=torch.int32))
        mt = Tracker()
        mt.track_external(s, opt, *signal)
        phase("distillation step, offline top-k", lambda: steps(s, opt, signal=signal))
    return peaks


def planned(cfg, teacher_name, student_name, lora, grad_ckpt):
    """The memory plan's figures (scale.plan_parts, what the scripts print before a run) for the
    phases it covers: the training steps. -> {phase: bytes}."""
    with torch.device("meta"):
        def model(name, trained=True):
            m = build(GPTConfig(**{**SHAPES[name], "block_size": cfg.seq_len}))
            return add_lora(m, lora) if lora and trained else m
        T, S, frozen = model(teacher_name), model(student_name), model(teacher_name, trained=False)
    plan = lambda m, t: sum(scale.plan_parts(m, t, cfg.batch_size, cfg.seq_len, cfg.answer_len, "bfloat16", grad_ckpt,
                                             data.logit_chunk(m.config.vocab_size)).values())
    return {"teacher SFT step": plan(T, None), "student SFT step": plan(S, None),
            "distillation step, teacher in the loop": plan(S, frozen)}


TINY = dict(arch="llama", bias=False, block_size=64, vocab_size=2048, rope_theta=500000.0, tie_embeddings=False)
SHAPES.update({"tiny-teacher": dict(TINY, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128),
               "tiny-student": dict(TINY, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64)})


def main(cfg):
    rows = []
    pairs = [("tiny-teacher", "tiny-student")] if cfg.small else [tuple(p.split(":")) for p in cfg.pairs.split(",")]
    for t, s in pairs:
        for lora in (0, cfg.lora_rank):
            for ckpt in (False, True):
                t0 = time.time()
                peaks, plan = trace(cfg, t, s, lora, ckpt), planned(cfg, t, s, lora, ckpt)
                for phase, b in peaks.items():
                    row = dict(pair=f"{t} -> {s}", trained=f"LoRA r{lora}" if lora else "all", grad_ckpt=ckpt, phase=phase,
                               trace_mib=round(b / 2**20, 1), plan_mib=round(plan[phase] / 2**20, 1) if phase in plan else None)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                print(f"({time.time() - t0:.0f}s)", flush=True)
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    ratios = [(r["plan_mib"] / r["trace_mib"], r) for r in rows if r["plan_mib"] and r["trace_mib"]]
    lo, hi = min(ratios, key=lambda x: x[0]), max(ratios, key=lambda x: x[0])
    print(f"phases the plan covers: {len(ratios)} of {len(rows)}; plan / trace from {lo[0]:.2f} ({lo[1]['phase']}, "
          f"{lo[1]['pair']}, {lo[1]['trained']}, ckpt {lo[1]['grad_ckpt']}) to {hi[0]:.2f} ({hi[1]['phase']}, {hi[1]['pair']}, "
          f"{hi[1]['trained']}, ckpt {hi[1]['grad_ckpt']})")
    return rows


def table(rows, cards=(24, 48, 80)):
    """Markdown: per setting, the traced peak of each phase group (the training steps; evaluation,
    anchor and probe passes; the stage teacher's signal), the largest phase, and the cards whose
    memory holds it within 95% (5% for CUDA's own use)."""
    out = ["| pair | trained | ckpt | SFT step: teacher / student (plan) | distillation step (plan) | evaluation, probe, "
           "anchor: largest | largest phase | fits (GB card) |", "|" + " --- |" * 8]
    keys = sorted({(r["pair"], r["trained"], r["grad_ckpt"]) for r in rows}, key=lambda k: (k[0], k[1] != "all", k[2]))
    gib = lambda r: f"{r['trace_mib'] / 1024:.1f}" + (f" ({r['plan_mib'] / 1024:.1f})" if r["plan_mib"] else "")
    for k in keys:
        rs = {r["phase"]: r for r in rows if (r["pair"], r["trained"], r["grad_ckpt"]) == k}
        passes = max((r for p, r in rs.items() if "step" not in p), key=lambda r: r["trace_mib"])
        top = max(rs.values(), key=lambda r: r["trace_mib"])
        fits = [str(g) for g in cards if top["trace_mib"] * 2**20 <= 0.95 * g * 1e9] or ["none"]
        out.append(f"| {k[0]} | {k[1]} | {'on' if k[2] else 'off'} | {gib(rs['teacher SFT step'])} / {gib(rs['student SFT step'])} | "
                   f"{gib(rs['distillation step, teacher in the loop'])} | {passes['trace_mib'] / 1024:.1f} ({passes['phase']}) | "
                   f"{top['phase']}: {top['trace_mib'] / 1024:.1f} | {', '.join(fits)} |")
    return "\n".join(out)


if __name__ == "__main__":
    run_main(main, parse_config(MemTraceConfig, "Each phase's peak memory at the paper's shapes, traced without a GPU."))
