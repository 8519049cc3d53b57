"""
Scheduled Checkpoint Distillation (METHOD.md sections 2.3 to 2.5, and the baselines of
section 3): the student is trained in K stages of T steps; stage k distils from one teacher
checkpoint c_k, chosen by the method's policy, with a fresh optimizer and a restarted LR.

    python distill.py --method scd --aw true --out_dir runs/scd_aw   # SCD+AW, the main command's recipe (CPU)
    python distill.py --method kd --out_dir runs/kd                  # plain distillation from T*
    python distill.py --init_from models/Llama-3.2-1B --teacher_dir runs/llama3b --anchor_dir runs/llama1b_sft \
        --data my_domain/ --lr 1e-5 --aw true --grad_ckpt true     # SCD+AW on one GPU, bf16

Reads a teacher run (train_teacher.py) and the SFT student's run (its train_losses.json is AW's
anchor l_S). Writes schedule.json (c_k and, for SCD, both terms of every candidate), best.pt and
final.pt with test records, results.json, log.txt, and state.pt per stage (rerun to resume).
scale.py keeps what only scale needs (the teacher's signal cached, offline or in half precision).
"""
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import data
import scale
import scd
from model import PRESETS, merge_lora
from plumbing import (Logger, RunError, arg, atomic_save, check_finite, check_pool, check_same_start, checkpoint_dict,
                      evaluate_students, load_checkpoint, lr_at, parse_config, prepare, read_json, resume_stages, run_main,
                      setup_device, shard, teacher_manifest, trained_state)


@dataclass
class DistillConfig(scale.TeacherSignalConfig):  # and the system flags, in scale.py
    # data, and the two runs this one reads
    data: str = arg("default", "the teacher's data: 'default' (the committed data/default/) or a folder")
    teacher_dir: str = arg("runs/teacher", "the teacher run: manifest.json and its checkpoints")
    anchor_dir: str = arg("runs/student_sft", "the SFT student run: its train_losses.json is l_S (AW), its config the init")
    preset: str = arg("student", "student model preset", choices=tuple(PRESETS))
    init_from: str = arg("auto", "auto (the student base on the default domain, else ''), '' (random init), base, a .pt, a folder")
    start: str = arg("init", "init: the SFT student's initialisation; anchor: its trained weights", choices=("init", "anchor"))
    # the method: the schedule (section 2.3) and the loss (section 2.4)
    method: str = arg("scd", "schedule: sft (no teacher), kd (T*), cd (a fixed walk), scd (adaptive), given (--given_steps)",
                      choices=("sft", "kd", "cd", "scd", "given"))
    given_steps: str = arg("", "--method given: each stage's teacher checkpoint by its step, comma-separated")
    aw: bool = arg(False, "Adaptive Weighting instead of the fixed alpha")
    alpha: float = arg(1.0, "fixed KL weight w when AW is off (1.0 chosen on KD's validation accuracy)", low=0)
    stages: int = arg(4, "K, the number of stages", low=1)
    steps_per_stage: int = arg(0, "T, steps per stage (0: the SFT student's 12 epochs over the K stages)", low=0)
    pool_start: float = arg(0.5, "candidates: checkpoints from this fraction of the way to T* up to T* (chosen on validation)", low=0)
    student_term: str = arg("flipped", "the student term: flipped KL(p_c || p_s), as_written KL(p_s || p_c)", choices=("flipped", "as_written"))
    monotone: bool = arg(False, "never choose a checkpoint earlier than the previous stage's")
    schedule_weight: float = arg(1.0, "weight of KL(T* || c) against the student term in the choice (1: the paper's sum)", low=0)
    last_at_best: bool = arg(False, "SCD's last stage distils from T* itself, not from the argmin's choice")
    probe_size: int = arg(256, "probe examples (a seeded subset of train) for choosing checkpoints", low=1)
    probe_topk: int = arg(64, "log-probs kept per probe token (the rest as one tail mass)", low=1)
    probe_resamples: int = arg(3, "SCD: also choose on this many probes drawn with other seeds, and log those choices", low=0)
    kl_direction: str = arg("forward", "distillation KL: forward KL(p_c || p_student) or reverse", choices=("forward", "reverse"))
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
    eval_every: int = arg(0, "steps between validation-accuracy points of a learning curve in schedule.json (0: none)", low=0)
    stop_at_stage: int = arg(0, "for the tests: stop after this many stages as if interrupted (0: off)", low=0)

    def __post_init__(self):  # a default that depends on the data, resolved once and said
        if self.init_from == "auto":
            self.init_from = "base" if self.data == "default" else ""


# -----------------------------------------------------------------------------

def main(cfg, splits=None):
    """K stages: choose c_k, restart the optimizer and LR, distil for T steps, validate, keep
    the best. splits: the domain already loaded (the lab's generated ones); default: --data."""
    t_start = time.time()
    device, dtype, ctx, scaler, rank, world = setup_device(cfg.device, cfg.dtype)
    splits, tok, student, enc = prepare(cfg.data, cfg.preset, cfg.seed, cfg.init_from, splits,
                                        (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout))
    train_enc, val = enc["train"], splits["val"]
    if not cfg.steps_per_stage:  # the students' budget: as many steps as the SFT student's 12 epochs
        cfg = replace(cfg, steps_per_stage=12 * (len(train_enc) // cfg.batch_size) // cfg.stages)
    print(f"{cfg.method}{'+aw' if cfg.aw else ''} student from {cfg.init_from or 'random init'} (--init_from): "
          f"{cfg.stages} stages of {cfg.steps_per_stage} steps (--stages, --steps_per_stage) at lr {cfg.lr:g}")
    tdir, pool, best = teacher_pool(cfg)  # the candidates c, and T*'s place among them
    out = scale.start(cfg, student, tok, tdir / pool[best]["file"], train_enc, device, dtype, world,
                      teaches=cfg.method != "sft")  # T* checked against the student, the memory plan printed, folder locked
    train_fp = data.fingerprint(splits["train"])  # ties the anchor and the stored probe to this training set
    anchor = sft_anchor(cfg, train_fp, len(train_enc), student, device)  # section 2.2: l_S(x) for AW
    done, stage, best_val, schedule = resume_stages(out, cfg, DistillConfig, splits, student)  # or a fresh run
    if done is not None:
        return done
    t_sched = time.time()  # the probe, and --probe_resamples others drawn with other seeds (does the choice survive?)
    probes = [scale.stored_probe(tdir, pool, train_enc, train_fp, cfg.probe_size, cfg.seed + 1000 * r, cfg.probe_topk,
                                 tok.eot, device, ctx, cfg.logit_chunk) for r in range(1 + cfg.probe_resamples) if cfg.method == "scd"]
    t_sched, t_eval, skipped = time.time() - t_sched, 0.0, 0
    teacher = scale.StageTeacher(tdir, train_enc, tok.eot, device, dtype, ctx, cfg.teacher_cache_gib, cfg.teacher_topk,
                                 cfg.logit_chunk)
    lengths, chunk = [len(p) + len(a) for p, a in train_enc], data.logit_chunk(student.config.vocab_size, cfg.logit_chunk)
    net, log = scale.wrap(student, cfg, world, dtype), Logger(out, rank, cfg.stages * cfg.steps_per_stage,
                                                                         stage * cfg.steps_per_stage, cfg.log_every)

    for stage in range(stage, cfg.stages):
        # 1. section 2.3: this stage's checkpoint c_k (an index into the pool; None for SFT)
        t = time.time()
        k, row = choose(cfg, stage, schedule, student, probes, pool, tok, device, ctx, world)
        t_sched += time.time() - t
        if k is not None:
            teacher.use(pool[k]["file"])  # one teacher in memory: the last stage's goes first
            row.update(ckpt=k, file=pool[k]["file"], teacher_step=pool[k]["step"])
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
                t_logits = teacher.logits(idx, x, mask) if k is not None else None
                # section 2.4: L_i = w_i KL(p_{c_k} || p_student) + (1 - w_i) CE(y_i; p_student), with
                # w_i = l_S(x_i) / (l_S(x_i) + l_{c_k}(x_i)) under AW, else the fixed alpha
                loss, terms = scd.distill_loss(s_logits, t_logits, y, mask, cfg.alpha, None if anchor is None else anchor[idx],
                                               cfg.kl_direction, cfg.temperature, chunk)
            where = f"step {step + 1} (stage {stage})"
            check_finite(where, **terms, loss=loss)  # a NaN stops the run here, before anything is saved
            # backward and the AdamW step. With fp16 the GradScaler multiplies the loss so that small
            # gradients survive in fp16, unscales them before clipping, and skips a step whose gradients
            # overflowed (halving its scale): that is its job, so such steps are counted, not errors.
            # bf16 and float32 need no scaler, and there a non-finite gradient norm stops the run.
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(optimizer)
            norm = scale.clip_grads(student, cfg.grad_clip)
            if scaler:
                before = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                skipped += scaler.get_scale() < before
            else:
                check_finite(where, grad_norm=norm)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:  # a learning-curve point, on validation
                row.setdefault("curve", []).append([step + 1, data.evaluate(student, val, tok, device, ctx=ctx, chunk=chunk)[0]["acc"]])
            # the progress line: the global batch's mean CE, KL and w, the LR, c_k, ms/step, tokens/s, ETA
            log.step(step + 1, x.numel() * world, dict(ce=terms["ce"], kl=terms["kl"], w=terms["w"], lr=grp["lr"],
                                                       ckpt=row.get("ckpt", "-")), skipped if scaler else None, world=world)
        optimizer = None  # AdamW's state goes before the next stage's teacher is built

        # 3. section 2.5: validate; the best student on validation is kept (ties: the later stage)
        t = time.time()
        summary, _ = data.evaluate(student, val, tok, device, ctx=ctx, chunk=chunk)
        t_eval += time.time() - t
        row.update(val_loss=round(summary["loss"], 5), val_acc=round(summary["acc"], 4))
        schedule.append(row)
        if summary["acc"] >= best_val:
            best_val = summary["acc"]
            atomic_save(checkpoint_dict(student, tok, stage=stage), out / "best.pt")
        atomic_save(dict(stages=schedule, pool=[c["file"] for c in pool], best=best), out / "schedule.json")
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
    t = time.time()
    results = evaluate_students(out, splits["test"], tok, device, ctx, chunk, student if world == 1 else None)  # section 2.5: best and final, on test
    wall, t_eval = time.time() - t_start, t_eval + time.time() - t
    results.update(wall_s=round(wall, 1), schedule_s=round(t_sched, 1), eval_s=round(t_eval, 1),
                   val_acc=[r["val_acc"] for r in schedule])
    atomic_save(results, out / "results.json")
    print("schedule: " + " -> ".join(str(r.get("ckpt", "-")) for r in schedule) + f" in a pool of {len(pool)} (T* = {best}); "
          f"choosing took {t_sched:.1f}s of {wall:.0f}s ({100 * t_sched / wall:.1f}%), evaluation {t_eval:.1f}s")
    return results


# -----------------------------------------------------------------------------
# the schedule (section 2.3)

def choose(cfg, stage, schedule, student, probes, pool, tok, device, ctx, world):
    """Stage k's teacher checkpoint c_k, an index into the pool (None: SFT), and the schedule row
    that logs it. SCD: c_k = argmin_c KL(p_T* || p_c) + D(p_student, p_c) on the run's probe, with
    both terms for every candidate and the choices the resampled probes would have made (logged,
    never used). KD: T*; CD: a fixed walk from the first candidate to T*; given: --given_steps."""
    row, k, best = dict(stage=stage), None, len(pool) - 1  # T* is the pool's last candidate
    if cfg.method == "scd":
        prev = schedule[-1]["ckpt"] if schedule else None  # --monotone's floor: the previous stage's choice
        picks = []
        for probe, cache in probes:  # c_k = argmin_c lambda KL(p_T* || p_c) + KL(p_c || p_student), the student as it is now
            pieces = scale.probe_pieces(student.eval(), probe, cache, best, tok.eot, device, ctx, chunk=cfg.logit_chunk)
            picks.append(scd.scd_checkpoint(pieces, cfg.student_term, weight=cfg.schedule_weight, prev=prev,
                                            monotone=cfg.monotone))
        k, kl_best, kl_student = picks[0]  # the run's probe; the resampled probes' choices are only logged
        k = best if cfg.last_at_best and stage == cfg.stages - 1 else k  # --last_at_best: end at T*
        row.update(kl_best=kl_best, kl_student=kl_student, resampled=[p[0] for p in picks[1:]])
    elif cfg.method == "given":  # a schedule by hand, its steps checked against the pool at the start (check_pool)
        k = [c["step"] for c in pool].index(int(cfg.given_steps.split(",")[stage]))
    elif cfg.method != "sft":
        k = scd.fixed_checkpoint(cfg.method, stage, cfg.stages, best)
    return scale.from_rank0(k, world), row  # every process computed the same choice; rank 0's is used


def teacher_pool(cfg):
    """The candidates: the teacher's path to T* (the lowest validation loss, from the teacher's
    manifest), from --pool_start of the way there up to T* itself, which is always the last
    candidate; checkpoints after T*, where the teacher got worse, are not on the path the
    student follows. -> (teacher folder, pool, T*'s place in it)."""
    tdir, manifest = Path(cfg.teacher_dir), teacher_manifest(cfg.teacher_dir, cfg.pool_start)
    ckpts, t_star = manifest["checkpoints"], manifest["checkpoints"][manifest["best"]]
    pool = [c for c in ckpts if cfg.pool_start * t_star["step"] <= c["step"] <= t_star["step"]]
    return tdir, check_pool(tdir, pool, cfg), len(pool) - 1  # one candidate: CD and SCD are KD, and it says so


# -----------------------------------------------------------------------------
# the anchor l_S (section 2.2)

def sft_anchor(cfg, train_fp, n_train, student, device):
    """The SFT student run: AW's anchor l_S for this very training set (None without AW),
    after a check that the student starts where the SFT student did; with --start anchor,
    the student takes the SFT student's trained weights (its checkpoint of lowest val loss)."""
    adir, anchor = Path(cfg.anchor_dir), None
    if cfg.aw:
        a = read_json(adir / "train_losses.json")
        if a["fingerprint"] != train_fp or len(a["loss"]) != n_train:
            raise RunError(f"{adir / 'train_losses.json'} was made for other training data (fingerprint {a['fingerprint']})")
        anchor = torch.tensor(a["loss"], device=device)
    if cfg.start == "anchor" or cfg.aw or (adir / "config.json").exists():
        check_same_start(cfg, adir)  # seed, init and preset: "the SFT student's initialisation"
    if cfg.start == "anchor":
        m = read_json(adir / "manifest.json")
        sft = load_checkpoint(adir / m["checkpoints"][m["best"]]["file"])[0]
        student.load_state_dict(merge_lora(sft).state_dict() if not student.lora else sft.state_dict())
    return anchor


if __name__ == "__main__":
    run_main(main, parse_config(DistillConfig, "Staged distillation from a teacher's dense checkpoints (SFT, KD, CD, SCD; optional AW)."))
