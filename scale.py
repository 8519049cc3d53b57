"""
The scale paths, behind a few calls, so that distill.py and train_teacher.py read as the method:
where a stage teacher's signal comes from (in the loop, cached, offline top-k, half precision,
adapter swaps), the probe's stored log-probs and its terms scored in pieces of the vocabulary,
the system flags both scripts share, the memory plan, DDP and FSDP2, and gradient clipping over
shards. A reader of the method never needs to open this file. Every exact path here gives the
same numbers as the plain one on the CPU demo (tests/test_scale.py, tests/test_chunks.py); the
offline top-k signal is an approximation, and lab/topk.py measures what it changes.
"""
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import scd
from model import Block, LlamaBlock
from plumbing import RunError, arg, atomic_save, check_teacher, load_checkpoint, out_folder, trained_state


@dataclass
class SystemConfig:
    """The flags of system and scale that train_teacher.py and distill.py share, declared once.
    None of them changes the method's equations, though --lora_rank changes which weights train;
    the CPU demo leaves them all at their defaults."""
    lora_rank: int = arg(0, "LoRA adapters of this rank on every projection of a frozen --init_from: only they train "
                         "(0: every weight); a checkpoint then holds the adapters and the base's path and sha256", low=0)
    lora_alpha: float = arg(0.0, "the adapters' scale is alpha / rank (0: alpha = 2 x rank)", low=0)
    lora_dropout: float = arg(0.0, "dropout on the adapters' input", low=0)
    device: str = arg("auto", "cpu, cuda, cuda:1, ... (auto: cuda if available)")
    dtype: str = arg("auto", "autocast precision (auto: bf16 on CUDA cards with native bf16, else fp16; fp32 on CPU)",
                     choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = arg(False, "torch.compile the trained model (CUDA; slow to start, faster per step)")
    grad_ckpt: bool = arg(False, "activation checkpointing: recompute each block in the backward pass (less memory, more time)")
    fsdp: bool = arg(False, "under torchrun, shard weights, gradients and AdamW state over the processes (FSDP2), not DDP")
    dist_timeout: int = arg(180, "under torchrun, minutes a process waits for the others (NCCL's own: 10); rank 0 alone runs "
                            "the test pass and the anchor losses, a forward pass over test and over train, while they wait",
                            low=1)
    logit_chunk: int = arg(0, "answer positions per piece of the vocabulary-sized head and losses (0: pieces of at most "
                           "64 MiB of float32 logits; the CPU demo's batches fit in one)", low=0)


@dataclass
class TeacherSignalConfig(SystemConfig):
    """distill.py's flags of scale: where the stage teacher's signal is kept (StageTeacher)."""
    teacher_cache_gib: float = arg(2.0, "keep each stage's teacher logits on the training set if they fit in this many GiB "
                                   "(0: off)", low=0)
    teacher_topk: int = arg(0, "keep the stage teacher's signal offline: its top-k log-probs per answer token and the tail "
                            "mass, computed once per choice, then train with no teacher in memory (0: full logits)", low=0)


# -----------------------------------------------------------------------------
# the stage teacher: c_k frozen, and the signal it gives each training batch

def half(model, dtype, frozen_only=False):
    """A frozen model's parameters (or only the frozen ones: an adapted model's base) in the
    autocast dtype, half the memory; its buffers kept: RoPE's inverse frequencies rounded to
    bf16 would turn position 512 by up to 0.9 rad."""
    for p in model.parameters():
        if not (frozen_only and p.requires_grad):
            p.data = p.data.to(dtype)
    return model


def read_teacher(path, device, dtype, base=None):
    """A teacher checkpoint for inference on `device` -> (model, tokenizer): read on the CPU,
    its parameters cast to dtype (the autocast dtype; None keeps float32), then moved, so a
    float32 copy never reaches the GPU. `base`: the previous candidate of an adapter trail
    (adapter_base), which stays where it is and has only its adapters swapped."""
    model, tok = load_checkpoint(path, into=base)
    return (model if model is base else (half(model, dtype) if dtype else model).to(device)), tok


def adapter_base(model):
    """What read_teacher may keep of the previous candidate: an adapter trail's model, else nothing.
    The caller lets go of its own reference before the next read, so two bases never coexist."""
    return model if model is not None and model.lora else None


class StageTeacher:
    """The teacher checkpoint c_k of the current stage, frozen (under bf16 or fp16 autocast its
    parameters in that dtype), and its logits at every training example's answer positions, computed once
    per choice when they fit in cache_gib (each example is seen many times per stage). With topk,
    the offline signal: each row kept as its top-k log-probs (scd.compress_logprobs), expanded
    per batch, and the teacher itself let go until the next choice. A checkpoint is read on the
    CPU, cast, then moved: a float32 copy never reaches the GPU; the previous stage's teacher is
    let go before the next is built, except the frozen base of an adapter trail, which stays."""

    def __init__(self, tdir, train_enc, eot, device, dtype, ctx, cache_gib, topk=0, chunk=0):
        self.tdir, self.enc, self.eot, self.device, self.ctx = tdir, train_enc, eot, device, ctx
        self.cache_gib, self.topk, self.chunk = cache_gib, topk, chunk
        self.dtype = ctx.fast_dtype if dtype != "float32" else None  # under autocast: the teacher's parameters in its dtype
        self.file = self.model = self.rows = None

    def use(self, file):
        if file == self.file:
            return
        base = adapter_base(self.model)  # an adapter trail: swap adapters only
        self.model = self.rows = self.file = None
        gc.collect()
        model = self.model = read_teacher(self.tdir / file, self.device, self.dtype, base)[0]
        self.vocab = model.config.vocab_size
        self.rows = teacher_logits(model, self.enc, self.eot, self.device, self.ctx, self.cache_gib, topk=self.topk,
                                   chunk=self.chunk)
        self.file = file
        if self.topk and self.rows:
            self.model = None  # the signal is offline: no teacher in memory while the student trains

    @torch.no_grad()
    def logits(self, idx, x, mask):
        """The teacher's logits at the batch's answer positions (N, V): from the cache, from the
        offline top-k (log-probs with the tail spread evenly: logits of the same distribution),
        or from the teacher in the loop."""
        if self.rows and self.topk:
            return torch.cat([scd.dense_logprobs(*self.rows[j], self.vocab) for j in idx])
        return torch.cat([self.rows[j] for j in idx]) if self.rows else self.model(x, positions=mask)

    def release(self):
        self.model = self.rows = self.file = None
        gc.collect()


@torch.no_grad()
def teacher_logits(teacher, enc, eot, device, ctx, max_gib, batch_size=64, topk=0, chunk=0):
    """The teacher's logits at every training example's answer positions, one tensor per
    example (with topk, its top-k log-probs and their indices, made a piece of positions at a
    time), or None if they would take more than max_gib."""
    n_tok = sum(len(a) + 1 for _, a in enc)
    if n_tok * (8 * topk if topk else 4 * teacher.config.vocab_size) > max_gib * 2**30:
        return None
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]) + len(enc[i][1]))  # batches pad little
    keep = (lambda lg, y: scd.compress_logprobs(torch.log_softmax(lg.float(), -1), topk)) if topk else (lambda lg, y: lg)
    rows, at = [None] * len(enc), iter(order)
    for out, mask in data.answer_pieces(teacher, [enc[i] for i in order], eot, device, ctx, keep, batch_size, chunk):
        split = mask.sum(1).tolist()
        for r in (zip(*(t.split(split) for t in out)) if topk else out.split(split)):
            rows[next(at)] = r
    return rows


# -----------------------------------------------------------------------------
# the probe (METHOD.md section 2.3): the candidates' stored log-probs, and both terms in pieces

def stored_probe(tdir, pool, train_enc, train_fp, size, seed, topk, eot, device, ctx, chunk=0):
    """-> (the probe drawn with `seed`, each candidate's compressed log-probs on it). The
    teacher run stored them (data.ProbeStore); a file made on another probe is never used:
    they are scored here then, and stored in the teacher's folder for the next run."""
    store = data.ProbeStore(tdir, train_enc, train_fp, size, seed, topk)
    steps = [c["step"] for c in pool]
    cache = store.get(steps, device) if store.load() else None
    if cache is None:
        if store.path.exists():
            print(f"note: {store.path} was made on another probe or other checkpoints; computing the probe's log-probs here")
        store.data.update(steps=[], values=[], indices=[])
        model = None  # on an adapter trail each candidate swaps in its adapters only
        for c in pool:
            base, model = adapter_base(model), None  # the previous candidate let go before the next is read
            model = read_teacher(tdir / c["file"], device, getattr(ctx, "fast_dtype", None), base)[0]
            store.add(c["step"], data.probe_logprobs(model, store.probe, eot, device, ctx, topk, chunk=chunk))
        del model, base
        try:
            atomic_save(store.data, store.path)
        except OSError as e:
            print(f"note: could not store the probe in {tdir} ({e.strerror}); the next run will compute it again")
        cache = store.get(steps, device)
    return store.probe, cache


@torch.no_grad()
def probe_pieces(student, probe, cache, best, eot, device, ctx, chunk=0, batch_size=32):
    """The probe's log-probs for scd.scd_checkpoint, a piece of answer positions at a time:
    yields (T*'s, each candidate's, the student's), each (n, V). The student's come from its
    hidden states a piece at a time, and each candidate's is expanded from its stored top-k
    (scd.dense_logprobs) only when the criterion reaches it, so at a 128k vocabulary no
    (tokens x V) array exists whole. The criterion itself is all in scd.scd_checkpoint."""
    V, at = student.config.vocab_size, 0
    chunk = chunk or data.logit_chunk(V)
    batch_size = data.fit_batch(batch_size, probe)
    for s in range(0, len(probe), batch_size):
        x, _, mask = data.make_batch(probe, range(s, min(s + batch_size, len(probe))), eot, device)
        with ctx:
            h, head = student(x, positions=mask, head=lambda h, lm_head: (h, lm_head))  # hidden states at the answers
        for r in range(0, h.size(0), chunk):
            with ctx:
                student_lp = torch.log_softmax(head(h[r:r + chunk]).float(), -1)
            piece = lambda values, indices, a=at, n=student_lp.size(0): scd.dense_logprobs(values[a:a + n], indices[a:a + n], V)
            yield piece(*cache[best]), (piece(*c) for c in cache), student_lp
            at += student_lp.size(0)


# -----------------------------------------------------------------------------
# the memory plan, the devices, and the step over shards

def plan_parts(model, teacher, batch_size, seq_len, answer_len, dtype, grad_ckpt, chunk=0):
    """Bytes a training step holds, by part (an estimate, made before the first step): the
    trained weights in float32 with their gradients and AdamW's two moments (with adapters,
    those of the adapters alone, and the frozen base in the autocast dtype); the frozen teacher
    in the autocast dtype; the activations kept for the backward pass (about 7 C + 2 kv + 4 I
    values per token and layer, or with activation checkpointing each block's input and one
    block's whole); the logits at the answer positions: in one piece, float32 copies of the
    student's, their log-softmax and gradient, and the teacher's; in pieces of `chunk`
    positions, the student's and teacher's logits and the student's gradient in the autocast
    dtype, and four float32 copies of one piece."""
    c, b = model.config, 2 if dtype in ("bfloat16", "float16") else 4
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)  # trained: all, or the adapters alone
    frozen = model.num_params() - P  # an adapted model's base, kept in the autocast dtype (start)
    per_layer = 7 * c.n_embd + 2 * c.n_kv_head * c.head_dim + 4 * c.intermediate_size  # values per token
    acts = batch_size * seq_len * b * (c.n_layer * c.n_embd + per_layer if grad_ckpt else c.n_layer * per_layer)
    n = batch_size * answer_len
    logits = (n * c.vocab_size * 4 * (4 if teacher else 3) if not chunk or chunk >= n else
              n * c.vocab_size * b * (3 if teacher else 2) + chunk * c.vocab_size * 4 * 4)
    return dict(weights=4 * P + b * frozen, gradients=4 * P, AdamW=8 * P, teacher=teacher.num_params() * b if teacher else 0,
                activations=acts, logits=logits)


def plan_pass(model, examples, seq_len, answer_len, dtype, chunk=0, frozen=False):
    """Bytes a pass without gradients adds to what is alive (evaluation, anchor losses, the
    probe, the teacher's signal) over a batch of `examples` (data.fit_batch): the autocast copy
    of every float32 weight a matmul reads (kept until the pass ends), one block's transients
    (per token: the MLP's three intermediate-sized values, two of the residual stream in its
    embedding's dtype, and with adapters the down projection's input cast once more; as traced
    at the paper's shapes and at small ones), and four float32 copies of a piece of the head.
    frozen: a stage teacher, all in the autocast dtype (StageTeacher)."""
    c, b = model.config, 2 if dtype in ("bfloat16", "float16") else 4
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} - {id(model.lm_head.weight)}
    read = [p for p in model.parameters() if p.dtype == torch.float32 and p.dim() == 2 and id(p) not in lookups]
    copies = b * sum(p.numel() for p in read) if b == 2 and not frozen else 0
    residual = b if frozen else next(m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    per_token = b * (4 if model.lora else 3) * c.intermediate_size + 2 * residual * c.n_embd
    piece = min(chunk or examples * answer_len, examples * answer_len)
    return copies + examples * seq_len * per_token + 4 * 4 * piece * c.vocab_size


def plan_phases(model, teacher, batch_size, seq_len, answer_len, dtype, grad_ckpt, chunk=0, held=0, signal=0, cache=0,
                passes=(256, 32)):
    """{phase: bytes at its peak} for a run's every phase, from what is alive in it and what it
    adds (plan_parts, plan_pass). teacher None: train_teacher.py's phases (the AdamW state alive
    through evaluation, the save's bf16 copy, the probe; the optimizer let go before the test
    pass). Else distill.py's: the stage's start (probe terms, the last stage's teacher alive), the
    switch (the last teacher let go first), the step, the stage's validation, the test pass;
    with signal (bytes of the offline top-k rows) the teacher's pass that makes them and a step
    with no teacher; with cache (bytes of the teacher's logits kept, at most --teacher_cache_gib)
    the pass that makes them and a step that reads them, the teacher still alive.
    held: bytes alive throughout (the probe's stored log-probs). passes: the
    examples per batch asked of evaluation and of the probe (data.evaluate's, probe_logprobs')."""
    step = plan_parts(model, teacher, batch_size, seq_len, answer_len, dtype, grad_ckpt, chunk)
    w, adamw, t = step["weights"], step["AdamW"], step["teacher"]
    batches = (min(n, 2**15 // seq_len) for n in passes)  # evaluation's and the probe's (data.fit_batch)
    ev, pr = (plan_pass(model, n, seq_len, answer_len, dtype, chunk) for n in batches)
    if teacher is None:
        bf16_copy = 2 * w // 4 if dtype == "bfloat16" and not model.lora else 0  # checkpoint_dict casts on the device
        return {"SFT step": sum(step.values()), "checkpoint evaluation": w + adamw + ev, "checkpoint save": w + adamw + bf16_copy,
                "probe log-probs": w + adamw + pr, "resume": w + adamw, "test and anchor losses": w + ev}
    phases = {"resume": w, "stage start: probe terms": w + t + held + pr, "stage switch": w + t + held,
              "distillation step": sum(step.values()) + held, "stage end: validation": w + t + held + ev,
              "test": w + held + ev}
    teach = plan_pass(teacher, min(64, 2**15 // seq_len), seq_len, answer_len, dtype, chunk, frozen=True)
    if cache:  # --teacher_cache_gib: the teacher's logits on the training set kept; each batch's read back, as in the loop
        # the last batch's rows come after its blocks' transients, as pieces and then their concatenation
        last = min(cache, min(64, 2**15 // seq_len) * answer_len * model.config.vocab_size * 2)
        phases.update({"teacher's cached logits": w + t + held + cache - last + max(teach, 2 * last), "distillation step, cached logits":
                       phases["distillation step"] + cache})
    if signal:  # --teacher_topk: the teacher makes the rows, then trains no more; each batch's rows expanded in float32
        offline = plan_parts(model, None, batch_size, seq_len, answer_len, dtype, grad_ckpt, chunk)
        n = batch_size * answer_len
        phases.update({"teacher's offline signal": w + t + held + signal + teach,
                       "distillation step, offline top-k": sum(offline.values()) + held + signal + 4 * n * model.config.vocab_size})
    return phases


def margin(free):
    """What a plan leaves free of what a device has when the run starts: cuBLAS's and NCCL's
    workspaces and the caching allocator's fragmentation, none of which the plan counts. 1 GiB
    and 5% of the free memory: an assumption until lab.gpu_check measures a card's reserved
    memory against its allocated."""
    return 2**30 + free // 20


def free_memory(device):
    """Bytes the device has free now: on CUDA what the driver reports (torch.cuda.mem_get_info,
    the context already taken); on the CPU what the kernel could give without swapping."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        return 1024 * int(next(line for line in open("/proc/meminfo") if line.startswith("MemAvailable")).split()[1])
    except (OSError, StopIteration):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def card_fits(need, gb, context=2**29):
    """Whether `need` bytes fit a card sold as `gb` GB: its memory less the CUDA context (about
    0.5 GiB, taken before a run allocates) is what it has free, less the margin."""
    free = gb * 10**9 - context
    return need <= free - margin(free)


def memory_plan(model, teacher, batch_size, seq_len, answer_len, dtype, grad_ckpt, device, n_ckpt=0, chunk=0, shards=1,
                held=0, signal=0, cache=0, buckets=0):
    """Print the training step's plan_parts before the first step (weights, gradients and AdamW
    state split over `shards` processes under --fsdp) and the largest of plan_phases (with what
    stays alive all run: `held`, the probes' stored log-probs; `cache`, the teacher's logits
    kept; `signal`, the offline top-k rows; `buckets`, DDP's copy of the gradients), with the
    disk n_ckpt dense checkpoints take, and refuse a run whose largest phase is over what the
    device has free less the margin, with its figures."""
    parts = plan_parts(model, teacher, batch_size, seq_len, answer_len, dtype, grad_ckpt, chunk)
    parts.update({k: parts[k] // shards for k in ("weights", "gradients", "AdamW")})
    phases = plan_phases(model, teacher, batch_size, seq_len, answer_len, dtype, grad_ckpt, chunk, held=held, signal=signal,
                         cache=cache) if shards == 1 else {}
    phases = {k: v + buckets for k, v in phases.items()}
    top = max(phases, key=phases.get, default=None)
    total, gib = max([sum(parts.values()) + held + buckets] + list(phases.values())), lambda x: f"{x / 2**30:.2f}"
    free = free_memory(device)
    have = free - margin(free)
    alive = dict(probes=held, cache=cache, signal=signal, buckets=buckets)
    line = ("memory plan (GiB, estimated): step: " + " | ".join(f"{k} {gib(v)}" for k, v in parts.items() if v)
            + "".join(f" | {k} {gib(v)}" for k, v in alive.items() if v)
            + (f" | largest phase: {top} {gib(phases[top])}" if top else "")
            + f" | needs {gib(total)} of {gib(have)} ({gib(free)} free on {device} less {gib(free - have)} of margin)")
    if n_ckpt:
        adapters = model.lora
        size = sum(v.numel() for v in trained_state(model).values()) * (2 if dtype == "bfloat16" and not adapters else 4)
        line += f"; disk: {n_ckpt} dense checkpoints x {gib(size)} GiB" + (" (adapters only)" if adapters else "")
    print(line)
    if total > have:
        raise RunError(f"the run does not fit: {line.split(': ', 1)[1]}; use a smaller --batch_size, --grad_ckpt true, "
                       "a smaller model, or several GPUs (torchrun)")
    return parts


def start(cfg, model, tok, teacher_file, train_enc, device, dtype, world, n_ckpt=0, teaches=True, candidates=0):
    """Before a script's first step: the batch fits the data, the teacher (T*, read on the CPU
    and let go) can teach this student and is counted in the memory plan, which is printed (and
    a run that cannot fit refused) with what stays alive beside the phases (the `candidates`'
    stored log-probs on every probe, the teacher's cached logits or offline rows, DDP's
    gradient buckets), the model is on its device, the run folder is locked. -> the run folder."""
    teacher = check_teacher(teacher_file, tok, model) if teacher_file else None
    teacher = teacher if teaches else None  # SFT's teacher folder is checked, but no teacher joins the run
    if len(train_enc) < cfg.batch_size:
        raise RunError(f"--batch_size {cfg.batch_size} is larger than the {len(train_enc)} training examples")
    model.grad_checkpointing = cfg.grad_ckpt
    if model.lora and dtype != "float32":  # a frozen base needs no float32 master copy
        half(model, getattr(torch, dtype), frozen_only=True)
    A = max(len(a) for _, a in train_enc) + 1  # the longest answer and its end token
    n_tok, b = sum(len(a) + 1 for _, a in train_enc), 2 if dtype in ("bfloat16", "float16") else 4
    topk, cache_gib = getattr(cfg, "teacher_topk", 0), getattr(cfg, "teacher_cache_gib", 0)  # distill.py's flags
    fits = teacher is not None and not topk and n_tok * 4 * model.config.vocab_size <= cache_gib * 2**30  # as teacher_logits
    memory_plan(model, teacher, cfg.batch_size // world, max(len(p) + len(a) for p, a in train_enc), A, dtype, cfg.grad_ckpt,
                device, n_ckpt, data.logit_chunk(model.config.vocab_size, cfg.logit_chunk), world if cfg.fsdp else 1,
                held=candidates * len(data.probe_seeds(0, getattr(cfg, "probe_resamples", 0), cfg.probe_size, len(train_enc)))
                * min(cfg.probe_size, len(train_enc)) * A * cfg.probe_topk * 8,  # every probe's (values, indices), on the device
                signal=n_tok * topk * 8 if teacher is not None and topk else 0,
                cache=n_tok * model.config.vocab_size * b if fits else 0,
                buckets=4 * sum(p.numel() for p in model.parameters() if p.requires_grad) if world > 1 and not cfg.fsdp else 0)
    model.to(device)
    return out_folder(cfg.out_dir)


def wrap(model, cfg, world, dtype="float32"):
    """The module the steps call, compiled with --compile. Under torchrun: DDP (a whole copy of
    the model in every process, gradients averaged), or with --fsdp FSDP2 (fully_shard: each
    block's weights, gradients and AdamW state split over the processes, gathered for its
    forward and backward: under autocast in bf16/fp16, each block's input cast to it too, and
    the gradients reduced in float32, as torchtitan does; the model changes in place, so build
    its optimizer after this)."""
    if world > 1 and cfg.fsdp:
        half_gather = dtype in ("bfloat16", "float16")
        mp = MixedPrecisionPolicy(param_dtype=getattr(torch, dtype), reduce_dtype=torch.float32) if half_gather \
            else MixedPrecisionPolicy()
        blocks = [m for m in model.modules() if isinstance(m, (Block, LlamaBlock))]
        for block in blocks:
            fully_shard(block, mp_policy=mp)
        net = fully_shard(model)
        print(f"FSDP2: {len(blocks)} blocks and the rest of the model sharded over {world} processes"
              + (f", the blocks gathered in {dtype}" if half_gather else ""))
    else:
        net = DDP(model) if world > 1 else model
    return torch.compile(net) if cfg.compile else net


def from_rank0(value, world):
    """Under torchrun, rank 0's value on every process (a choice every process made alike)."""
    if world > 1:
        value = [value]
        dist.broadcast_object_list(value, src=0)
        value = value[0]
    return value


def clip_grads(model, max_norm):
    """Clip the gradient norm to max_norm (0: off) -> the norm before clipping, over every shard
    under --fsdp (a DTensor there: its full value)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
