"""
Supervised fine-tuning (SFT) with dense checkpoints (METHOD.md sections 2.1 and 2.2).
Trains the teacher, and with --preset student the SFT student whose per-example training
loss l_S(x) anchors Adaptive Weighting.

    python train_teacher.py                                        # CPU teacher, embedded domain
    python train_teacher.py --preset student --out_dir runs/student_sft --compare_to runs/teacher
    python train_teacher.py --init_from gpt2-large --data my_domain/ --batch_size 8 --lr 2e-5
    torchrun --nproc_per_node=4 train_teacher.py ...               # data parallel, global batch

Outputs in --out_dir: ckpt_{step:06d}.pt (weights only), manifest.json (one row per
checkpoint, the best marked), probe_*.pt (each checkpoint's log-probs on the schedule's
probe, for distill.py), config.json, log.txt, test_records.jsonl (best checkpoint on test),
train_losses.json (its per-example training loss, with the data's fingerprint), and
state.pt (the full training state: rerun the same command to resume).
"""
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import scd
from common import (RunError, arg, atomic_save, check_finite, fingerprints, global_mean, load_checkpoint, lr_at,
                    memory_plan, optimizer_step, out_folder, parse_config, prepare, probe_file, progress, read_json, resumable,
                    run_main, setup_device, shard)
from model import PRESETS

@dataclass
class TrainConfig:
    data: str = arg("default", "'default' (the embedded domain), 'default:NOISE', 'parity:N:K' or a folder with train/val/test.jsonl")
    preset: str = arg("teacher", "model preset", choices=tuple(PRESETS))
    init_from: str = arg("", "'' (random init of --preset), base (its committed base), a .pt checkpoint, a GPT-2 name or a model folder")
    out_dir: str = arg("runs/teacher", "output folder; rerunning the same command resumes it")
    epochs: int = arg(24, "passes over the training set", low=1)
    batch_size: int = arg(16, "examples per step", low=1)
    lr: float = arg(3e-3, "peak learning rate (3e-3 for the CPU teacher; the README uses 6e-3 for the CPU student)", low=0)
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices", low=0)
    warmup_frac: float = arg(0.1, "share of steps with linear LR warm-up, then cosine decay to 0", low=0)
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)", low=0)
    ckpt_per_epoch: float = arg(4.0, "dense checkpoints per epoch, evenly spaced (0.5: one every 2 epochs)", low=0.01)
    probe_size: int = arg(256, "examples of the schedule's probe (a seeded subset of train) scored at every checkpoint", low=1)
    probe_topk: int = arg(64, "log-probs kept per probe token: the largest k, the rest as one tail mass", low=1)
    seed: int = arg(0, "seed of the model init, the data order and the probe")
    device: str = arg("auto", "cpu, cuda, cuda:1, ... (auto: cuda if available)")
    dtype: str = arg("auto", "autocast precision (auto: bf16/fp16 on CUDA, fp32 on CPU)",
                     choices=("auto", "float32", "bfloat16", "float16"))
    log_every: int = arg(20, "steps between progress lines", low=1)
    compile: bool = arg(False, "torch.compile the trained model (CUDA; slow to start, faster per step)")
    grad_ckpt: bool = arg(False, "activation checkpointing: recompute each block in the backward pass (less memory, more time)")
    compare_to: str = arg("", "a teacher run folder: print the SFS/TFS table of that teacher vs this model")
    stop_at_step: int = arg(0, "stop after this step as if interrupted (to test resuming; 0: off)", low=0)


# -----------------------------------------------------------------------------

def train(cfg):
    t_start = time.time()
    device, dtype, ctx, scaler, rank, world = setup_device(cfg.device, cfg.dtype)
    splits, tok, model, enc = prepare(cfg.data, cfg.preset, cfg.seed, cfg.init_from)
    train_enc = enc["train"]
    if len(train_enc) < cfg.batch_size:
        raise RunError(f"--batch_size {cfg.batch_size} is larger than the {len(train_enc)} training examples")
    lengths = [len(p) + len(a) for p, a in train_enc]
    steps_per_epoch = len(train_enc) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    n_ckpt = max(1, round(cfg.epochs * cfg.ckpt_per_epoch))
    ckpt_steps = sorted({round(total * j / n_ckpt) for j in range(1, n_ckpt + 1)})
    model.grad_checkpointing = cfg.grad_ckpt
    memory_plan(model, None, cfg.batch_size // world, max(lengths), max(len(a) for _, a in train_enc) + 1, dtype,
                cfg.grad_ckpt, device, len(ckpt_steps))
    model.to(device)
    out = out_folder(cfg.out_dir)
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, 0.95), device.split(":")[0])
    _, probe, probe_id = data.probe_examples(train_enc, cfg.probe_size, cfg.seed)
    print(f"{cfg.init_from or cfg.preset}: {model.num_params() / 1e6:.2f}M parameters, vocab {tok.vocab_size}, "
          f"context {model.config.block_size} | {len(train_enc)} train examples, {total} steps, "
          f"{len(ckpt_steps)} checkpoints | {device}, {dtype}")

    # resume: the same config and data continue from the last full state, anything else is refused
    config = dict(asdict(cfg), stop_at_step=0, fingerprint=fingerprints(splits))
    config.pop("out_dir")
    manifest = dict(config=config, fingerprint=config["fingerprint"]["train"], checkpoints=[], best=None)
    pfile = probe_file(out, cfg.seed, cfg.probe_size, cfg.probe_topk)
    probe_lp = dict(fingerprint=manifest["fingerprint"], probe=probe_id, steps=[], values=[], indices=[])
    step, skipped = 0, 0
    if resumable(out, config, asdict(TrainConfig())):
        state = torch.load(out / "state.pt", map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        step = state["step"]
        manifest = read_json(out / "manifest.json")
        if step == total and "test" in manifest:
            print(f"{out} holds this run, finished: nothing to do")
            return manifest["test"]
        manifest["checkpoints"] = [c for c in manifest["checkpoints"] if c["step"] <= step]
        probe_lp = torch.load(pfile, weights_only=True)
        keep = sum(s <= step for s in probe_lp["steps"])
        probe_lp = {k: v[:keep] if isinstance(v, list) else v for k, v in probe_lp.items()}
        print(f"resuming {out} from step {step}")
    atomic_save(dict(config, out_dir=str(out)), out / "config.json")

    log = open(out / "log.txt" if rank == 0 else os.devnull, "a")
    net = DDP(model) if world > 1 else model  # DDP: the same model, gradients averaged over processes
    net = torch.compile(net) if cfg.compile else net
    t0, start_step, loss_sum, loss_n, tokens, t_eval = time.time(), step, 0.0, 0, 0, 0.0
    model.train()
    while step < total:
        idx = shard(data.batch_indices(lengths, cfg.batch_size, cfg.seed, step), rank, world)
        x, y, mask = data.make_batch(train_enc, idx, tok.eot, device)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total, cfg.lr, cfg.warmup_frac)
        with ctx:
            loss = scd.gold_ce(net(x, positions=mask), y, mask).mean()  # SFT: CE on answer tokens
        check_finite(f"step {step + 1}", loss=loss)
        skipped += optimizer_step(model, optimizer, scaler, loss, cfg.grad_clip, f"step {step + 1}")
        step += 1
        loss = global_mean(loss.detach(), world)
        loss_sum, loss_n, tokens = loss_sum + loss.item(), loss_n + 1, tokens + x.numel() * world

        if step % cfg.log_every == 0 or step == total:
            msg = f"loss {loss.item():.4f} | lr {optimizer.param_groups[0]['lr']:.2e}"
            line = progress(step, total, t0, start_step, tokens, msg + (f" | fp16 skipped {skipped}" if scaler else ""))
            print(line, flush=True)
            log.write(line + "\n")
        if step in ckpt_steps:  # a dense checkpoint: weights, a manifest row, the probe, the full state
            t = time.time()
            summary, _ = data.evaluate(model, splits["val"], tok, device, ctx=ctx)
            t_eval += time.time() - t
            name = f"ckpt_{step:06d}.pt"
            weights = {k: v.to(torch.bfloat16) if dtype == "bfloat16" else v for k, v in model.state_dict().items()}
            atomic_save(dict(model=weights, model_config=asdict(model.config), vocab=tok.ids), out / name)  # bf16 if trained in bf16
            manifest["checkpoints"].append(dict(file=name, step=step, epoch=round(step / steps_per_epoch, 3),
                                                train_loss=round(loss_sum / loss_n, 5),
                                                val_loss=round(summary["loss"], 5), val_acc=round(summary["acc"], 4)))
            manifest["best"] = scd.best_checkpoint([c["val_loss"] for c in manifest["checkpoints"]])
            v, i = scd.compress_logprobs(data.probe_logprobs(model.eval(), probe, tok.eot, device, ctx), cfg.probe_topk)
            model.train()
            probe_lp["steps"].append(step), probe_lp["values"].append(v.cpu()), probe_lp["indices"].append(i.cpu())
            atomic_save(probe_lp, pfile)
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
    if scaler:
        print(f"fp16: the gradient scaler skipped {skipped} of the {total - start_step} steps of this sitting (overflow)")
    if rank > 0:  # the test pass and the anchor file are rank 0's
        return None
    t = time.time()
    summary = finish(cfg, out, manifest, splits, device, ctx)
    wall, t_eval = time.time() - t_start, t_eval + time.time() - t
    manifest.update(wall_s=round(wall, 1), eval_s=round(t_eval, 1))  # of the sitting that finished the run
    atomic_save(manifest, out / "manifest.json")
    print(f"evaluation (validation at every checkpoint, test, the anchor's training losses) took {t_eval:.1f}s "
          f"of {wall:.0f}s ({100 * t_eval / wall:.1f}%)")
    return summary


def finish(cfg, out, manifest, splits, device, ctx):
    """The best checkpoint on test (per-example records) and on train (the AW anchor l_S)."""
    best = manifest["checkpoints"][manifest["best"]]
    model, tok = load_checkpoint(out / best["file"], device)
    summary, records = data.evaluate(model, splits["test"], tok, device, ctx=ctx)  # forced match, as validation
    atomic_save(records, out / "test_records.jsonl")
    losses = data.example_losses(model, data.encode(splits["train"], tok, model.config.block_size), tok.eot, device, ctx)
    atomic_save(dict(fingerprint=manifest["fingerprint"], checkpoint=best["file"], loss=losses), out / "train_losses.json")
    manifest["test"] = {k: round(v, 4) for k, v in summary.items()}
    atomic_save(manifest, out / "manifest.json")
    print(f"best checkpoint {best['file']} (step {best['step']}, val loss {best['val_loss']:.4f}) on test: "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    if cfg.compare_to:
        teacher = [json.loads(line) for line in open(Path(cfg.compare_to) / "test_records.jsonl", encoding="utf-8")]
        print(comparison_table(teacher, records))
    return summary


def comparison_table(teacher, sft):
    """Markdown: accuracy of teacher and SFT student per subdomain, and the TFS/SFS shares."""
    rows = ["| subdomain | teacher acc | SFT student acc | TFS share | SFS share | deficit | advantage |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for s, d in scd.decompose_records(teacher, sft).items():
        rows.append(f"| {s} | {1 - d['R_teacher']:.3f} | {1 - d['R_sft']:.3f} | {d['p_tfs']:.3f} | "
                    f"{d['p_sfs']:.3f} | {d['deficit']:.3f} | {d['advantage']:.3f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    run_main(train, parse_config(TrainConfig, "SFT of a teacher (or of the SFT student) with dense checkpoints."))
