"""
The memory of every phase of a run at the paper's shapes, traced on this CPU without a GPU and
without allocating: torch's FakeTensorMode gives tensors shapes and no data, and MemTracker
(torch.distributed._tools.mem_tracker) records the peak of the live bytes while the functions
that train_teacher.py and distill.py call run on them: the models' forward and backward, the
losses in pieces, clipping and the AdamW step, evaluation, the anchor losses, the probe's
scoring, saves, a resume, a stage switch, the stage teacher in half precision and its signal,
each phase with what the scripts keep alive in it. Each phase's peak is printed beside the
memory plan's figure for it (scale.plan_phases), and the last line gives the worst ratio.

    python -m lab.memtrace                   # Llama 3.2 3B -> 1B and 3.1 8B -> 3B, batch 8 x 512, answers of 128
    python -m lab.memtrace --small true --seq_len 64 --answer_len 16 --logit_chunk 16   # small Llama shapes (the test)

The values are never computed: a loss is 0, a mask has `answer_len` positions per row.
"""
import copy
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
from plumbing import checkpoint_dict, load_optimizer, load_trained, optimizer_state, trained_state
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
    logit_chunk: int = arg(0, "answer positions per piece of the head (0: data.logit_chunk, 130 at 128k tokens)", low=0)
    out: str = arg("", "also write every row as JSON here")


@contextmanager
def shapes_only(answer_len):
    """FakeTensorMode where what depends on values has a stand-in: a (B, T) mask selects
    answer_len positions per row, a scalar is 0, a truth value is True, a list of ints is
    answer_len per row, an index (int()) 0. Restored on exit."""
    real = (fake_impls.op_implementations_dict[torch.ops.aten.nonzero.default], FakeTensor.item, FakeTensor.tolist,
            FakeTensor.__bool__, FakeTensor.__int__)

    def nonzero(fake_mode, func, arg):
        n = arg.shape[0] * answer_len if arg.dim() == 2 else arg.numel()
        return arg.new_empty((n, arg.dim()), dtype=torch.int64)

    def tolist(self):
        return [answer_len if not self.is_floating_point() else 0.0] * self.shape[0] if self.dim() == 1 else 0.0
    fake_impls.op_implementations_dict[torch.ops.aten.nonzero.default] = nonzero
    FakeTensor.item, FakeTensor.tolist, FakeTensor.__bool__ = (lambda self: 0.0), tolist, (lambda self: True)
    FakeTensor.__int__ = lambda self: 0
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        fake_impls.op_implementations_dict[torch.ops.aten.nonzero.default] = real[0]
        FakeTensor.item, FakeTensor.tolist, FakeTensor.__bool__, FakeTensor.__int__ = real[1:]


class Tracker(MemTracker):
    """MemTracker, for the peak of the whole process only: a model called again at the top
    level (the next step, the next batch) starts its module statistics afresh."""
    def _pre_fw_hook(self, module, inputs):
        parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
        if module in self.memory_tracking and not self._mod_tracker.is_bw and parents == {"Global"}:
            self.reset_mod_stats()
        super()._pre_fw_hook(module, inputs)

    def _update_peak_stats(self, peak_state):
        """The process's peak alone, as MemTracker keeps it; its per-module peaks, a loop over every
        module tracked at every operation (two thirds of a trace's time), are never read here."""
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev], self._peak_mem_snap[dev] = snap["Total"], copy.deepcopy(snap)

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):  # frozen weights take no gradient hook
        frozen = any(not p.requires_grad for p in module.parameters())
        return super()._track_module_params_and_buffers(module, install_grad_hooks and not frozen)


class Ids:
    """Text is space-separated token ids (the examples are made of ids)."""
    eot, ids, bos = 0, None, []
    encode = staticmethod(lambda text: [int(t) for t in text.split()])


def examples(n, seq_len, answer_len):
    """n examples of seq_len tokens whose last answer_len - 1 are the answer (its end token makes answer_len)."""
    prompt, answer = " ".join(["1"] * (seq_len - answer_len + 1)), " ".join(["2"] * (answer_len - 1))
    return [dict(prompt=prompt, answer=answer, subdomain="s") for _ in range(n)]


def trace(cfg, teacher_name, student_name, lora, grad_ckpt, device=None):
    """Every phase's peak (bytes) on one setting, the phases in the scripts' order and with what
    the scripts keep alive in each -> {phase: bytes}. A pass without gradients runs one batch
    (data.fit_batch's): the others would repeat its peak. device: run for real there instead
    (lab.gpu_check), each phase's peak read from CUDA's allocator -> {phase: (allocated,
    reserved)}, (None, None) on the CPU."""
    B, L, A = cfg.batch_size, cfg.seq_len, cfg.answer_len
    dev = device or "cpu"
    dtype, ctx = torch.bfloat16, torch.autocast(dev.split(":")[0], dtype=torch.bfloat16)  # CUDA's casts, on the CPU too
    fused = "cuda" if device is None else dev.split(":")[0]  # the optimizer a GPU run builds
    enc = data.encode(examples(max(B, cfg.eval_batch, cfg.probe_size, 64), L, A), Ids(), L)
    n_eval, n_probe = data.fit_batch(cfg.eval_batch, enc), min(cfg.probe_size, data.fit_batch(32, enc))  # a batch of each pass
    peaks, mt = {}, None

    def track(*objs):
        if device is None:
            mt.track_external(*objs)
    with shapes_only(A) if device is None else torch.device(dev):
        def model(name, frozen=False):
            if frozen:  # a stage teacher: read on the host, cast, moved (scale.StageTeacher): it arrives in bf16
                torch.set_default_dtype(dtype)
            m = build(GPTConfig(**{**SHAPES[name], "block_size": L}))
            torch.set_default_dtype(torch.float32)
            if lora and not frozen:
                add_lora(m, lora)
                scale.half(m, dtype, frozen_only=True)
            m.grad_checkpointing = grad_ckpt
            return m

        def phase(name, fn):
            gc.collect()
            if device is not None:
                cuda = dev.startswith("cuda")
                if cuda:
                    torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats(dev)
                out = fn()
                peaks[name] = (torch.cuda.max_memory_allocated(dev), torch.cuda.max_memory_reserved(dev)) if cuda else (None, None)
                return out
            with mt:
                out = fn()
            peaks[name] = max(v["Total"] for v in mt.get_tracker_snapshot("peak").values())
            return out

        def steps(m, opt, teacher=None, signal=None, cached=None, n=2):
            """The scripts' step, n times: forward, the loss in pieces, backward, clip, AdamW, grads freed."""
            chunk = data.logit_chunk(m.config.vocab_size, cfg.logit_chunk)
            anchor = torch.ones(B, device=dev)
            for i in range(n):
                x, y, mask = data.make_batch(enc, range(B), 0, dev)
                with ctx:
                    s_logits = m(x, positions=mask)
                    if teacher is None and signal is None and cached is None:
                        loss = scd.gold_ce(s_logits, y, mask, chunk).mean()
                    else:
                        with torch.no_grad():
                            t_logits = teacher(x, positions=mask) if teacher is not None else \
                                torch.cat([cached[j] for j in range(B)]) if cached is not None else \
                                scd.dense_logprobs(*signal, m.config.vocab_size)
                        loss, _ = scd.distill_loss(s_logits, t_logits, y, mask, 1.0, anchor, "forward", 1.0, chunk)
                loss.backward()
                scale.clip_grads(m, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)

        chunk = lambda m: data.logit_chunk(m.config.vocab_size, cfg.logit_chunk)
        evaluate = lambda m: data.evaluate(m, examples(n_eval, L, A), Ids(), dev, ctx=ctx, chunk=chunk(m))
        for role, name in (("teacher SFT", teacher_name), ("student SFT", student_name)):  # train_teacher.py, twice
            m = model(name)
            opt = m.configure_optimizer(1e-4, 0.1, (0.9, 0.95), fused)
            mt = Tracker()  # a tracker per model: its hooks hold what it tracked, and a model let go must go
            track(m, opt)
            phase(f"{role}: SFT step", lambda: steps(m, opt))
            phase(f"{role}: checkpoint evaluation", lambda: evaluate(m))
            phase(f"{role}: checkpoint save", lambda: (checkpoint_dict(m, Ids, "bfloat16"), optimizer_state(m, opt)))
            phase(f"{role}: probe log-probs", lambda: data.probe_logprobs(m, enc[:n_probe], 0, dev, ctx, 64, chunk=chunk(m)))
            saved = dict(model={k: v.detach().clone() for k, v in trained_state(m).items()}, optimizer=opt.state_dict())
            phase(f"{role}: resume", lambda: (load_trained(m, saved["model"]), load_optimizer(m, opt, saved["optimizer"])))
            del saved
            opt = None  # the optimizer goes before the test pass and the anchor losses
            phase(f"{role}: test and anchor losses", lambda: (evaluate(m), data.example_losses(m, enc[:n_eval], 0, dev, ctx, chunk=chunk(m))))
            del m
        mt = None
        gc.collect()

        s = model(student_name)  # distill.py
        mt = Tracker()
        track(s)
        saved = {k: v.detach().clone() for k, v in trained_state(s).items()}
        phase("distillation: resume", lambda: load_trained(s, saved))
        del saved
        # the probe's stored log-probs of every candidate, alive all run; the last stage's teacher
        cache = [(torch.zeros(cfg.probe_size * A, 64), torch.zeros(cfg.probe_size * A, 64, dtype=torch.int32))
                 for _ in range(cfg.candidates)]
        held = [model(teacher_name, frozen=True)]
        track(*[v for c in cache for v in c], held[0])
        phase("distillation: stage start: probe terms", lambda: scd.scd_checkpoint(scale.probe_pieces(s, enc[:n_probe], cache, 0, 0, dev, ctx, chunk=chunk(s))))

        def switch():  # scale.StageTeacher.use: the last teacher let go, then the next one built
            held[0] = None
            gc.collect()
            held[0] = model(teacher_name, frozen=True)
        phase("distillation: stage switch", switch)
        t = held[0]
        opt = s.configure_optimizer(1e-4, 0.1, (0.9, 0.95), fused)
        track(opt)
        phase("distillation: distillation step", lambda: steps(s, opt, teacher=t))
        opt = None  # AdamW's state goes at the stage's end
        phase("distillation: stage end: validation", lambda: evaluate(s))
        # --teacher_cache_gib: at a stage's start the teacher's logits on (here 64) training examples are kept, then
        # each batch's are read back
        cache_rows = phase("distillation: teacher's cached logits", lambda: scale.teacher_logits(t, enc[:64], 0, dev, ctx, 1e9,
                                                                                                  chunk=chunk(t)))
        opt = s.configure_optimizer(1e-4, 0.1, (0.9, 0.95), fused)
        mt = Tracker()  # a fresh tracker for the next stage's steps (its module records start again)
        track(s, opt, t, *[v for c in cache for v in c], *cache_rows)
        phase("distillation: distillation step, cached logits", lambda: steps(s, opt, cached=cache_rows))
        cache_rows = opt = None
        rows = phase("distillation: teacher's offline signal", lambda: scale.teacher_logits(t, enc[:64], 0, dev, ctx, 1e9, topk=64, chunk=chunk(t)))
        t = held[0] = None  # with --teacher_topk the teacher goes once its signal is kept
        N = B * A
        signal = (torch.zeros(N, 64), torch.zeros(N, 64, dtype=torch.int32))
        opt = s.configure_optimizer(1e-4, 0.1, (0.9, 0.95), fused)
        track(opt, *signal)
        phase("distillation: distillation step, offline top-k", lambda: steps(s, opt, signal=signal))
        opt = rows = None
        phase("distillation: test", lambda: evaluate(s))
    return peaks


def planned(cfg, teacher_name, student_name, lora, grad_ckpt):
    """The memory plan's figure for every phase (scale.plan_phases, whose largest the scripts
    print before a run), for the three runs of a setting. -> {phase: bytes}."""
    with torch.device("meta"):
        def model(name, trained=True):
            m = build(GPTConfig(**{**SHAPES[name], "block_size": cfg.seq_len}))
            if lora and trained:
                scale.half(add_lora(m, lora), torch.bfloat16, frozen_only=True)
            return m
        T, S, frozen = model(teacher_name), model(student_name), model(teacher_name, trained=False)
    plan = lambda m, t, **kw: scale.plan_phases(m, t, cfg.batch_size, cfg.seq_len, cfg.answer_len, "bfloat16", grad_ckpt,
                                                data.logit_chunk(m.config.vocab_size, cfg.logit_chunk), passes=(cfg.eval_batch, min(32, cfg.probe_size)), **kw)
    held = cfg.candidates * cfg.probe_size * cfg.answer_len * 64 * 8  # the probe's stored log-probs: float32 and int32
    signal = 64 * cfg.answer_len * 64 * 8  # the offline rows of the examples traced
    cache = 64 * cfg.answer_len * (S.config.vocab_size * 2)  # their whole logits, in the autocast dtype
    out = {f"teacher SFT: {k}": v for k, v in plan(T, None).items()}
    out.update({f"student SFT: {k}": v for k, v in plan(S, None).items()})
    out.update({f"distillation: {k}": v for k, v in plan(S, frozen, held=held, signal=signal, cache=cache).items()})
    return out


TINY = dict(arch="llama", bias=False, block_size=64, vocab_size=4096, rope_theta=500000.0, tie_embeddings=False)
SHAPES.update({"tiny-teacher": dict(TINY, n_layer=2, n_head=8, n_kv_head=2, n_embd=256, intermediate_size=1024),
               "tiny-student": dict(TINY, n_layer=2, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=512)})


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
                               trace_mib=round(b / 2**20, 1), plan_mib=round(plan[phase] / 2**20, 1))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                print(f"({time.time() - t0:.0f}s)", flush=True)
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    r = max(rows, key=lambda r: abs(r["plan_mib"] / r["trace_mib"] - 1))
    print(f"worst plan / trace over {len(rows)} phases: {r['plan_mib'] / r['trace_mib']:.3f} ({r['phase']}; {r['pair']}, "
          f"{r['trained']}, checkpointing {'on' if r['grad_ckpt'] else 'off'})")
    return rows


def table(rows, cards=(24, 48, 80)):
    """Markdown: per setting, the traced peak (and the plan) of the training steps, the largest
    pass without gradients, the largest phase, and the cards whose memory holds the larger of
    the largest phase's trace and plan with the margin a run is refused by (scale.card_fits)."""
    out = ["| pair | trained | ckpt | SFT step: teacher / student | distillation step | largest pass without gradients | "
           "largest phase | plan / trace, all phases | fits (GB card) |", "|" + " --- |" * 9]
    keys = sorted({(r["pair"], r["trained"], r["grad_ckpt"]) for r in rows}, key=lambda k: (k[0], k[1] != "all", k[2]))
    gib = lambda r: f"{r['trace_mib'] / 1024:.1f} ({r['plan_mib'] / 1024:.1f})"
    for k in keys:
        rs = {r["phase"]: r for r in rows if (r["pair"], r["trained"], r["grad_ckpt"]) == k}
        passes = max((r for p, r in rs.items() if "step" not in p), key=lambda r: r["trace_mib"])
        top = max(rs.values(), key=lambda r: max(r["trace_mib"], r["plan_mib"]))
        ratios = [r["plan_mib"] / r["trace_mib"] for r in rs.values()]
        fits = [str(g) for g in cards if scale.card_fits(max(top["trace_mib"], top["plan_mib"]) * 2**20, g)] or ["none"]
        out.append(f"| {k[0]} | {k[1]} | {'on' if k[2] else 'off'} | {gib(rs['teacher SFT: SFT step'])} / "
                   f"{gib(rs['student SFT: SFT step'])} | {gib(rs['distillation: distillation step'])} | {gib(passes)} "
                   f"{passes['phase']} | {gib(top)} {top['phase']} | {min(ratios):.2f} to {max(ratios):.2f} | {', '.join(fits)} |")
    return "\n".join(out)


if __name__ == "__main__":
    run_main(main, parse_config(MemTraceConfig, "Each phase's peak memory at the paper's shapes, traced without a GPU."))
