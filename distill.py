"""
Scheduled checkpoint distillation (METHOD.md sections 2.3-2.5 and 3): K stages of T steps;
each stage distils from one teacher checkpoint, chosen by the method's policy.

    python distill.py --method scd --aw true --out_dir runs/scd_aw   # SCD+AW on the CPU default
    python distill.py --method kd --out_dir runs/kd                  # plain distillation from T*

Needs a teacher run (train_teacher.py) and, for AW, the SFT student run whose
train_losses.json holds the anchor l_S. Writes schedule.json (the chosen checkpoint and
both KL terms for every candidate, per stage), best.pt and final.pt, their test records,
log.txt, and state.pt after each stage (rerun the same command to resume).
"""
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import scd
from common import (RunError, arg, atomic_save, check_finite, dist, fingerprints, global_mean, load_checkpoint, lr_at,
                    memory_plan, optimizer_step, out_folder, parse_config, prepare, probe_file, progress, read_json, resumable,
                    run_main, setup_device, shard)
from model import PRESETS


@dataclass
class DistillConfig:
    data: str = arg("default", "the teacher's data: 'default', 'default:NOISE', 'parity:N:K' or a folder")
    teacher_dir: str = arg("runs/teacher", "the teacher run: manifest.json and its checkpoints")
    anchor_dir: str = arg("runs/student_sft", "the SFT student run: its train_losses.json is l_S (AW), its config the init")
    out_dir: str = arg("runs/scd_aw", "output folder; rerunning the same command resumes it")
    preset: str = arg("student", "student model preset", choices=tuple(PRESETS))
    init_from: str = arg("", "'' (random init of --preset), base (its committed base), a .pt checkpoint, a GPT-2 name or a model folder")
    method: str = arg("scd", "teacher schedule: sft (no teacher), kd (T* only), cd (fixed order), scd (adaptive)",
                      choices=("sft", "kd", "cd", "scd"))
    aw: bool = arg(False, "Adaptive Weighting instead of the fixed alpha")
    alpha: float = arg(1.0, "fixed KL weight w when AW is off (1.0 chosen on KD's validation accuracy)", low=0)
    stages: int = arg(4, "K, the number of stages", low=1)
    steps_per_stage: int = arg(1440, "T, steps per stage (K x T = the SFT student's 24 epochs of 240 steps)", low=1)
    batch_size: int = arg(16, "examples per step", low=1)
    lr: float = arg(6e-3, "peak learning rate of each stage (chosen on KD's validation accuracy)", low=0)
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices", low=0)
    warmup_frac: float = arg(0.1, "warm-up share of each stage; the cosine restarts every stage", low=0)
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)", low=0)
    kl_direction: str = arg("forward", "distillation KL: forward KL(p_c || p_student) or reverse", choices=("forward", "reverse"))
    temperature: float = arg(1.0, "softmax temperature of the distillation KL", low=1e-3)
    probe_size: int = arg(256, "probe examples (a seeded subset of train) for choosing checkpoints", low=1)
    probe_topk: int = arg(64, "log-probs kept per probe token (the rest as one tail mass)", low=1)
    probe_resamples: int = arg(3, "SCD: also choose on this many probes drawn with other seeds, and log those choices", low=0)
    student_term: str = arg("flipped", "schedule's student term: flipped KL(p_c || p_student) or as_written KL(p_student || p_c)",
                            choices=("flipped", "as_written"))
    pool_start: float = arg(0.5, "candidate pool starts at this fraction of the teacher's training (0.5 chosen on SCD+AW's validation accuracy)", low=0)
    monotone: bool = arg(False, "never choose a checkpoint earlier than the previous stage's")
    start: str = arg("init", "student start: init (the SFT student's initialisation) or anchor (its trained weights)",
                     choices=("init", "anchor"))
    teacher_cache_gib: float = arg(2.0, "keep each stage's teacher logits on the training set if they fit in this many GiB (0: off)", low=0)
    seed: int = arg(0, "seed of the student init, the data order and the probe")
    device: str = arg("auto", "cpu, cuda, ... (auto: cuda if available)")
    dtype: str = arg("auto", "autocast precision (auto: bf16/fp16 on CUDA, fp32 on CPU)",
                     choices=("auto", "float32", "bfloat16", "float16"))
    log_every: int = arg(40, "steps between progress lines", low=1)
    compile: bool = arg(False, "torch.compile the trained model (CUDA; slow to start, faster per step)")
    grad_ckpt: bool = arg(False, "activation checkpointing: recompute each block in the backward pass (less memory, more time)")
    eval_every: int = arg(0, "steps between validation-accuracy points of a learning curve in schedule.json (0: none)", low=0)
    stop_at_stage: int = arg(0, "stop after this many stages as if interrupted (to test resuming; 0: off)", low=0)


def teacher_pool(cfg, student, tok):
    """The teacher's checkpoints from --pool_start on (the candidates), T*'s place among
    them, and a check that teacher and student share a vocabulary and context."""
    tdir = Path(cfg.teacher_dir)
    if not (tdir / "manifest.json").exists():
        raise RunError(f"{tdir}: no manifest.json; train a teacher first (python train_teacher.py --out_dir {tdir})")
    manifest = read_json(tdir / "manifest.json")
    ckpts = manifest["checkpoints"]
    if not ckpts:
        raise RunError(f"{tdir}/manifest.json lists no checkpoints")
    pool = [c for c in ckpts if c["step"] >= cfg.pool_start * ckpts[-1]["step"]]
    if ckpts[manifest["best"]] not in pool:
        raise RunError(f"--pool_start {cfg.pool_start} leaves the best checkpoint out of the pool")
    best = pool.index(ckpts[manifest["best"]])
    t_model, t_tok = load_checkpoint(tdir / pool[best]["file"])  # on the CPU: checked here, counted in the memory plan
    if t_tok.identity != tok.identity:
        raise RunError(f"{tdir} has another tokenizer than the student (vocabulary {t_tok.vocab_size} vs {tok.vocab_size}"
                       + (f", tokenizer.json sha {t_tok.identity[2]} vs {tok.identity[2]})" if t_tok.identity[0] == tok.identity[0]
                          == "tokenizer.json" else ")") + ": distillation compares their distributions token by token")
    if t_model.config.block_size < student.config.block_size:
        raise RunError(f"{tdir} has a shorter context ({t_model.config.block_size}) than the student ({student.config.block_size})")
    return tdir, pool, best, t_model


def sft_anchor(cfg, train_fp, n_train, device):
    """The SFT student run: AW's anchor l_S for this very training set (None without AW),
    after a check that the student starts where the SFT student did."""
    adir, anchor = Path(cfg.anchor_dir), None
    if cfg.aw:
        a = read_json(adir / "train_losses.json")
        if a["fingerprint"] != train_fp or len(a["loss"]) != n_train:
            raise RunError(f"{adir / 'train_losses.json'} was made for other training data (fingerprint {a['fingerprint']})")
        anchor = torch.tensor(a["loss"], device=device)
    if cfg.start == "anchor" or cfg.aw or (adir / "config.json").exists():
        a = read_json(adir / "config.json")
        for k in ("seed", "init_from") + (("preset",) if cfg.init_from in ("", "base") else ()):  # "the SFT student's initialisation"
            if a.get(k) != getattr(cfg, k):
                raise RunError(f"--{k} {getattr(cfg, k)!r} differs from the SFT student's ({a.get(k)!r} in {adir}): "
                               "the student would not start where the SFT student did")
    return anchor


def probe_cache(cfg, tdir, pool, train_enc, probe_seed, tok, device, ctx, train_fp):
    """The probe drawn with probe_seed, and each pool checkpoint's compressed log-probs on it:
    the teacher run stores them with the probe's id; a file made on other examples is never
    used: they are computed here then, and stored in the teacher's folder for the next run."""
    _, probe, probe_id = data.probe_examples(train_enc, cfg.probe_size, probe_seed)
    path = probe_file(tdir, probe_seed, cfg.probe_size, cfg.probe_topk)
    steps = [c["step"] for c in pool]
    if path.exists():
        stored = torch.load(path, map_location=device, weights_only=True)
        if stored["fingerprint"] == train_fp and stored.get("probe") == probe_id and set(steps) <= set(stored["steps"]):
            at = [stored["steps"].index(s) for s in steps]
            return probe, [(stored["values"][j], stored["indices"][j]) for j in at]
        print(f"note: {path} was made on another probe or other checkpoints; computing the probe's log-probs here")
    values, indices = [], []
    for c in pool:
        m, _ = load_checkpoint(tdir / c["file"], device)
        v, i = scd.compress_logprobs(data.probe_logprobs(m, probe, tok.eot, device, ctx), cfg.probe_topk)
        values.append(v), indices.append(i)
    try:
        atomic_save(dict(fingerprint=train_fp, probe=probe_id, steps=steps, values=values, indices=indices), path)
    except OSError as e:
        print(f"note: could not store the probe in {tdir} ({e.strerror}); the next run will compute it again")
    return probe, list(zip(values, indices))


@torch.no_grad()
def teacher_logits(teacher, enc, eot, device, ctx, max_gib, chunk=64):
    """The stage's teacher logits at every training example's answer positions, one tensor
    per example (each example is seen many times per stage; the checkpoint does not change
    within it). None if they would take more than max_gib."""
    n_tok = sum(len(a) + 1 for _, a in enc)
    if n_tok * teacher.config.vocab_size * 4 > max_gib * 2**30:
        return None
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]) + len(enc[i][1]))  # chunks pad little
    chunks = data.answer_logits(teacher, [enc[i] for i in order], eot, device, ctx, chunk)
    rows = [None] * len(enc)
    for i, r in zip(order, (r for lg, _, mask in chunks for r in lg.split(mask.sum(1).tolist()))):
        rows[i] = r
    return rows


def choose(cfg, stage, schedule, student, probes, best, tok, device, ctx, world):
    """Stage k's teacher checkpoint c_k, an index into the pool (None: SFT), and the
    schedule row that logs it: for SCD, both terms for every candidate on the run's probe,
    and the choices the resampled probes would have made (the run uses the first)."""
    row, k = dict(stage=stage), None
    if cfg.method == "scd":
        V, picks = student.config.vocab_size, []
        prev = schedule[-1]["ckpt"] if schedule else None  # --monotone: never before the previous stage's choice
        for probe, cache in probes:
            s_lp = data.probe_logprobs(student.eval(), probe, tok.eot, device, ctx)
            dense = (scd.dense_logprobs(v, i, V) for v, i in cache)
            picks.append(scd.scd_checkpoint(scd.dense_logprobs(*cache[best], V), dense, s_lp, cfg.student_term, prev,
                                            cfg.monotone))
        k, kl_best, kl_student = picks[0]
        row.update(kl_best=kl_best, kl_student=kl_student, resampled=[p[0] for p in picks[1:]])
    elif cfg.method != "sft":
        k = scd.fixed_checkpoint(cfg.method, stage, cfg.stages, best)
    if world > 1:  # every process computed the same choice; rank 0's is the one used
        k = [k]
        dist.broadcast_object_list(k, src=0)
        k = k[0]
    return k, row


def resume(cfg, out, config, student, device):
    """A folder holding this very run: (its results if finished, else None; the stage to
    start at, the best validation accuracy so far, the schedule so far). A fresh folder
    starts at stage 0, from the SFT student's initialisation or, with --start anchor, its
    trained weights."""
    if resumable(out, config, asdict(DistillConfig())):  # the stage-level state: each stage restarts its optimizer anyway
        st = torch.load(out / "state.pt", map_location=device, weights_only=True)
        if st["stage"] == cfg.stages and (out / "results.json").exists():
            print(f"{out} holds this run, finished: nothing to do")
            return read_json(out / "results.json"), 0, 0, []
        student.load_state_dict(st["model"])
        print(f"resuming {out} at stage {st['stage']}")
        return None, st["stage"], st["best_val"], read_json(out / "schedule.json")["stages"][:st["stage"]]
    if cfg.start == "anchor":
        a = read_json(Path(cfg.anchor_dir) / "manifest.json")
        student.load_state_dict(load_checkpoint(Path(cfg.anchor_dir) / a["checkpoints"][a["best"]]["file"], device)[0].state_dict())
    return None, 0, -1.0, []


def test_students(out, test, tok, device, ctx):
    """The best-on-validation and the final student on test: records and summaries. Exact
    match as on validation, from one forward pass (data.evaluate: it equals greedy decoding)."""
    results = {}
    for name in ("best", "final"):
        model, _ = load_checkpoint(out / f"{name}.pt", device)
        summary, records = data.evaluate(model, test, tok, device, ctx=ctx)
        atomic_save(records, out / f"test_records_{name}.jsonl")
        results[name] = {k: round(v, 4) for k, v in summary.items()}
        print(f"{name} student on test: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    results["best_stage"] = torch.load(out / "best.pt", weights_only=True)["stage"]
    return results


def main(cfg):
    t_start = time.time()
    device, dtype, ctx, scaler, rank, world = setup_device(cfg.device, cfg.dtype)
    splits, tok, student, enc = prepare(cfg.data, cfg.preset, cfg.seed, cfg.init_from)
    train_enc = enc["train"]
    if len(train_enc) < cfg.batch_size:
        raise RunError(f"--batch_size {cfg.batch_size} is larger than the {len(train_enc)} training examples")
    lengths = [len(p) + len(a) for p, a in train_enc]
    fps = fingerprints(splits)
    tdir, pool, best, t_star = teacher_pool(cfg, student, tok)
    student.grad_checkpointing = cfg.grad_ckpt
    memory_plan(student, t_star if cfg.method != "sft" else None, cfg.batch_size // world, max(lengths),
                max(len(a) for _, a in train_enc) + 1, dtype, cfg.grad_ckpt, device)
    del t_star
    student.to(device)
    anchor = sft_anchor(cfg, fps["train"], len(train_enc), device)

    out = out_folder(cfg.out_dir)
    config = {k: v for k, v in dict(asdict(cfg), stop_at_stage=0, fingerprint=fps).items() if k != "out_dir"}
    done, stage, best_val, schedule = resume(cfg, out, config, student, device)
    if done is not None:
        return done

    # the probe, and --probe_resamples others drawn with other seeds (does the choice survive another draw?):
    t_sched = time.time()  # every candidate's log-probs on each are fixed, so they are read (or made) once
    probes = [probe_cache(cfg, tdir, pool, train_enc, cfg.seed + 1000 * r, tok, device, ctx, fps["train"])
              for r in range(1 + cfg.probe_resamples) if cfg.method == "scd"]
    t_sched, t_eval = time.time() - t_sched, 0.0

    atomic_save(dict(config, out_dir=str(out)), out / "config.json")
    log = open(out / "log.txt" if rank == 0 else os.devnull, "a")
    net = DDP(student) if world > 1 else student
    net = torch.compile(net) if cfg.compile else net
    total = cfg.stages * cfg.steps_per_stage
    t0, start_step, tokens, skipped = time.time(), stage * cfg.steps_per_stage, 0, 0
    teacher = rows = loaded = None

    # ------------------------------------------------------------------ the stages
    for stage in range(stage, cfg.stages):
        # 1. choose this stage's teacher checkpoint c_k; one teacher in memory, its logits kept while the choice stays
        t = time.time()
        k, row = choose(cfg, stage, schedule, student, probes, best, tok, device, ctx, world)
        t_sched += time.time() - t
        if k is not None:
            if pool[k]["file"] != loaded:
                teacher = rows = None
                teacher, _ = load_checkpoint(tdir / pool[k]["file"], device)
                if device.startswith("cuda") and dtype != "float32":  # frozen: half the memory in the autocast dtype
                    teacher.to(ctx.fast_dtype)
                rows, loaded = teacher_logits(teacher, train_enc, tok.eot, device, ctx, cfg.teacher_cache_gib), pool[k]["file"]
            row.update(ckpt=k, file=pool[k]["file"], teacher_step=pool[k]["step"])
        print(f"stage {stage}: teacher {row.get('file', 'none (sft)')}")

        # 2. T steps from a fresh optimizer and a restarted LR schedule
        optimizer = student.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, 0.95), device.split(":")[0])
        student.train()
        for i in range(cfg.steps_per_stage):
            step = stage * cfg.steps_per_stage + i
            idx = shard(data.batch_indices(lengths, cfg.batch_size, cfg.seed, step), rank, world)
            x, y, mask = data.make_batch(train_enc, idx, tok.eot, device)
            for grp in optimizer.param_groups:
                grp["lr"] = lr_at(i, cfg.steps_per_stage, cfg.lr, cfg.warmup_frac)
            with ctx:
                s_logits = net(x, positions=mask)
                t_out = None
                if k is not None:
                    with torch.no_grad():
                        t_out = torch.cat([rows[j] for j in idx]) if rows else teacher(x, positions=mask)
                loss, terms = scd.distill_loss(s_logits, t_out, y, mask, cfg.alpha, None if anchor is None else anchor[idx],
                                               cfg.kl_direction, cfg.temperature)
            where = f"step {step + 1} (stage {stage})"
            check_finite(where, **terms, loss=loss)
            skipped += optimizer_step(student, optimizer, scaler, loss, cfg.grad_clip, where)
            tokens += x.numel() * world
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:  # a learning-curve point, on validation
                row.setdefault("curve", []).append([step + 1, data.evaluate(student, splits["val"], tok, device, ctx=ctx)[0]["acc"]])
            if (step + 1) % cfg.log_every == 0:  # the global batch's means
                ce_, kl_, w_ = (global_mean(terms[n].detach().mean(), world).item() for n in ("ce", "kl", "w"))
                msg = f"ce {ce_:.4f} | kl {kl_:.4f} | w {w_:.3f} | lr {grp['lr']:.2e} | ckpt {row.get('ckpt', '-')}"
                line = progress(step + 1, total, t0, start_step, tokens, msg + (f" | fp16 skipped {skipped}" if scaler else ""))
                print(line, flush=True)
                log.write(line + "\n")

        # 3. validate; keep the best student and the stage's state
        t = time.time()
        summary, _ = data.evaluate(student, splits["val"], tok, device, ctx=ctx)
        t_eval += time.time() - t
        row.update(val_loss=round(summary["loss"], 5), val_acc=round(summary["acc"], 4))
        schedule.append(row)
        if summary["acc"] >= best_val:  # best-on-validation accuracy; ties go to the later stage
            best_val = summary["acc"]
            atomic_save(dict(model=student.state_dict(), model_config=asdict(student.config), vocab=tok.ids, stage=stage),
                        out / "best.pt")
        atomic_save(dict(stages=schedule, pool=[c["file"] for c in pool], best=best), out / "schedule.json")
        atomic_save(dict(model=student.state_dict(), stage=stage + 1, best_val=best_val), out / "state.pt")
        print(f"stage {stage} done: val loss {summary['loss']:.4f}, val acc {summary['acc']:.3f}")
        if stage + 1 == cfg.stop_at_stage:
            print(f"stopping after stage {stage} as asked (--stop_at_stage); rerun to resume")
            return None
    atomic_save(dict(model=student.state_dict(), model_config=asdict(student.config), vocab=tok.ids, stage=cfg.stages - 1),
                out / "final.pt")
    log.close()
    if scaler:
        print(f"fp16: the gradient scaler skipped {skipped} steps of this sitting (overflow)")
    if rank > 0:  # the test pass is rank 0's
        return None

    t = time.time()
    results = test_students(out, splits["test"], tok, device, ctx)
    wall, t_eval = time.time() - t_start, t_eval + time.time() - t
    results.update(wall_s=round(wall, 1), schedule_s=round(t_sched, 1), eval_s=round(t_eval, 1),
                   val_acc=[r["val_acc"] for r in schedule])
    atomic_save(results, out / "results.json")
    print("schedule: " + " -> ".join(str(r.get("ckpt", "-")) for r in schedule) + f" in a pool of {len(pool)} (T* = {best}); "
          "teacher steps " + " -> ".join(str(r.get("teacher_step", "-")) for r in schedule))
    print(f"choosing checkpoints took {t_sched:.1f}s of {wall:.0f}s ({100 * t_sched / wall:.1f}%), "
          f"evaluation {t_eval:.1f}s ({100 * t_eval / wall:.1f}%)")
    return results


if __name__ == "__main__":
    run_main(main, parse_config(DistillConfig, "Staged distillation from a teacher's dense checkpoints (SFT, KD, CD, SCD; optional AW)."))
