"""
Supervised fine-tuning (SFT) with dense checkpoints (METHOD.md section 2, steps 1 and 2).
Trains the teacher, and with --preset student the SFT student whose per-example training
loss l_S(x) anchors Adaptive Weighting.

    python train_teacher.py                                        # CPU teacher, embedded domain
    python train_teacher.py --preset student --out_dir runs/student_sft --compare_to runs/teacher
    python train_teacher.py --init_from gpt2-large --data my_domain/ --batch_size 8 --lr 2e-5
    torchrun --nproc_per_node=4 train_teacher.py ...               # data parallel, global batch

Outputs in --out_dir: ckpt_{step:06d}.pt (weights only), manifest.json (one row per
checkpoint, the best marked), config.json, log.txt, test_records.jsonl (best checkpoint on
test), train_losses.json (its per-example training loss, with the data's fingerprint),
and state.pt (the full training state, for resuming; rerun the same command to resume).
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import scd
from model import GPT, GPTConfig, PRESETS


def arg(default, help):
    return field(default=default, metadata=dict(help=help))


@dataclass
class TrainConfig:
    data: str = arg("default", "'default' (the embedded domain) or a folder with train/val/test.jsonl")
    preset: str = arg("teacher", f"model preset: {', '.join(PRESETS)}")
    init_from: str = arg("", "'' (random init of --preset) or pretrained GPT-2 weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    out_dir: str = arg("runs/teacher", "output folder; rerunning the same command resumes it")
    epochs: int = arg(8, "passes over the training set")
    batch_size: int = arg(16, "examples per step")
    lr: float = arg(3e-3, "peak learning rate")
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices")
    warmup_frac: float = arg(0.1, "share of steps with linear LR warm-up, then cosine decay to 0")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)")
    ckpt_per_epoch: int = arg(4, "dense checkpoints per epoch, evenly spaced")
    seed: int = arg(0, "seed of the model init and the data order")
    device: str = arg("auto", "cpu, cuda, cuda:1, ... (auto: cuda if available)")
    dtype: str = arg("auto", "float32, bfloat16 or float16 autocast (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    log_every: int = arg(20, "steps between progress lines")
    compile: bool = arg(False, "torch.compile the trained model (CUDA; slow to start, faster per step)")
    compare_to: str = arg("", "a teacher run folder: print the SFS/TFS table of that teacher vs this model")
    stop_at_step: int = arg(0, "stop after this step as if interrupted (to test resuming; 0: off)")


def parse_config(cls):
    """A dataclass -> argparse: every field is a --flag with its default and help."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(cls):
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if f.type in (bool, "bool") else type(f.default)
        ap.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"])
    return cls(**vars(ap.parse_args()))


# -----------------------------------------------------------------------------
# pieces distill.py shares

def setup_device(device, dtype):
    """-> (device, dtype name, autocast context, GradScaler or None, rank, world size).

    fp16 needs a gradient scaler, bf16 does not. Under torchrun every process joins one
    group (NCCL on CUDA, gloo on CPU), takes its GPU, and only rank 0 prints and writes.
    """
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    rank, world = 0, 1
    if "RANK" in os.environ:  # launched by torchrun
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        if rank > 0:
            sys.stdout = open(os.devnull, "w")
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    if dtype == "auto":
        dtype = "float32" if dev_type == "cpu" else ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    if dev_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ptdtype = dict(float32=torch.float32, bfloat16=torch.bfloat16, float16=torch.float16)[dtype]
    ctx = nullcontext() if ptdtype == torch.float32 else torch.autocast(dev_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(dev_type) if ptdtype == torch.float16 else None
    return device, dtype, ctx, scaler, rank, world


def shard(idx, rank, world):
    """This process's share of a global batch: every world-th example (DDP averages the gradients)."""
    assert len(idx) % world == 0, f"batch size {len(idx)} must be divisible by the {world} processes"
    return idx[rank::world]


def lr_at(step, total, peak, warmup_frac):
    """Linear warm-up over the first warmup_frac of steps, then cosine decay to zero."""
    warmup = max(1, int(warmup_frac * total))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def optimizer_step(model, optimizer, scaler, loss, grad_clip):
    """Backward, clip, step. With fp16 the scaler scales the loss and unscales before clipping."""
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


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


def load_checkpoint(path, device="cpu"):
    """A weights file -> (model in eval mode, tokenizer)."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
        model = GPT(GPTConfig(**ck["model_config"]))
        model.load_state_dict(ck["model"])
    except Exception as e:
        raise RuntimeError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    return model.to(device).eval(), data.Tokenizer(ck["vocab"])


def prepare(cfg_data, preset, seed, init_from=""):
    """Domain, tokenizer and a model: pretrained GPT-2 weights (init_from) with the full
    vocabulary, or a freshly initialised preset with the domain's compact vocabulary. Teacher
    and student built from the same data get the same vocabulary and context length."""
    splits = data.load_domain(cfg_data)
    if init_from:
        return splits, data.Tokenizer(None), GPT.from_pretrained(init_from)
    texts = [ex["prompt"] + ex["answer"] for s in splits.values() for ex in s]
    tok = data.Tokenizer.compact(texts)
    p = dict(PRESETS[preset])
    if "block_size" not in p:  # CPU presets: the longest example, rounded up to a multiple of 16
        longest = max(len(tok.encode(ex["prompt"])) + len(tok.encode(ex["answer"])) for s in splits.values() for ex in s)
        p["block_size"] = -(-longest // 16) * 16
    torch.manual_seed(seed)
    return splits, tok, GPT(GPTConfig(vocab_size=tok.vocab_size, **p))


def resumable(out, config, defaults):
    """True if out holds a run of this very config; a run of another config is refused. An
    option missing from the stored config (added since) counts as its default value."""
    if not (out / "state.pt").exists():
        return False
    old = {**defaults, **json.loads((out / "config.json").read_text())}
    if old != config:
        diff = {k: (old.get(k), v) for k, v in config.items() if old.get(k) != v}
        raise SystemExit(f"{out} holds a run with another config {diff}; use another --out_dir or delete it")
    return True


def progress(step, total, t0, start_step, tokens, msg):
    """'step 120/900 | <msg> | 115 ms/step | 9,800 tok/s | eta 1m30s'; tokens: input tokens since t0."""
    dt = time.time() - t0
    per = dt / max(1, step - start_step)
    eta = per * (total - step)
    return (f"step {step:5d}/{total} | {msg} | {1000 * per:5.0f} ms/step | {tokens / dt:7,.0f} tok/s | "
            f"eta {int(eta // 60)}m{int(eta % 60):02d}s")


# -----------------------------------------------------------------------------

def train(cfg):
    t_start = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype, ctx, scaler, rank, world = setup_device(cfg.device, cfg.dtype)
    splits, tok, model = prepare(cfg.data, cfg.preset, cfg.seed, cfg.init_from)
    model.to(device)
    train_enc = data.encode(splits["train"], tok, model.config.block_size)
    data.encode(splits["val"] + splits["test"], tok, model.config.block_size)  # fail early on bad data
    lengths = [len(p) + len(a) for p, a in train_enc]
    steps_per_epoch = len(train_enc) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    n_ckpt = cfg.epochs * cfg.ckpt_per_epoch
    ckpt_steps = sorted({round(total * j / n_ckpt) for j in range(1, n_ckpt + 1)})
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, 0.95), device.split(":")[0])
    print(f"{cfg.preset}: {model.num_params() / 1e6:.2f}M parameters, vocab {tok.vocab_size}, "
          f"context {model.config.block_size} | {len(train_enc)} train examples, {total} steps, "
          f"{len(ckpt_steps)} checkpoints | {device}, {dtype}")

    # resume: the same config continues from its last full state, a different one is refused
    config = dict(asdict(cfg), stop_at_step=0, fingerprint=data.fingerprint(splits["train"]))  # same data too
    manifest = dict(config=config, fingerprint=config["fingerprint"], checkpoints=[], best=None)
    step = 0
    if resumable(out, config, asdict(TrainConfig())):
        state = torch.load(out / "state.pt", map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
        manifest = json.loads((out / "manifest.json").read_text())
        if step == total and "test" in manifest:
            print(f"{out} holds this run, finished: nothing to do")
            return manifest["test"]
        manifest["checkpoints"] = [c for c in manifest["checkpoints"] if c["step"] <= step]
        print(f"resuming {out} from step {step}")
    atomic_save(config, out / "config.json")

    log = open(out / "log.txt" if rank == 0 else os.devnull, "a")
    net = DDP(model) if world > 1 else model  # DDP: the same model, gradients averaged over processes
    net = torch.compile(net) if cfg.compile else net
    t0, start_step, loss_sum, loss_n, tokens = time.time(), step, 0.0, 0, 0
    model.train()
    while step < total:
        idx = shard(data.batch_indices(lengths, cfg.batch_size, cfg.seed, step), rank, world)
        x, y, mask = data.make_batch(train_enc, idx, tok.eot, device)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total, cfg.lr, cfg.warmup_frac)
        with ctx:
            loss = scd.gold_ce(net(x, positions=mask), y, mask).mean()  # SFT: CE on answer tokens
        optimizer_step(model, optimizer, scaler, loss, cfg.grad_clip)
        step += 1
        loss = global_mean(loss.detach(), world)
        loss_sum, loss_n, tokens = loss_sum + loss.item(), loss_n + 1, tokens + x.numel() * world

        if step % cfg.log_every == 0 or step == total:
            line = progress(step, total, t0, start_step, tokens, f"loss {loss.item():.4f} | lr {optimizer.param_groups[0]['lr']:.2e}")
            print(line, flush=True)
            log.write(line + "\n")
        if step in ckpt_steps:  # a dense checkpoint: weights, a manifest row, the full state
            summary, _ = data.evaluate(model, splits["val"], tok, device, ctx=ctx)
            name = f"ckpt_{step:06d}.pt"
            atomic_save(dict(model=model.state_dict(), model_config=asdict(model.config), vocab=tok.ids), out / name)
            manifest["checkpoints"].append(dict(file=name, step=step, epoch=round(step / steps_per_epoch, 3),
                                                train_loss=round(loss_sum / loss_n, 5),
                                                val_loss=round(summary["loss"], 5), val_acc=round(summary["acc"], 4)))
            manifest["best"] = min(range(len(manifest["checkpoints"])), key=lambda i: manifest["checkpoints"][i]["val_loss"])
            atomic_save(manifest, out / "manifest.json")
            state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, rng=torch.get_rng_state())
            if scaler is not None:
                state["scaler"] = scaler.state_dict()
            atomic_save(state, out / "state.pt")
            line = f"checkpoint {name}: val loss {summary['loss']:.4f}, val acc {summary['acc']:.3f}"
            print(line)
            log.write(line + "\n")
            loss_sum, loss_n = 0.0, 0
        if step == cfg.stop_at_step:
            print(f"stopping at step {step} as asked (--stop_at_step); rerun to resume")
            return None
    log.close()
    if rank > 0:  # the test pass and the anchor file are rank 0's
        return None
    manifest["wall_s"] = round(time.time() - t_start, 1)  # of the sitting that finished the run
    return finish(cfg, out, manifest, splits, device, ctx)


def finish(cfg, out, manifest, splits, device, ctx):
    """The best checkpoint on test (per-example records) and on train (the AW anchor l_S)."""
    best = manifest["checkpoints"][manifest["best"]]
    model, tok = load_checkpoint(out / best["file"], device)
    summary, records = data.evaluate(model, splits["test"], tok, device, ctx=ctx)
    atomic_save(records, out / "test_records.jsonl")
    losses = example_losses(model, data.encode(splits["train"], tok, model.config.block_size), tok.eot, device, ctx)
    atomic_save(dict(fingerprint=manifest["fingerprint"], checkpoint=best["file"], loss=losses), out / "train_losses.json")
    manifest["test"] = {k: round(v, 4) for k, v in summary.items()}
    atomic_save(manifest, out / "manifest.json")
    print(f"best checkpoint {best['file']} (step {best['step']}, val loss {best['val_loss']:.4f}) on test: "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    if cfg.compare_to:
        teacher = [json.loads(l) for l in open(Path(cfg.compare_to) / "test_records.jsonl", encoding="utf-8")]
        print(comparison_table(teacher, records))
    return summary


@torch.no_grad()
def example_losses(model, enc, eot, device, ctx, chunk=256):
    """Per-example gold CE (mean over answer tokens) of model on encoded examples: a list."""
    losses = []
    for s in range(0, len(enc), chunk):
        x, y, mask = data.make_batch(enc, range(s, min(s + chunk, len(enc))), eot, device)
        with ctx:
            losses += scd.gold_ce(model(x, positions=mask), y, mask).tolist()
    return losses


def comparison_table(teacher, sft):
    """Markdown: accuracy of teacher and SFT student per subdomain, and the TFS/SFS shares."""
    rows = ["| subdomain | teacher acc | SFT student acc | TFS share | SFS share | deficit | advantage |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for s, d in scd.decompose_records(teacher, sft).items():
        rows.append(f"| {s} | {1 - d['R_teacher']:.3f} | {1 - d['R_sft']:.3f} | {d['p_tfs']:.3f} | "
                    f"{d['p_sfs']:.3f} | {d['deficit']:.3f} | {d['advantage']:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    torch.set_num_threads(min(os.cpu_count() or 1, 8))
    t = time.time()
    train(parse_config(TrainConfig))
    print(f"wall time {time.time() - t:.0f}s")
    if dist.is_initialized():
        dist.destroy_process_group()
