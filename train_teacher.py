"""
Supervised fine-tuning (SFT) with dense checkpoints (METHOD.md sections 2.1 and 2.2).

The teacher's run is the trail the method walks: a checkpoint every few epochs, each with its
validation loss (the lowest is T*) and its log-probabilities on the schedule's probe. The same
script trains the SFT student (--preset student), whose per-example training loss l_S(x) is
the anchor of Adaptive Weighting.

    python train_teacher.py                                          # the teacher, from its base
    python train_teacher.py --preset student --out_dir runs/student_sft --compare_to runs/teacher
    python train_teacher.py --init_from models/Llama-3.2-3B --data my_domain/ --lr 1e-5 --epochs 3
    torchrun --nproc_per_node=4 train_teacher.py ...                 # data parallel, global batch

Writes to --out_dir: ckpt_{step:06d}.pt (weights), manifest.json (a row per checkpoint, T*
marked), probe_*.pt (every checkpoint's log-probs on the probe), test_records.jsonl (T* on
test), train_losses.json (T*'s loss on every training example: l_S when this is the SFT
student), config.json, log.txt and state.pt (rerun the same command to resume).
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import data
import scale
import scd
from distill import amp_step
from model import PRESETS
from plumbing import (Logger, arg, atomic_save, check_finite, checkpoint_dict, global_mean, load_checkpoint,
                      load_weights, lr_at, optimizer_state, parse_config, prepare, resume_sft, rng_state, run_main,
                      setup_device, shard,
                      trained_state)


@dataclass
class TrainConfig(scale.SystemConfig):  # and the system flags, in scale.py
    # data
    data: str = arg("default", "'default' (the committed data/default/) or a folder with train/val/test.jsonl")
    # model
    preset: str = arg("teacher", "model preset (student: the SFT student of the same recipe)", choices=tuple(PRESETS))
    init_from: str = arg("auto", "auto (the preset's committed base on the default domain, else random init), "
                         "'' (random init), base, a .pt checkpoint, a GPT-2 name or a model folder")
    # optimisation: the main command's recipe on the default domain
    epochs: int = arg(0, "passes over the training set (0: 24 for the teacher, 12 for a student, the students' budget)",
                      low=0)
    steps: int = arg(0, "steps in all, instead of --epochs (--ckpt_per_epoch counts per pass over the data)", low=0)
    batch_size: int = arg(16, "examples per step (the global batch under torchrun)", low=1)
    lr: float = arg(3e-3, "peak learning rate (3e-3: the main command's, teacher and students)", low=0)
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices", low=0)
    warmup_frac: float = arg(0.1, "share of steps with linear LR warm-up, then cosine decay to 0", low=0)
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)", low=0)
    # the trail: what the method reads from this run
    ckpt_per_epoch: float = arg(0.25, "dense checkpoints per epoch, evenly spaced (0.25: one every 4 epochs)", low=0.01)
    probe_size: int = arg(256, "examples of the schedule's probe (a seeded subset of train), scored at each checkpoint",
                          low=1)
    probe_topk: int = arg(64, "log-probs kept per probe token: the largest k, the rest as one tail mass", low=1)
    probe_resamples: int = arg(3, "also score the probes of seeds seed + 1000 r, r = 1..N, on which distill.py's "
                               "--probe_resamples checks the choice (no distillation scores a checkpoint)", low=0)
    # system
    out_dir: str = arg("runs/teacher", "output folder; rerunning the same command resumes it")
    seed: int = arg(0, "seed of the model init, dropout, the data order and the probe")
    log_every: int = arg(20, "steps between progress lines", low=1)
    compare_to: str = arg("", "a teacher run folder: print the SFS/TFS table of that teacher against this model")
    # for the tests only
    stop_at_step: int = arg(0, "stop after this step as if interrupted (0: off)", low=0)

    def __post_init__(self):  # the defaults that depend on the data or the preset, resolved once and said
        if self.init_from == "auto":
            self.init_from = "base" if self.data == "default" else ""
        if self.epochs == 0:
            self.epochs = 24 if self.preset == "teacher" else 12


# -----------------------------------------------------------------------------

def train(cfg, splits=None):
    """SFT of cfg.preset on the answer tokens, with a dense checkpoint at every one of the
    ckpt_steps. splits: the domain already loaded (the lab's generated ones); default: --data."""
    t_start = time.time()
    device, dtype, ctx, scaler, rank, world = setup_device(cfg.device, cfg.dtype, cfg.dist_timeout)
    splits, tok, model, enc = prepare(cfg.data, cfg.preset, seed=cfg.seed, init_from=cfg.init_from, splits=splits,
                                      lora=(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout))
    train_enc = enc["train"]
    steps_per_epoch = len(train_enc) // cfg.batch_size
    total = cfg.steps or cfg.epochs * steps_per_epoch
    epochs = total / max(1, steps_per_epoch)  # passes over the training set (--steps need not make whole ones)
    n_ckpt = max(1, round(epochs * cfg.ckpt_per_epoch))  # M, the dense checkpoints of the trail
    ckpt_steps = sorted({round(total * j / n_ckpt) for j in range(1, n_ckpt + 1)})  # section 2.1: evenly spaced
    print(f"{cfg.preset} from {cfg.init_from or 'random init'} (--init_from): {model.num_params() / 1e6:.2f}M "
          f"parameters, vocab {tok.vocab_size} | {len(train_enc)} train examples, {epochs:g} epochs "
          f"(--epochs), {total} steps, {len(ckpt_steps)} checkpoints | {device}, {dtype}")
    # before the first step: the memory plan printed (a run that cannot fit is refused), activation checkpointing
    # set, an adapter's base cast, the model on its device, the run folder locked
    out = scale.start(cfg, model, tok, teacher_file=None, train_enc=train_enc, device=device, dtype=dtype, world=world,
                      n_ckpt=len(ckpt_steps))
    net = scale.wrap(model, cfg, world=world, dtype=dtype)  # DDP or FSDP2 under torchrun; before the optimizer
    optimizer = model.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, 0.95), device.split(":")[0])
    probes = [data.ProbeStore(out, train_enc, data.fingerprint(splits["train"]), size=cfg.probe_size, seed=s,
                              topk=cfg.probe_topk)
              for s in data.probe_seeds(cfg.seed, cfg.probe_resamples, size=cfg.probe_size, n_train=len(train_enc))]
    manifest, step = resume_sft(out, cfg, TrainConfig, splits=splits, model=model, optimizer=optimizer, scaler=scaler,
                                probes=probes, device=device)  # or a fresh run
    if "test" in manifest and step == total:
        print(f"{out} holds this run, finished: nothing to do")
        return manifest["test"]
    lengths, chunk = [len(p) + len(a) for p, a in train_enc], data.logit_chunk(model.config.vocab_size, cfg.logit_chunk)
    log = Logger(out, rank, total, step, cfg.log_every)
    loss_sum, loss_n, skipped, t_eval = 0.0, 0, 0, 0.0
    model.train()
    while step < total:
        # one SFT step: the gold answer's cross-entropy, on answer tokens only (the prompt is never a target)
        idx = shard(data.batch_indices(lengths, cfg.batch_size, cfg.seed, step), rank, world)
        x, y, mask = data.make_batch(train_enc, idx, tok.eot, device)
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, total, cfg.lr, cfg.warmup_frac)  # warm-up, then cosine decay to 0
        with ctx:  # autocast: matmuls in bf16/fp16 on CUDA, the loss in float32 (gold_ce casts)
            loss = scd.gold_ce(net(x, positions=mask), y, mask, chunk).mean()
        check_finite(f"step {step + 1}", loss=loss)  # a NaN stops the run here, before anything is saved
        # backward, clip and the AdamW step: distill.amp_step, the one step both scripts take (with fp16, the
        # GradScaler skips a step whose gradients overflowed, and it is counted)
        skipped += amp_step(loss, optimizer, scaler, model, clip=cfg.grad_clip, where=f"step {step + 1}")
        step += 1
        loss = global_mean(loss.detach(), world)
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        log.step(step, x.numel() * world, f"loss {loss.item():.4f} | lr {g['lr']:.2e}", skipped if scaler else None,
                 force=step == total)

        if step in ckpt_steps:
            # section 2.1: a dense checkpoint, its validation loss (T* is the lowest), its log-probs on the probe
            t = time.time()
            summary, _ = data.evaluate(model, splits["val"], tok, device, ctx=ctx, chunk=chunk)
            t_eval += time.time() - t
            name = f"ckpt_{step:06d}.pt"  # the weights in bf16 if trained in bf16; with adapters, the adapters alone
            atomic_save(checkpoint_dict(model, tok, dtype), out / name)
            manifest["checkpoints"].append(dict(file=name, step=step, epoch=round(step / steps_per_epoch, 3),
                                                train_loss=round(loss_sum / loss_n, 5),
                                                val_loss=round(summary["loss"], 5), val_acc=round(summary["acc"], 4)))
            manifest["best"] = scd.best_checkpoint([c["val_loss"] for c in manifest["checkpoints"]])
            for probe in probes:  # the run's probe and the ones distill.py resamples
                probe.add(step, data.probe_logprobs(model.eval(), probe.probe, tok.eot, device, ctx,
                                                    topk=cfg.probe_topk, chunk=chunk))
                atomic_save(probe.data, probe.path)
            model.train()
            atomic_save(manifest, out / "manifest.json")
            state = dict(model=trained_state(model), optimizer=optimizer_state(model, optimizer), step=step,
                         **rng_state(device))
            state |= {"scaler": scaler.state_dict()} if scaler else {}
            atomic_save(state, out / "state.pt")  # all a resume needs
            log.line(f"checkpoint {name}: val loss {summary['loss']:.4f}, val acc {summary['acc']:.3f}")
            loss_sum, loss_n = 0.0, 0
        if step == cfg.stop_at_step:
            print(f"stopping at step {step} as asked (--stop_at_step); rerun to resume")
            return None
    log.close(skipped if scaler else None)
    if rank > 0:  # the test pass and the anchor file are rank 0's
        return None
    t = time.time()
    optimizer = net = None  # AdamW's state goes before T* is read back for the test pass and the anchor
    summary = finish(cfg, out, manifest, splits, device, ctx, chunk, model if world == 1 else None)
    wall, t_eval = time.time() - t_start, t_eval + time.time() - t
    manifest.update(wall_s=round(wall, 1), eval_s=round(t_eval, 1))  # of the sitting that finished the run
    atomic_save(manifest, out / "manifest.json")
    print(f"evaluation (validation at every checkpoint, test, the anchor's training losses) took {t_eval:.1f}s "
          f"of {wall:.0f}s ({100 * t_eval / wall:.1f}%)")
    return summary


def finish(cfg, out, manifest, splits, device, ctx, chunk=0, into=None):
    """T*, the checkpoint of lowest validation loss, on test (per-example records) and on
    train: its per-example loss is section 2.2's anchor l_S(x) when this run is the SFT student.
    into: the run's own model, which takes T*'s weights (no second model in memory)."""
    best = manifest["checkpoints"][manifest["best"]]
    path = out / best["file"]
    model, tok = load_weights(path, into) if into is not None else load_checkpoint(path, device)
    summary, records = data.evaluate(model, splits["test"], tok, device, ctx=ctx, chunk=chunk)  # as validation
    atomic_save(records, out / "test_records.jsonl")
    train = data.encode(splits["train"], tok, model.config.block_size)
    losses = data.example_losses(model, train, tok.eot, device, ctx, chunk=chunk)
    anchor = dict(fingerprint=manifest["fingerprint"], checkpoint=best["file"], loss=losses)
    atomic_save(anchor, out / "train_losses.json")
    manifest["test"] = {k: round(v, 4) for k, v in summary.items()}
    atomic_save(manifest, out / "manifest.json")
    print(f"best checkpoint {best['file']} (step {best['step']}, val loss {best['val_loss']:.4f}) on test: "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    if cfg.compare_to:  # section 1: where the teacher is better (TFS) and where the SFT student is (SFS)
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
