"""
Scheduled Checkpoint Distillation (METHOD.md sections 2.3 to 2.5, and the baselines of
section 3): the student is trained in K stages of T steps; stage k distils from one teacher
checkpoint c_k, chosen by the method's policy, with a fresh optimizer and a restarted LR.

    python distill.py --method scd --aw true --out_dir runs/scd_aw   # SCD+AW, the main command's recipe (CPU)
    python distill.py --method kd --out_dir runs/kd                  # plain distillation from T*
    python distill.py --init_from models/Llama-3.2-1B --teacher_dir runs/llama3b --anchor_dir runs/llama1b_sft \
        --data my_domain/ --lr 1e-5 --aw true --grad_ckpt true     # SCD+AW on one GPU, bf16

Reads a teacher run (train_teacher.py) and the SFT student's run (AW's anchor l_S). Writes
schedule.json (c_k and, for SCD, both terms of every candidate), best.pt and final.pt with test
records, results.json, log.txt, and state.pt per stage (rerun to resume). scale.py keeps what
only scale needs; amp_step below is the step both scripts take, with fp16's GradScaler.
"""
import time
from dataclasses import dataclass, replace
from pathlib import Path

import data
import scale
import scd
from model import PRESETS
from plumbing import (Logger, arg, atomic_save, check_finite, check_pool, checkpoint_dict, evaluate_students, lr_at,
                      parse_config, prepare, resume_stages, run_main, setup_device, sft_anchor, shard, teacher_manifest,
                      trained_state)


@dataclass
class DistillConfig(scale.TeacherSignalConfig):  # and the system flags, in scale.py
    # data, and the two runs this one reads
    data: str = arg("default", "the teacher's data: 'default' (the committed data/default/) or a folder")
    teacher_dir: str = arg("runs/teacher", "the teacher run: manifest.json and its checkpoints")
    anchor_dir: str = arg("runs/student_sft", "the SFT student run: its train_losses.json is l_S, its config the init")
    preset: str = arg("student", "student model preset", choices=tuple(PRESETS))
    init_from: str = arg("auto", "auto (the base on the default domain, else ''), '' (random), base, a .pt, a folder")
    start: str = arg("init", "init: the SFT student's initialisation; anchor: its trained weights",
                     choices=("init", "anchor"))
    # the method: the schedule (section 2.3) and the loss (section 2.4)
    method: str = arg("scd", "schedule: sft (no teacher), kd (T*), cd (a fixed walk), scd (adaptive), given (by hand)",
                      choices=("sft", "kd", "cd", "scd", "given"))
    given_steps: str = arg("", "--method given: each stage's teacher checkpoint by its step, comma-separated")
    aw: bool = arg(False, "Adaptive Weighting instead of the fixed alpha")
    alpha: float = arg(1.0, "fixed KL weight w when AW is off (1.0 chosen on KD's validation accuracy)", low=0)
    stages: int = arg(4, "K, the number of stages", low=1)
    steps_per_stage: int = arg(0, "T, steps per stage (0: 12 epochs over the K stages, the SFT student's)", low=0)
    pool_start: float = arg(0.5, "candidates: the checkpoints from this fraction of the way to T*, up to T*", low=0)
    student_term: str = arg("flipped", "the student term: flipped KL(p_c || p_s), as_written KL(p_s || p_c)",
                            choices=("flipped", "as_written"))
    monotone: bool = arg(False, "never choose a checkpoint earlier than the previous stage's")
    schedule_weight: float = arg(1.0, "lambda: the weight of KL(T* || c) in the choice (1: the paper's sum)", low=0)
    last_at_best: bool = arg(False, "SCD's last stage distils from T* itself, not from the argmin's choice")
    probe_size: int = arg(256, "probe examples (a seeded subset of train) for choosing checkpoints", low=1)
    probe_topk: int = arg(64, "log-probs kept per probe token (the rest as one tail mass)", low=1)
    probe_resamples: int = arg(3, "SCD: also choose on this many probes of other seeds, and log those choices", low=0)
    kl_direction: str = arg("forward", "distillation KL: forward KL(p_c || p_student) or reverse",
                            choices=("forward", "reverse"))
    temperature: float = arg(1.0, "softmax temperature of the distillation KL", low=1e-3)
    # optimisation: the main command's recipe on the default domain
    batch_size: int = arg(16, "examples per step (the global batch under torchrun)", low=1)
    lr: float = arg(3e-3, "peak learning rate of each stage (3e-3: chosen on KD's validation accuracy)", low=0)
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices", low=0)
    warmup_frac: float = arg(0.1, "warm-up share of each stage; the cosine restarts every stage", low=0)
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)", low=0)
    # the run
    out_dir: str = arg("runs/scd_aw", "output folder; rerunning the same command resumes it")
    seed: int = arg(0, "seed of the student init, the data order and the probe")
    log_every: int = arg(40, "steps between progress lines", low=1)
    eval_every: int = arg(0, "steps between a learning curve's validation points, in schedule.json (0: none)", low=0)
    stop_at_stage: int = arg(0, "for the tests: stop after this many stages as if interrupted (0: off)", low=0)

    def __post_init__(self):  # a default that depends on the data, resolved once and said
        if self.init_from == "auto":
            self.init_from = "base" if self.data == "default" else ""


# -----------------------------------------------------------------------------

def main(cfg, splits=None):
    """K stages: choose c_k, restart the optimizer and LR, distil for T steps, validate, keep
    the best. splits: the domain already loaded (the lab's generated ones); default: --data."""
    t_start = time.time()
    device, dtype, ctx, scaler, rank, world = setup_device(cfg.device, cfg.dtype, cfg.dist_timeout)
    splits, tok, student, enc = prepare(cfg.data, cfg.preset, seed=cfg.seed, init_from=cfg.init_from, splits=splits,
                                        lora=(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout))
    train_enc, val = enc["train"], splits["val"]
    if not cfg.steps_per_stage:  # the students' budget: 12 epochs, the SFT student's default
        cfg = replace(cfg, steps_per_stage=12 * (len(train_enc) // cfg.batch_size) // cfg.stages)
    print(f"{cfg.method}{'+aw' if cfg.aw else ''} student from {cfg.init_from or 'random init'} (--init_from): "
          f"{cfg.stages} stages of {cfg.steps_per_stage} steps (--stages, --steps_per_stage) at lr {cfg.lr:g}")
    tdir, pool, t_star = teacher_pool(cfg)  # the candidates c; T* is the last of them
    # before the first step: T* checked against the student, the memory plan printed (a run that cannot fit is
    # refused), activation checkpointing set, an adapter's base cast, the student on its device, the folder locked
    out = scale.start(cfg, student, tok, teacher_file=tdir / pool[t_star]["file"], train_enc=train_enc, device=device,
                      dtype=dtype, world=world, teaches=cfg.method != "sft",
                      candidates=len(pool) if cfg.method == "scd" else 0)  # their stored log-probs: in the plan
    train_fp = data.fingerprint(splits["train"])  # ties the anchor and the stored probe to this training set
    anchor = sft_anchor(cfg, train_fp, n_train=len(train_enc), student=student, device=device)  # section 2.2: l_S
    done, stage, best_val, schedule = resume_stages(out, cfg, DistillConfig, splits=splits, student=student)  # or fresh
    if done is not None:  # a finished run: its results
        return done
    t0 = time.time()  # the probe, and --probe_resamples others drawn with other seeds (does the choice survive?)
    probes = [scale.stored_probe(tdir, pool, train_enc, train_fp, size=cfg.probe_size, seed=s, topk=cfg.probe_topk,
                                 eot=tok.eot, device=device, ctx=ctx, chunk=cfg.logit_chunk)
              for s in data.probe_seeds(cfg.seed, cfg.probe_resamples, size=cfg.probe_size, n_train=len(train_enc))
              if cfg.method == "scd"]
    t_choose, t_eval, skipped = time.time() - t0, 0.0, 0  # seconds choosing and evaluating; fp16's skipped steps
    teacher = scale.StageTeacher(tdir, train_enc, tok.eot, device=device, dtype=dtype, ctx=ctx,
                                 cache_gib=cfg.teacher_cache_gib, topk=cfg.teacher_topk, chunk=cfg.logit_chunk)
    lengths = [len(p) + len(a) for p, a in train_enc]  # for the batch order
    chunk = data.logit_chunk(student.config.vocab_size, cfg.logit_chunk)  # answer positions per piece of the head
    net = scale.wrap(student, cfg, world=world, dtype=dtype)  # DDP or FSDP2 under torchrun; compiled with --compile
    log = Logger(out, rank, total=cfg.stages * cfg.steps_per_stage, start_step=stage * cfg.steps_per_stage,
                 log_every=cfg.log_every)

    for stage in range(stage, cfg.stages):
        # 1. section 2.3: this stage's checkpoint c_k, as c, its index in the pool (None for SFT)
        t0 = time.time()
        c, row = choose(cfg, stage, schedule, student, probes=probes, pool=pool, eot=tok.eot, device=device, ctx=ctx,
                        world=world)
        t_choose += time.time() - t0
        if c is not None:
            teacher.use(pool[c]["file"])  # one teacher in memory: the last stage's goes first
            row.update(ckpt=c, file=pool[c]["file"], teacher_step=pool[c]["step"])
        print(f"stage {stage}: teacher {row.get('file', 'none (sft)')}")

        # 2. T steps from a fresh optimizer, the LR's warm-up and cosine restarted
        optimizer = student.configure_optimizer(cfg.lr, cfg.weight_decay, (0.9, 0.95), device.split(":")[0])
        student.train()
        for i in range(cfg.steps_per_stage):
            step = stage * cfg.steps_per_stage + i
            idx = shard(data.batch_indices(lengths, cfg.batch_size, cfg.seed, step), rank, world)
            x, y, mask = data.make_batch(train_enc, idx, tok.eot, device)
            for grp in optimizer.param_groups:
                grp["lr"] = lr_at(i, cfg.steps_per_stage, cfg.lr, cfg.warmup_frac)
            with ctx:  # autocast: matmuls in bf16/fp16 on CUDA, the losses in float32 (scd.py casts)
                s_logits = net(x, positions=mask)  # logits at the answer positions only
                t_logits = teacher.logits(idx, x, mask) if c is not None else None
                # section 2.4: L_i = w_i KL(p_{c_k} || p_student) + (1 - w_i) CE(y_i; p_student), with
                # w_i = l_S(x_i) / (l_S(x_i) + l_{c_k}(x_i)) under AW, else the fixed alpha
                loss, parts = scd.distill_loss(s_logits, t_logits, y, mask, alpha=cfg.alpha,
                                               anchor_loss=None if anchor is None else anchor[idx],
                                               direction=cfg.kl_direction, temperature=cfg.temperature, chunk=chunk)
            where = f"step {step + 1} (stage {stage})"
            check_finite(where, **parts, loss=loss)  # a NaN stops the run here, before anything is saved
            skipped += amp_step(loss, optimizer, scaler, student, clip=cfg.grad_clip, where=where)  # fp16: GradScaler
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:  # a learning-curve point, on validation
                point = data.evaluate(student, val, tok, device, ctx=ctx, chunk=chunk)[0]["acc"]
                row.setdefault("curve", []).append([step + 1, point])
            # the progress line: the global batch's mean CE, KL and w, the LR, c_k, ms/step, tokens/s, ETA
            log.step(step + 1, x.numel() * world, dict(ce=parts["ce"], kl=parts["kl"], w=parts["w"], lr=grp["lr"],
                                                       ckpt=row.get("ckpt", "-")),
                     skipped if scaler else None, world=world)
        optimizer = None  # AdamW's state goes before the next stage's teacher is built

        # 3. section 2.5: validate; the best student on validation is kept (ties: the later stage)
        t0 = time.time()
        summary, _ = data.evaluate(student, val, tok, device, ctx=ctx, chunk=chunk)
        t_eval += time.time() - t0
        row.update(val_loss=round(summary["loss"], 5), val_acc=round(summary["acc"], 4))
        schedule.append(row)
        if summary["acc"] >= best_val:
            best_val = summary["acc"]
            atomic_save(checkpoint_dict(student, tok, stage=stage), out / "best.pt")
        atomic_save(dict(stages=schedule, pool=[p["file"] for p in pool], best=t_star), out / "schedule.json")
        atomic_save(dict(model=trained_state(student), stage=stage + 1, best_val=best_val), out / "state.pt")
        print(f"stage {stage} done: val loss {summary['loss']:.4f}, val acc {summary['acc']:.3f}")
        if stage + 1 == cfg.stop_at_stage:
            print(f"stopping after stage {stage} as asked (--stop_at_stage); rerun to resume")
            return None

    atomic_save(checkpoint_dict(student, tok, stage=cfg.stages - 1), out / "final.pt")
    log.close(skipped if scaler else None)
    if rank > 0:  # the test pass is rank 0's
        return None
    teacher.release()  # the last teacher goes before the saved students are read back
    t0 = time.time()  # section 2.5: the best and the final student, on test
    results = evaluate_students(out, splits["test"], tok, device, ctx=ctx, chunk=chunk,
                                into=student if world == 1 else None)
    wall, t_eval = time.time() - t_start, t_eval + time.time() - t0
    results.update(wall_s=round(wall, 1), schedule_s=round(t_choose, 1), eval_s=round(t_eval, 1),
                   val_acc=[r["val_acc"] for r in schedule])
    atomic_save(results, out / "results.json")
    print(f"schedule: {' -> '.join(str(r.get('ckpt', '-')) for r in schedule)}, pool of {len(pool)} (T* = {t_star}); "
          f"choosing took {t_choose:.1f}s of {wall:.0f}s ({100 * t_choose / wall:.1f}%), evaluation {t_eval:.1f}s")
    return results


def amp_step(loss, optimizer, scaler, model, clip, where):
    """Backward and the AdamW step, written once for both scripts (train_teacher.py calls it too).
    With fp16 the GradScaler multiplies the loss so that small gradients survive in fp16, unscales
    them before clipping, and skips a step whose gradients overflowed (halving its scale): that is
    its job, so such a step is counted (-> 1), not an error. bf16 and float32 need no scaler, and
    there a non-finite gradient norm stops the run. -> 1 if the scaler skipped the step, else 0."""
    (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        scaler.unscale_(optimizer)  # the clip below sees the true gradients
    norm = scale.clip_grads(model, clip)
    skipped = 0
    if scaler:
        before = scaler.get_scale()
        scaler.step(optimizer)  # skipped if a gradient is inf or NaN
        scaler.update()
        skipped = int(scaler.get_scale() < before)
    else:
        check_finite(where, grad_norm=norm)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return skipped


# -----------------------------------------------------------------------------
# the schedule (section 2.3)

def choose(cfg, stage, schedule, student, probes, pool, eot, device, ctx, world):
    """Stage k's checkpoint c_k as its index c in the pool (None: SFT), and the schedule row that logs
    it: for SCD both terms of every candidate and the resampled probes' choices (logged, never used).
    SCD: scd.scd_checkpoint on the probe; KD: T*; CD: a fixed walk from the first candidate; given: by hand."""
    row, c, t_star = dict(stage=stage), None, len(pool) - 1  # T* is the pool's last candidate
    if cfg.method == "scd":
        prev = schedule[-1]["ckpt"] if schedule else None  # --monotone's floor: the previous stage's choice
        picks = []
        for probe, cache in probes:  # argmin_c lambda KL(p_T* || p_c) + KL(p_c || p_student), the student as it is now
            pieces = scale.probe_pieces(student.eval(), probe, cache, best=t_star, eot=eot, device=device, ctx=ctx,
                                        chunk=cfg.logit_chunk)
            picks.append(scd.scd_checkpoint(pieces, cfg.student_term, weight=cfg.schedule_weight, prev=prev,
                                            monotone=cfg.monotone))
        c, kl_best, kl_student = picks[0]  # the run's probe; the resampled probes' choices are only logged
        c = t_star if cfg.last_at_best and stage == cfg.stages - 1 else c  # --last_at_best: end at T*
        row.update(kl_best=kl_best, kl_student=kl_student, resampled=[p[0] for p in picks[1:]])
    elif cfg.method == "given":  # a schedule by hand, its steps checked against the pool at the start (check_pool)
        c = [p["step"] for p in pool].index(int(cfg.given_steps.split(",")[stage]))
    elif cfg.method != "sft":
        c = scd.fixed_checkpoint(cfg.method, stage, cfg.stages, t_star)
    return scale.from_rank0(c, world), row  # every process computed the same choice; rank 0's is used


def teacher_pool(cfg):
    """The candidates: the teacher's path to T* (the lowest validation loss, from the teacher's
    manifest), from --pool_start of the way there up to T* itself, which is always the last
    candidate; checkpoints after T*, where the teacher got worse, are not on the path the
    student follows. -> (teacher folder, pool, T*'s place in it)."""
    tdir, manifest = Path(cfg.teacher_dir), teacher_manifest(cfg.teacher_dir, cfg.pool_start)
    ckpts, t_star = manifest["checkpoints"], manifest["checkpoints"][manifest["best"]]
    pool = [c for c in ckpts if cfg.pool_start * t_star["step"] <= c["step"] <= t_star["step"]]
    return tdir, check_pool(tdir, pool, cfg), len(pool) - 1  # one candidate: CD and SCD are KD, and it says so


if __name__ == "__main__":
    run_main(main, parse_config(DistillConfig, "Staged distillation from a teacher's dense checkpoints."))
