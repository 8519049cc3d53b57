"""
Run plumbing: what train_teacher.py and distill.py need and the method does not. A reader of
the method may skip this file. Flags from a dataclass, the device and precision, building
and loading models (the committed bases checked by sha256), output folders
(locked while a run writes), files written atomically, resuming, the LR schedule, progress
lines, and the checks that stop a run loudly instead of letting it train on NaN.
"""
import argparse
import gc
import hashlib
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, field, fields
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import data
from model import GPT, GPT2_NAMES, GPTConfig, PRESETS, add_lora, build, lora_state, merge_lora, rope_frequencies


def arg(default, help, choices=None, low=None):
    """A config field: its default, help text, and what the parser accepts (a closed set
    of choices, or a lowest value)."""
    return field(default=default, metadata=dict(help=help, choices=choices, low=low))


def parse_config(cls, description):
    """A dataclass -> argparse: every field is a --flag with its default and help. Flags
    with a closed set of values, yes/no flags and counts are checked here, before anything
    is read or written."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def number(kind, low):
        def parse(s):
            v = kind(s)
            if low is not None and v < low:
                raise argparse.ArgumentTypeError(f"{s} is below the lowest allowed value, {low}")
            return v
        parse.__name__ = kind.__name__  # argparse names the type in its error
        return parse

    def yes_no(s):
        if s.lower() not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"{s!r} is neither true nor false")
        return s.lower() == "true"

    inherited = {f.name for base in cls.__mro__[1:] if hasattr(base, "__dataclass_fields__") for f in fields(base)}
    for f in sorted(fields(cls), key=lambda f: f.name in inherited):  # the script's own flags first, then the shared ones
        m, kw = f.metadata, {}
        if isinstance(f.default, bool):
            kw = dict(type=yes_no, metavar="{true,false}")
        elif isinstance(f.default, (int, float)):
            kw = dict(type=number(type(f.default), m["low"]))
        else:
            kw = dict(type=str, choices=m["choices"])
        ap.add_argument(f"--{f.name}", default=f.default, help=m["help"], **kw)
    args = ap.parse_args()
    if hasattr(args, "device") and not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", args.device):
        ap.error(f"argument --device: {args.device!r} is not auto, cpu, cuda, cuda:N or mps")
    return cls(**vars(args))


def run_main(fn, cfg):
    """A script's entry point: bad input (data, files, flags) prints its message alone and
    exits non-zero, without a traceback."""
    torch.set_num_threads(int(os.environ.get("SCD_THREADS", min(os.cpu_count() or 1, 8))))
    t = time.time()
    try:
        fn(cfg)
    except (data.DataError, RunError, UnsupportedModel) as e:
        sys.exit(f"error: {e}")
    except NotImplementedError as e:  # a function of the course copy's scd.py still blank
        sys.exit(f"error: not written yet: scd.{e}")
    print(f"wall time {time.time() - t:.0f}s")
    if dist.is_initialized():  # every process leaves together: none tears the group down while another still uses it
        gc.collect()  # and what the run left in reference cycles (FSDP2's modules and their work) goes while the group lives
        dist.barrier()
        dist.destroy_process_group()


class RunError(RuntimeError):
    """A run cannot go on (bad folder, bad file, non-finite loss): the message says why."""


def setup_device(device, dtype, timeout_min=180):
    """-> (device, dtype name, autocast context, GradScaler or None, rank, world size).

    fp16 needs a gradient scaler, bf16 does not. Under torchrun every process joins one
    group (NCCL on CUDA, gloo on CPU), takes its GPU, and only rank 0 prints and writes; a
    process waits timeout_min for the others (--dist_timeout), rank 0's lone passes included.
    """
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    rank, world = 0, 1
    if "RANK" in os.environ:  # launched by torchrun
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(minutes=timeout_min))
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        if rank > 0:
            sys.stdout = open(os.devnull, "w")
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    if dtype == "auto":
        dtype = "float32" if dev_type == "cpu" else ("bfloat16" if native_bf16() else "float16")
    if dev_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ptdtype = dict(float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16)[dtype]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(dev_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(dev_type) if ptdtype == torch.float16 else None
    return device, dtype, ctx, scaler, rank, world


def native_bf16():
    """True on a card that computes in bf16 (Ampere and later); Turing and Volta only emulate it,
    slowly, and torch counts emulation as support unless asked not to."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # a torch without the argument counts only native support
        return torch.cuda.is_bf16_supported()


def lr_at(step, total, peak, warmup_frac):
    """Linear warm-up over the first warmup_frac of steps, then cosine decay to zero."""
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def prepare(cfg_data, preset, seed, init_from="", splits=None, lora=(0, 0.0, 0.0)):
    """Domain, tokenizer, a model, and every split encoded (an example too long for the
    model's context is an error naming its file and line, before anything is written).
    init_from: '' builds --preset with the compact vocabulary of the training split (teacher
    and student built from the same data get the same one); 'base' loads the preset's committed
    base model, a .pt file any checkpoint of ours (weights and vocabulary); a GPT-2 name loads
    those weights and GPT-2's vocabulary; a folder a Hugging Face model and its tokenizer.json.
    splits: the domain already loaded (the lab's generated domains); default: --data's.
    lora: (rank, alpha, dropout); a rank > 0 freezes the loaded model and adds adapters (adapt)."""
    splits = splits or data.load_domain(cfg_data)
    torch.manual_seed(seed)  # the init, and every random draw after it (dropout): torch seeds itself at random
    if init_from in GPT2_NAMES:
        tok, model = data.Tokenizer(None), GPT.from_pretrained(init_from)
    elif init_from == "base" or init_from.endswith(".pt"):  # a committed base (lab/pretrain.py) or a checkpoint of ours
        try:
            model, tok = load_checkpoint(base_file(preset, cfg_data, splits) if init_from == "base" else init_from)
        except ValueError as e:
            raise RunError(f"--init_from base: {e}") from None
    elif init_from:
        if not (Path(init_from) / "config.json").is_file():
            raise RunError(f"--init_from {init_from}: not a GPT-2 name ({', '.join(GPT2_NAMES)}) nor a folder with config.json; "
                           f"nothing is downloaded here: fetch it first (huggingface-cli download {init_from} --local-dir "
                           f"models/{Path(init_from).name}) and pass that folder")
        tok, model = FolderTokenizer(init_from), load_folder(init_from)
    else:
        tok = data.Tokenizer.compact([ex["prompt"] + ex["answer"] for ex in splits["train"]])
        model = GPT(GPTConfig(**{**PRESETS[preset], "vocab_size": tok.vocab_size}))
    if lora[0]:  # adapters on a frozen base that stays on disk, named by path and sha256 in every checkpoint
        if not init_from or init_from in GPT2_NAMES or model.lora:
            raise RunError(f"--lora_rank {lora[0]}: adapters need a base of full weights on disk to adapt (--init_from "
                           f"base, a .pt checkpoint of full weights or a model folder), not {init_from or 'a random init'!r}")
        adapt(model, base_file(preset, cfg_data, splits) if init_from == "base" else init_from, *lora)
    enc = {s: data.encode(v, tok, model.config.block_size) for s, v in splits.items()}
    return splits, tok, model, enc


# the base models pretrained on the default world's general text (lab/pretrain.py remakes
# them and prints these lines)
ASSETS = Path(__file__).parent / "assets"
BASES = {
    "teacher": (ASSETS / "base_teacher.pt", "916312c48246772e172a2e88dfb0d0f0d26e915a6d3fc23a8b8e671e26a9b4eb"),
    "student": (ASSETS / "base_student.pt", "a132a606397a2a35994e279222701bb13b8c5ea94e2a90934cd4800a1bb43b4b"),
}


def base_file(preset, cfg_data, splits):
    """The committed base of a preset, checked as the tokenizer's ranks file is: by its sha256.
    The bases belong to the default world and its vocabulary: data whose held-out splits are
    not the default domain's (at any training noise) is refused."""
    default = data.load_domain("default")
    if any(data.fingerprint(splits[s]) != data.fingerprint(default[s]) for s in ("val", "test")):
        raise ValueError(f"the committed bases belong to the default domain and its vocabulary, not to --data {cfg_data}; "
                         "use --init_from '' (random init), a model folder or a checkpoint of your own")
    if preset not in BASES:
        raise ValueError(f"no committed base for --preset {preset} (there are: {', '.join(BASES)})")
    path, sha = BASES[preset]
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    if digest != sha:
        raise ValueError(f"{path}: sha256 {digest[:16]} is not the committed base's ({sha[:16]}): restore the file "
                         "(git checkout) or remake both bases (python -m lab.pretrain) and their sha256 in plumbing.BASES")
    return path


def tokenizer(spec):
    """A checkpoint's tokenizer from what it stored: GPT-2 ids (None or a compact list), or a model folder."""
    return FolderTokenizer(spec) if isinstance(spec, dict) else data.Tokenizer(spec)


def load_checkpoint(path, device="cpu", into=None):
    """A weights file -> (model in eval mode, tokenizer). An adapter checkpoint is its base,
    checked by sha256, plus the adapters; `into`, a model already holding the same base and
    adapter shape (the previous candidate of a trail), has only its adapters swapped: a few
    MB, never the base again, and the model stays where it is. The file is read onto the CPU
    whatever device wrote it."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    lora = ck.get("lora")
    if lora and into is not None and into.lora == lora:
        model = into
    elif lora:
        base = Path(lora["base"])
        if not base.exists() or weights_sha(base) != lora["sha256"]:
            raise RunError(f"{path}: its adapters belong to the base {base} of sha256 {lora['sha256'][:16]}, and "
                           + ("that base is missing" if not base.exists() else f"the weights there now have sha256 "
                              f"{weights_sha(base)[:16]}") + ": restore that base, or retrain the trail on this one")
        model = load_folder(base) if base.is_dir() else load_checkpoint(base)[0]
        adapt(model, base, lora["rank"], lora["alpha"], lora["dropout"])
    else:  # the weights become the model's own, one file tensor at a time (near one copy in memory)
        model, weights = empty_model(GPTConfig(**ck["model_config"]), None), ck.pop("model")
        ck["model"] = {k: weights.pop(k).float() for k in list(weights)}  # each file tensor let go once converted
    try:
        load_trained(model, ck["model"]) if model.lora else model.load_state_dict(ck["model"], assign=True)
    except Exception as e:
        raise RunError(f"{path}: its weights do not fit the model ({type(e).__name__}: {e})") from None
    tie(model)
    return (model if model is into else model.to(device)).eval(), tokenizer(ck["vocab"])


def empty_model(config, device="cpu"):
    """A model of this config that allocates nothing it does not need: built on the meta device
    (nothing drawn at random), then given uninitialised float32 memory on `device` (None: none
    at all, for weights assigned from a file), its tied head and computed RoPE buffer set."""
    with torch.device("meta"):
        model = build(config)  # shapes only
    if device is not None:
        model.to_empty(device=device)
    return tie(model)


def tie(model):
    """The head tied to the embedding again and RoPE's inverse frequencies computed (neither is
    in a file): after to_empty or an assigning load_state_dict, each module has its own tensor."""
    c = model.config
    if c.arch != "llama" or c.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight if c.arch != "llama" else model.model.embed_tokens.weight
    if c.arch == "llama":
        model.inv_freq = rope_frequencies(c).to(model.lm_head.weight.device)
    return model


def teacher_manifest(tdir, pool_start):
    """A teacher run's manifest.json (its checkpoints, T*), or a clear error before anything runs."""
    tdir = Path(tdir)
    if not (tdir / "manifest.json").exists():
        raise RunError(f"{tdir}: no manifest.json; train a teacher first (python train_teacher.py --out_dir {tdir})")
    manifest = read_json(tdir / "manifest.json")
    if not manifest["checkpoints"]:
        raise RunError(f"{tdir}/manifest.json lists no checkpoints")
    if pool_start > 1:
        raise RunError(f"--pool_start {pool_start}: a fraction of the way to T*, from 0 to 1")
    return manifest


def check_pool(tdir, pool, cfg):
    """The candidates, with a note where they cannot tell the schedules apart: with one (T* the
    only checkpoint from --pool_start to T*), CD and SCD distil from T* at every stage, as KD.
    With --method given, every stage must name a candidate's step: an error now, not stages later."""
    method = cfg.method
    if method == "given":
        given, steps = cfg.given_steps.split(",") if cfg.given_steps else [], [c["step"] for c in pool]
        bad = [s for s in given if not s.strip().isdigit() or int(s) not in steps]
        if len(given) != cfg.stages or bad:
            raise RunError(f"--given_steps {cfg.given_steps!r}: expected {cfg.stages} steps (--stages), one per stage, each "
                           f"a candidate's step ({', '.join(map(str, steps))}); " + (f"not candidates: {', '.join(bad)}" if bad else
                                                                                     f"got {len(given)}"))
    if len(pool) < 2 and method in ("cd", "scd"):
        print(f"note: {tdir}: the path to T* holds one candidate (T* at step {pool[0]['step']}), so {method.upper()} is KD "
              "here; for a comparison, checkpoint more densely before T* (--ckpt_per_epoch) or train the teacher more "
              "gently (a lower --lr, fewer --epochs) so that its best checkpoint comes later")
    return pool


def check_teacher(path, tok, student):
    """The teacher checkpoint at path, read on the CPU, after checks that it can teach this
    student: the same tokenizer (distributions compared token by token), a context as long."""
    t_model, t_tok = load_checkpoint(path)
    tdir = Path(path).parent
    if t_tok.identity != tok.identity:
        what = (f"vocabulary {t_tok.vocab_size} vs {tok.vocab_size}" if t_tok.vocab_size != tok.vocab_size else
                f"end token {t_tok.eot} vs {tok.eot}" if t_tok.eot != tok.eot else
                tokenizer_difference(t_tok.content, tok.content) if hasattr(t_tok, "content") and hasattr(tok, "content")
                else f"{t_tok.identity[0]} vs {tok.identity[0]}")
        raise RunError(f"{tdir} has another tokenizer than the student ({what}): "
                       "distillation compares their distributions token by token")
    if t_model.config.block_size < student.config.block_size:
        raise RunError(f"{tdir} has a shorter context ({t_model.config.block_size}) than the student ({student.config.block_size})")
    return t_model


def check_same_start(cfg, adir):
    """A distilled student starts where the SFT student in adir did: the same seed and init
    (and preset, where the init is the preset's own)."""
    a = read_json(Path(adir) / "config.json")
    for k in ("seed", "init_from") + (("preset",) if cfg.init_from in ("", "base") else ()):
        if a.get(k) != getattr(cfg, k):
            raise RunError(f"--{k} {getattr(cfg, k)!r} differs from the SFT student's ({a.get(k)!r} in {adir}): "
                           "the student would not start where the SFT student did")


def evaluate_students(out, test, tok, device, ctx, chunk=0, into=None):
    """distill.py's best-on-validation and final students on test, one at a time: records and
    summaries. Exact match as on validation, from one forward pass (data.evaluate: it equals
    greedy decoding). into: the run's own student, whose weights are replaced by each saved
    student's (no second model in memory); None reads each into a model of its own."""
    results = {}
    for name in ("best", "final"):
        model = (load_weights(out / f"{name}.pt", into) if into is not None else load_checkpoint(out / f"{name}.pt", device))[0]
        summary, records = data.evaluate(model, test, tok, device, ctx=ctx, chunk=chunk)
        del model
        atomic_save(records, out / f"test_records_{name}.jsonl")
        results[name] = {k: round(v, 4) for k, v in summary.items()}
        print(f"{name} student on test: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    results["best_stage"] = torch.load(out / "best.pt", weights_only=True)["stage"]
    return results


def load_weights(path, model):
    """A checkpoint's weights (or adapters) read on the CPU into a live model of the same shape,
    which stays on its device. -> (the model in eval mode, tokenizer), as load_checkpoint."""
    ck = torch.load(path, map_location="cpu", weights_only=True)
    load_trained(model, ck["model"])
    return model.eval(), tokenizer(ck["vocab"])


def checkpoint_dict(model, tok, dtype="float32", **extra):
    """What a weights file holds: the model's config, vocabulary and weights (in bf16 if the
    run trained in bf16); of an adapted model only the adapters, and where its base is."""
    lora = model.lora
    weights = {k: v.to(torch.bfloat16) if dtype == "bfloat16" and not lora else v for k, v in trained_state(model).items()}
    return dict(model=weights, model_config=asdict(model.config), vocab=tok.ids, lora=lora, **extra)


WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered from the processes, on rank 0's CPU


def trained_state(model):
    """The weights a run changes, whole (under --fsdp gathered from every process): all of
    them, or an adapted model's adapters alone."""
    if isinstance(model, FSDPModule) and model.lora:  # the adapters alone gathered, never the frozen base
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).cpu() for k, v in model.state_dict().items() if ".lora_" in k}
    sd = get_model_state_dict(model, options=WHOLE) if isinstance(model, FSDPModule) else model.state_dict()
    return {k: v for k, v in sd.items() if ".lora_" in k} if model.lora else sd


def load_trained(model, weights):
    """trained_state's inverse: every weight, or exactly the adapters of an adapted model."""
    if model.lora and set(weights) != set(lora_state(model)):
        raise KeyError(f"adapter names {sorted(set(weights) ^ set(lora_state(model)))[:4]} differ")
    if isinstance(model, FSDPModule):  # each process keeps its shard of the whole weights
        return set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=not model.lora))
    return model.load_state_dict(weights, strict=not model.lora)


def optimizer_state(model, optimizer):
    """AdamW's state, whole (under --fsdp gathered from every process, by parameter name)."""
    return get_optimizer_state_dict(model, optimizer, options=WHOLE) if isinstance(model, FSDPModule) else optimizer.state_dict()


def load_optimizer(model, optimizer, state):
    if isinstance(model, FSDPModule):
        return set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    optimizer.load_state_dict(state)


def adapt(model, base, rank, alpha=0.0, dropout=0.0):
    """LoRA adapters (model.add_lora) on a frozen base; model.lora records what a checkpoint of
    the adapters needs to find that base again: its path and the sha256 of its weights."""
    add_lora(model, rank, alpha, dropout).lora.update(base=str(Path(base).resolve()), sha256=weights_sha(base))
    return model


_SHA = {}


def weights_sha(path):
    """sha256 of a base's weights: the file, or a folder's weight files in name order (read
    once per process: an 8B base is 16 GB)."""
    path = Path(path).resolve()
    files = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".bin")) if path.is_dir() else [path]
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _SHA:
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
        _SHA[key] = h.hexdigest()
    return _SHA[key]


def fingerprints(splits):
    """One fingerprint per split: a run's state depends on all three (the vocabulary on
    train, model selection on val, the reports on test), so resuming checks all three."""
    return {s: data.fingerprint(v) for s, v in splits.items()}


def out_folder(path):
    """The output folder, made if needed, checked writable and locked for this process:
    a second process started on the same folder is refused (a lock left by a process that
    has died is taken over, so a killed run still resumes)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out_dir {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        test_file = out / f".write_test_{os.getpid()}"  # one per process: torchrun's ranks check at once
        test_file.touch()
        test_file.unlink()
    except OSError as e:
        raise RunError(f"--out_dir {out}: cannot write there ({e.strerror})") from None
    if not (dist.is_initialized() and dist.get_rank() > 0):
        lock(out / "run.lock")
    return out


def lock(path):
    """Hold path for this process until it exits: the file names the holder's pid. A holder
    that no longer exists (signal 0 only asks) has left a stale lock, which is taken over."""
    try:
        holder = int(Path(path).read_text())
        if holder != os.getpid():
            os.kill(holder, 0)
            raise RunError(f"{path.parent} is in use by process {holder}; wait for it or use another --out_dir")
    except PermissionError:  # it exists, under another user
        raise RunError(f"{path.parent} is in use by process {holder}; wait for it or use another --out_dir") from None
    except (OSError, ValueError):  # no lock, an unreadable one, or a dead holder
        pass
    Path(path).write_text(str(os.getpid()))


def read_json(path):
    """A JSON file of a run, or a clear error naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); the file is damaged") from None


def shard(idx, rank, world):
    """This process's share of a global batch: every world-th example (DDP averages the gradients)."""
    assert len(idx) % world == 0, f"batch size {len(idx)} must be divisible by the {world} processes"
    return idx[rank::world]


def check_finite(where, **terms):
    """Stop the run at once if a term is NaN or infinite, naming where and which. It runs
    before the optimizer step, and nothing is saved after it: the last state on disk is
    the last good one. Under torchrun it is a collective: every process calls it at the same
    point of the step, and every process stops if any saw a non-finite term."""
    dev = torch.as_tensor(next(iter(terms.values()))).device  # NCCL reduces on the GPU
    flags = torch.stack([~torch.isfinite(torch.as_tensor(v, device=dev)).all() for v in terms.values()]).float()
    on = ""
    if dist.is_initialized() and dist.get_world_size() > 1:  # one process's NaN stops every process, with one message
        flags = flags * (dist.get_rank() + 1)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # per term: the highest rank that saw it (+1), or 0
        on = f" (on process {int(flags.max()) - 1} of {dist.get_world_size()})"
    bad = [name for name, f in zip(terms, flags.tolist()) if f > 0]
    if bad:
        raise RunError(f"non-finite {', '.join(bad)} at {where}{on}; stopped before the optimizer step, so the "
                       "last saved state is the last good one (rerunning the same command resumes from it)")


def global_mean(t, world):
    """The mean of a tensor over the processes (the global batch's value, for logs)."""
    if world > 1:
        t = t.clone()
        dist.all_reduce(t)  # a sum: gloo has no average
        t /= world
    return t


def atomic_save(obj, path):
    """Write to a temporary file, then rename: a kill never leaves a half-written file.
    Under torchrun only rank 0 writes."""
    if dist.is_initialized() and dist.get_rank() > 0:
        return
    tmp = f"{path}.tmp"
    if str(path).endswith(".jsonl"):  # a list of records, one JSON object per line
        Path(tmp).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in obj), encoding="utf-8")
    elif str(path).endswith(".json"):
        Path(tmp).write_text(json.dumps(obj, indent=1, ensure_ascii=False), encoding="utf-8")
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


def run_config(cfg, splits, test_flag):
    """What identifies a run: its flags (not its folder, nor the test-only stop flag) and the
    fingerprints of its data."""
    config = dict(asdict(cfg), fingerprint=fingerprints(splits))
    config[test_flag] = 0
    config.pop("out_dir")
    return config


def rng_state(device):
    """torch's random state: the CPU generator's, and on CUDA the device's (dropout draws there)."""
    return dict(rng=torch.get_rng_state()) | ({"cuda_rng": torch.cuda.get_rng_state(device)} if device.startswith("cuda") else {})


def resume_sft(out, cfg, cls, splits, model, optimizer, scaler, probes, device):
    """train_teacher.py's resume: a folder holding this very run continues from its last
    checkpoint with everything restored (weights, optimizer, scaler, torch's RNG on the CPU and
    the device, so dropout continues as if never stopped; the manifest and the probes' log-probs
    up to that step). The state file is read onto the CPU whatever device wrote it, and copied
    into the live model and optimizer: no second copy of them on the device.
    -> (manifest, the step to start at)."""
    config = run_config(cfg, splits, "stop_at_step")
    manifest = dict(config=config, fingerprint=config["fingerprint"]["train"], checkpoints=[], best=None)
    step = 0
    if resumable(out, config, asdict(cls())):
        state = torch.load(out / "state.pt", map_location="cpu", weights_only=True)
        load_trained(model, state["model"])
        load_optimizer(model, optimizer, state["optimizer"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and device.startswith("cuda"):
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        step, manifest = state["step"], read_json(out / "manifest.json")
        manifest["checkpoints"] = [c for c in manifest["checkpoints"] if c["step"] <= step]
        for probe in probes:
            probe.load(up_to=step)
        if "test" not in manifest:
            print(f"resuming {out} from step {step}")
    atomic_save(dict(config, out_dir=str(out)), out / "config.json")
    return manifest, step


def resume_stages(out, cfg, cls, splits, student):
    """distill.py's resume, at stage boundaries (each stage restarts its optimizer anyway).
    -> (the finished run's results or None, the stage to start at, the best validation
    accuracy so far, the schedule so far)."""
    config = run_config(cfg, splits, "stop_at_stage")
    state = 0, -1.0, []  # a fresh run: stage 0, no best yet, no schedule
    if resumable(out, config, asdict(cls())):
        st = torch.load(out / "state.pt", map_location="cpu", weights_only=True)  # copied into the student
        if st["stage"] == cfg.stages and (out / "results.json").exists():
            print(f"{out} holds this run, finished: nothing to do")
            return read_json(out / "results.json"), 0, 0, []
        load_trained(student, st["model"])
        print(f"resuming {out} at stage {st['stage']}")
        state = st["stage"], st["best_val"], read_json(out / "schedule.json")["stages"][:st["stage"]]
    atomic_save(dict(config, out_dir=str(out)), out / "config.json")
    return (None, *state)


def resumable(out, config, defaults):
    """True if out holds a run of this very config; a run of another config is refused. An
    option missing from the stored config (added since) counts as its default value. The
    folder's own path, how often it prints and what it is compared with in its report are not
    part of the run: a moved run folder still resumes, and so does one rerun with another
    --log_every or --compare_to."""
    if not (out / "state.pt").exists():
        return False
    old = {**defaults, **read_json(out / "config.json")}
    old, config = ({k: v for k, v in c.items() if k not in ("out_dir", "log_every", "compare_to")} for c in (old, config))
    if old != config:
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        raise RunError(f"{out} holds a run with another config or other data {diff}; use another --out_dir or delete it")
    return True


def progress(step, total, t0, start_step, tokens, msg):
    """'step 120/900 | <msg> | 115 ms/step | 9,800 tok/s | eta 1m30s'; tokens: input tokens since t0."""
    dt = time.time() - t0
    per = dt / max(1, step - start_step)
    eta = per * (total - step)
    return (f"step {step:5d}/{total} | {msg} | {1000 * per:5.0f} ms/step | {tokens / dt:7,.0f} tok/s | "
            f"eta {int(eta // 60)}m{int(eta % 60):02d}s")


class Logger:
    """Progress lines every log_every steps (printed, and written to log.txt by rank 0)."""

    def __init__(self, out, rank, total, start_step, log_every):
        self.file = open(out / "log.txt" if rank == 0 else os.devnull, "a")
        self.total, self.start_step, self.every = total, start_step, log_every
        self.t0, self.tokens = time.time(), 0

    def step(self, step, tokens, msg, skipped=None, force=False, world=1):
        """msg: the line's text, or a dict of figures (tensors: their global batch's mean)."""
        self.tokens += tokens
        if step % self.every == 0 or force:
            if isinstance(msg, dict):
                fmt = dict(ce=".4f", kl=".4f", w=".3f", lr=".2e", loss=".4f")
                mean = lambda v: global_mean(v.detach().float().mean(), world).item() if torch.is_tensor(v) else v
                msg = " | ".join(f"{k} {mean(v):{fmt.get(k, '')}}" for k, v in msg.items())
            self.line(progress(step, self.total, self.t0, self.start_step, self.tokens,
                               msg + ("" if skipped is None else f" | fp16 skipped {skipped}")), flush=True)

    def line(self, text, flush=False):
        print(text, flush=flush)
        self.file.write(text + "\n")

    def close(self, skipped=None):
        self.file.close()
        if skipped is not None:
            print(f"fp16: the gradient scaler skipped {skipped} steps of this sitting (overflow)")


# -----------------------------------------------------------------------------
# Hugging Face model folders, read without transformers: config.json -> our config,
# model.safetensors (or its shards, or pytorch_model.bin) -> our weights, one tensor at a time,
# tokenizer.json -> a tokenizer (the tokenizers library, an optional extra: pip install tokenizers).
# Nothing is downloaded: a folder is what `huggingface-cli download NAME --local-dir DIR` leaves.

class UnsupportedModel(ValueError):
    """A model folder this implementation cannot reproduce: the message names the field."""


def config_from_hf(c, path):
    """config.json (a dict) -> GPTConfig, or UnsupportedModel naming the field."""
    kind = c.get("model_type")

    def refuse(name, why):
        raise UnsupportedModel(f"{path}/config.json: field '{name}' = {c.get(name)!r}: {why}")
    if kind == "gpt2":
        return GPTConfig(block_size=c["n_positions"], vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                         n_embd=c["n_embd"])
    if kind not in ("llama", "qwen2", "mistral"):
        refuse("model_type", "supported are llama, qwen2, mistral (and SmolLM2, a llama) and gpt2")
    if c.get("use_sliding_window", kind != "qwen2") and c.get("sliding_window") is not None:
        refuse("sliding_window", "sliding-window attention is not supported")
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if c.get(name):
            refuse(name, "mixture-of-experts models are not supported")
    if c.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the Llama block's MLP is SwiGLU (silu)")
    if c.get("attention_bias") or c.get("mlp_bias"):
        refuse("attention_bias" if c.get("attention_bias") else "mlp_bias", "biases beyond Qwen2's q/k/v are not supported")
    rs = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers 5 writes the first, Hub files the second
    rope = rs.get("rope_type", rs.get("type", "default"))
    if rope not in ("default", "llama3"):
        refuse("rope_parameters" if c.get("rope_parameters") else "rope_scaling", "supported are no scaling and Llama 3's")
    keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return GPTConfig(arch="llama", block_size=c["max_position_embeddings"], vocab_size=c["vocab_size"],
                     n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"], n_embd=c["hidden_size"],
                     n_kv_head=c.get("num_key_value_heads") or 0, head_dim=c.get("head_dim") or 0,
                     intermediate_size=c["intermediate_size"], rope_theta=c.get("rope_theta", rs.get("rope_theta", 10000.0)),
                     rope_scaling={k: rs[k] for k in keep} if rope == "llama3" else {},
                     norm_eps=c.get("rms_norm_eps", 1e-6), qkv_bias=kind == "qwen2", bias=False,
                     tie_embeddings=c.get("tie_word_embeddings", False))  # False: LlamaConfig's default, and Qwen2's


def load_folder(path):
    """A Hugging Face model folder -> our model, in float32. Reads model.safetensors, or the
    shards its index names, or pytorch_model.bin. A Llama-family model is built without memory
    (on the meta device), given one float32 copy, and filled one tensor at a time: host memory
    peaks near that one copy, not the file's weights, a float32 copy of them and a randomly
    initialised model at once (80 GB for an 8B folder)."""
    path = Path(path)
    config = config_from_hf(json.loads((path / "config.json").read_text(encoding="utf-8")), path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    if (path / files[0]).exists():
        tensors = (kv for f in files for kv in read_safetensors(path / f))
    else:
        tensors = iter(torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True).items())
    if config.arch == "gpt2":  # GPT2Model files name the blocks without the "transformer." of GPT2LMHeadModel
        sd = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v.float() for k, v in tensors}
        sd.setdefault("lm_head.weight", sd["transformer.wte.weight"])
        return GPT.from_hf(sd, config)
    model = empty_model(config)  # one float32 copy, uninitialised, its head tied again
    want, seen = model.state_dict(keep_vars=True), set()
    for name, t in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name not in want:
            raise UnsupportedModel(f"{path}: weight {name!r} has no place in a {config.arch} model of this config")
        if tuple(t.shape) != tuple(want[name].shape):
            raise UnsupportedModel(f"{path}: weight {name!r} has shape {tuple(t.shape)}, config.json says {tuple(want[name].shape)}")
        with torch.no_grad():
            want[name].copy_(t)  # converted to float32 in place; the file's tensor goes at the next one
        seen.add(name)
    if config.tie_embeddings:
        seen.add("lm_head.weight")  # the embedding's own tensor
    if set(want) - seen:
        raise UnsupportedModel(f"{path}: weights missing from the files: {sorted(set(want) - seen)[:4]}")
    return model


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


def read_safetensors(path):
    """A .safetensors file's tensors, one at a time: (name, tensor) read from disk on demand
    (the format: an 8-byte header length, a JSON header of dtypes, shapes and byte offsets, then
    the bytes), so no more than one tensor of the file is in memory at once."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, h in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if h["dtype"] not in SAFETENSORS_DTYPES:
                raise UnsupportedModel(f"{path}: tensor {name!r} has dtype {h['dtype']}, not one of {', '.join(SAFETENSORS_DTYPES)}")
            begin, end = h["data_offsets"]
            f.seek(8 + n + begin)
            raw = torch.empty(end - begin, dtype=torch.uint8)
            f.readinto(raw.numpy())  # straight into the tensor's memory: no second copy of the bytes
            yield name, raw.view(SAFETENSORS_DTYPES[h["dtype"]]).reshape(h["shape"])


def tokenizer_content(tj):
    """What ids a tokenizer.json gives a text, and so what distributions compared token by token
    depend on, in one canonical form: the vocabulary and merges, the special tokens, the rules
    that cut and wrap a text (normaliser, pre-tokeniser, post-processor). Key order, whitespace,
    the two ways merges are written, and a one-element or empty Sequence do not count."""
    def canon(x):
        if isinstance(x, dict):
            if x.get("type") == "Sequence":  # a Sequence of one rule is that rule; of none, no rule
                inner = next((v for k, v in x.items() if k != "type" and isinstance(v, list)), None)
                if inner is not None and len(inner) <= 1:
                    return canon(inner[0]) if inner else None
            return {k: canon(v) for k, v in sorted(x.items())}
        return [canon(v) for v in x] if isinstance(x, list) else x
    model = dict(tj.get("model") or {})
    merges = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.pop("merges", [])]
    return {"vocabulary": canon(model.pop("vocab", None)), "merges": merges,
            "special tokens": sorted((t["id"], t["content"], bool(t.get("special"))) for t in tj.get("added_tokens", [])),
            "model": canon(model), **{k: canon(tj.get(k)) for k in ("normalizer", "pre_tokenizer", "post_processor")}}


def tokenizer_difference(a, b):
    """The first part of two tokenizer_content()s that differs, in words (None if none does)."""
    for k in a:
        if a[k] != b[k]:
            if isinstance(a[k], list) and isinstance(b[k], list):
                i = next((i for i, (x, y) in enumerate(zip(a[k], b[k])) if x != y), min(len(a[k]), len(b[k])))
                at = lambda v: repr(v[i]) if i < len(v) else "nothing"  # noqa: E731
                return f"{k} differ at entry {i} ({at(a[k])} vs {at(b[k])})"
            if isinstance(a[k], dict) and isinstance(b[k], dict):
                key = next(x for x in sorted(set(a[k]) | set(b[k]), key=str) if a[k].get(x) != b[k].get(x))
                return f"{k} differ at {key!r} ({a[k].get(key)!r} vs {b[k].get(key)!r})"
            return f"{k} differ"
    return None


class FolderTokenizer:
    """A model folder's tokenizer.json, read by Hugging Face's tokenizers library. The same
    interface as data.Tokenizer; ids are the model's own. spec (what checkpoints store) names
    the folder and a digest of the file's content (tokenizer_content), and identity is what
    teacher and student must share: that content, the vocabulary size and the end token."""

    def __init__(self, spec):
        from tokenizers import Tokenizer  # the optional extra
        folder = Path(spec["folder"] if isinstance(spec, dict) else spec)
        text = (folder / "tokenizer.json").read_text(encoding="utf-8")
        self.content = tokenizer_content(json.loads(text))
        digest = hashlib.sha256(json.dumps(self.content, sort_keys=True).encode()).hexdigest()[:16]
        if isinstance(spec, dict) and spec["sha"] != digest:
            raise UnsupportedModel(f"{folder}/tokenizer.json has changed since the run was made (content {digest}, not {spec['sha']})")
        self.tk = Tokenizer.from_str(text)
        c = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        # The end token every answer is followed by. Llama 3's instruction-tuned configs list
        # several ([128001, 128008, 128009]: <|end_of_text|>, <|eom_id|>, <|eot_id|>); the first
        # is the one that ends a document in pretraining, which is the role it has here (prompt
        # and answer are one continuous text, no chat template), and the only one base models list.
        eos = c.get("eos_token_id")
        self.eot = eos[0] if isinstance(eos, list) and eos else eos
        if not isinstance(self.eot, int):
            raise UnsupportedModel(f"{folder}/config.json: field 'eos_token_id' is missing or empty: answers need an end token")
        # What the tokenizer's own post-processor puts around every text, as the base model saw
        # it in pretraining: Llama 3 starts each with <|begin_of_text|>, Qwen2 and GPT-2 add nothing.
        plain, full = self.tk.encode("a", add_special_tokens=False).ids, self.tk.encode("a", add_special_tokens=True).ids
        i = next(i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain)
        self.bos, after = full[:i], full[i + len(plain):]
        if after not in ([], [self.eot]):
            raise UnsupportedModel(f"{folder}/tokenizer.json: field 'post_processor' ends every text with {after}, "
                                   f"not the end token {self.eot}: answers here end with the end token alone")
        self.vocab_size, self.ids = c["vocab_size"], dict(folder=str(folder), sha=digest)
        self.identity = ("tokenizer.json", self.vocab_size, digest, self.eot)  # teacher and student end answers alike

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids  # data.encode puts self.bos before the prompt

    def decode(self, ids):
        return self.tk.decode(ids)


def sft_anchor(cfg, train_fp, n_train, student, device):
    """distill.py's reading of the SFT student run (METHOD.md section 2.2): AW's anchor l_S for this very training set (None without AW),
    after a check that the student starts where the SFT student did; with --start anchor,
    the student takes the SFT student's trained weights (its checkpoint of lowest val loss)."""
    adir, anchor = Path(cfg.anchor_dir), None
    if cfg.aw:
        a = read_json(adir / "train_losses.json")
        if a["fingerprint"] != train_fp or len(a["loss"]) != n_train:
            raise RunError(f"{adir / 'train_losses.json'}: made for other training data ({a['fingerprint']})")
        anchor = torch.tensor(a["loss"], device=device)
    if cfg.start == "anchor" or cfg.aw or (adir / "config.json").exists():
        check_same_start(cfg, adir)  # seed, init and preset: "the SFT student's initialisation"
    if cfg.start == "anchor":
        m = read_json(adir / "manifest.json")
        sft = load_checkpoint(adir / m["checkpoints"][m["best"]]["file"])[0]
        student.load_state_dict(merge_lora(sft).state_dict() if not student.lora else sft.state_dict())
    return anchor
