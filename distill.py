"""
Scheduled Checkpoint Distillation (METHOD.md sections 2.3 to 2.5, and the baselines of
section 3): the student is trained in K stages of T steps; stage k distils from one teacher
checkpoint c_k, chosen by the method's policy, with a fresh optimizer and a restarted LR.

    python distill.py --method scd --aw true --out_dir runs/scd_aw   # SCD+AW, the main command's recipe
    python distill.py --method kd --out_dir runs/kd                  # plain distillation from T*

Needs a teacher run (train_teacher.py: its checkpoints, manifest and probe log-probs) and,
for AW and the start, the SFT student's run (train_teacher.py --preset student: its
train_losses.json is the anchor l_S). Writes schedule.json (per stage: c_k and, for SCD,
both terms of every candidate), best.pt and final.pt with their test records, results.json,
log.txt, and state.pt after each stage (rerun the same command to resume).
"""
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import data
import scd
from model import PRESETS, merge_lora
from plumbing import (Logger, RunError, arg, atomic_save, check_finite, checkpoint_dict, dist, global_mean, load_checkpoint,
                      logit_chunk, lr_at, optimizer_step, parse_config, prepare, read_json, resume_stages, run_main,
                      setup_device, shard, start, trained_state, wrap)


@dataclass
class DistillConfig:
    # data, and the two runs this one reads
    data: str = arg("default", "the teacher's data: 'default' (the committed data/default/) or a folder")
    teacher_dir: str = arg("runs/teacher", "the teacher run: manifest.json and its checkpoints")
    anchor_dir: str = arg("runs/student_sft", "the SFT student run: its train_losses.json is l_S (AW), its config the init")
    # model
    preset: str = arg("student", "student model preset", choices=tuple(PRESETS))
    init_from: str = arg("auto", "auto (the committed student base on the default domain, else random init), '' (random "
                         "init), base, a .pt checkpoint, a GPT-2 name or a model folder")
    start: str = arg("init", "student start: init (the SFT student's initialisation) or anchor (its trained weights)",
                     choices=("init", "anchor"))
    lora_rank: int = arg(0, "LoRA adapters of this rank on a frozen --init_from: only they train (0: the whole student)", low=0)
    lora_alpha: float = arg(0.0, "the adapters' scale is alpha / rank (0: alpha = 2 x rank)", low=0)
    lora_dropout: float = arg(0.0, "dropout on the adapters' input", low=0)
    # method: the schedule (section 2.3) and the loss (section 2.4)
    method: str = arg("scd", "teacher schedule: sft (no teacher), kd (T* only), cd (fixed order), scd (adaptive)",
                      choices=("sft", "kd", "cd", "scd"))
    aw: bool = arg(False, "Adaptive Weighting instead of the fixed alpha")
    alpha: float = arg(1.0, "fixed KL weight w when AW is off (1.0 chosen on KD's validation accuracy)", low=0)
    stages: int = arg(4, "K, the number of stages", low=1)
    steps_per_stage: int = arg(0, "T, steps per stage (0: the SFT student's 12 epochs over the K stages; 720 on the default domain)",
                               low=0)
    pool_start: float = arg(0.5, "the candidates: the teacher's checkpoints from this fraction of the way to T* up to T* "
                            "(0.5: the k4 protocol's second half, chosen on validation)", low=0)
    student_term: str = arg("flipped", "schedule's student term: flipped KL(p_c || p_student) or as_written KL(p_student || p_c)",
                            choices=("flipped", "as_written"))
    monotone: bool = arg(False, "never choose a checkpoint earlier than the previous stage's")
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
    # system
    out_dir: str = arg("runs/scd_aw", "output folder; rerunning the same command resumes it")
    seed: int = arg(0, "seed of the student init, the data order and the probe")
    device: str = arg("auto", "cpu, cuda, ... (auto: cuda if available)")
    dtype: str = arg("auto", "autocast precision (auto: bf16/fp16 on CUDA, fp32 on CPU)",
                     choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = arg(False, "torch.compile the trained model (CUDA; slow to start, faster per step)")
    grad_ckpt: bool = arg(False, "activation checkpointing: recompute each block in the backward pass (less memory, more time)")
    fsdp: bool = arg(False, "under torchrun, shard the student's weights, gradients and AdamW state (FSDP2), not DDP")
    logit_chunk: int = arg(0, "answer positions per piece of the losses (0: pieces of at most 64 MiB of float32 logits; "
                           "the CPU demo's batches fit in one)", low=0)
    teacher_cache_gib: float = arg(2.0, "keep each stage's teacher logits on the training set if they fit in this many GiB (0: off)", low=0)
    teacher_topk: int = arg(0, "keep the stage teacher's signal offline: its top-k log-probs per answer token and the tail "
                            "mass, computed once per choice, then train with no teacher in memory (0: full logits)", low=0)
    log_every: int = arg(40, "steps between progress lines", low=1)
    eval_every: int = arg(0, "steps between validation-accuracy points of a learning curve in schedule.json (0: none)", low=0)
    # for the tests only
    stop_at_stage: int = arg(0, "stop after this many stages as if interrupted (0: off)", low=0)

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
    tdir, pool, best, t_star = teacher_pool(cfg, student, tok)     # the candidates c, and T*'s place among them
    out = start(cfg, student, t_star if cfg.method != "sft" else None, train_enc, device, dtype, world)  # memory plan, lock
    del t_star
    train_fp = data.fingerprint(splits["train"])  # ties the anchor and the stored probe to this training set
    anchor = sft_anchor(cfg, train_fp, len(train_enc), student, device)  # section 2.2: l_S(x) for AW
    done, stage, best_val, schedule = resume_stages(out, cfg, DistillConfig, splits, student, device)  # or a fresh run
    if done is not None:
        return done
    t_sched = time.time()  # the probe, and --probe_resamples others drawn with other seeds (does the choice survive?)
    probes = [probe_logprobs(cfg, tdir, pool, train_enc, cfg.seed + 1000 * r, train_fp, tok, device, ctx)
              for r in range(1 + cfg.probe_resamples) if cfg.method == "scd"]
    t_sched, t_eval = time.time() - t_sched, 0.0
    teacher = StageTeacher(tdir, train_enc, tok.eot, device, dtype, ctx, cfg.teacher_cache_gib, cfg.teacher_topk)
    lengths, chunk = [len(p) + len(a) for p, a in train_enc], logit_chunk(student.config.vocab_size, cfg.logit_chunk)
    net, log = wrap(student, cfg.compile, world, cfg.fsdp), Logger(out, rank, cfg.stages * cfg.steps_per_stage,
                                                          stage * cfg.steps_per_stage, cfg.log_every)
    skipped = 0

    for stage in range(stage, cfg.stages):
        # 1. section 2.3: this stage's checkpoint c_k (an index into the pool; None for SFT)
        t = time.time()
        k, row = choose(cfg, stage, schedule, student, probes, best, tok, device, ctx, world)
        t_sched += time.time() - t
        if k is not None:
            teacher.use(pool[k]["file"])  # one teacher in memory; its logits kept while the choice stays
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
            with ctx:
                s_logits = net(x, positions=mask)  # logits at the answer positions only
                t_logits = teacher.logits(idx, x, mask) if k is not None else None
                # section 2.4: L_i = w_i KL(p_{c_k} || p_student) + (1 - w_i) CE(y_i; p_student), with
                # w_i = l_S(x_i) / (l_S(x_i) + l_{c_k}(x_i)) under AW, else the fixed alpha
                loss, terms = scd.distill_loss(s_logits, t_logits, y, mask, cfg.alpha, None if anchor is None else anchor[idx],
                                               cfg.kl_direction, cfg.temperature, chunk)
            where = f"step {step + 1} (stage {stage})"
            check_finite(where, **terms, loss=loss)  # a NaN stops the run here, before anything is saved
            skipped += optimizer_step(student, optimizer, scaler, loss, cfg.grad_clip, where)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:  # a learning-curve point, on validation
                row.setdefault("curve", []).append([step + 1, data.evaluate(student, val, tok, device, ctx=ctx)[0]["acc"]])
            ce_, kl_, w_ = ((global_mean(terms[n].detach().mean(), world).item() for n in ("ce", "kl", "w"))
                            if (step + 1) % cfg.log_every == 0 else (0, 0, 0))  # the global batch's means
            log.step(step + 1, x.numel() * world, f"ce {ce_:.4f} | kl {kl_:.4f} | w {w_:.3f} | lr {grp['lr']:.2e} | "
                     f"ckpt {row.get('ckpt', '-')}", skipped if scaler else None)

        # 3. section 2.5: validate; the best student on validation is kept (ties: the later stage)
        t = time.time()
        summary, _ = data.evaluate(student, val, tok, device, ctx=ctx)
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


# -----------------------------------------------------------------------------
# the schedule (section 2.3)

def choose(cfg, stage, schedule, student, probes, best, tok, device, ctx, world):
    """Stage k's teacher checkpoint c_k, an index into the pool (None: SFT), and the
    schedule row that logs it. SCD: c_k = argmin_c KL(p_T* || p_c) + D(p_student, p_c) on the
    run's probe, with both terms for every candidate, and the choices the resampled probes
    would have made (logged, never used). KD: T*; CD: a fixed walk from the first
    candidate to T*."""
    row, k = dict(stage=stage), None
    if cfg.method == "scd":
        V, picks = student.config.vocab_size, []
        prev = schedule[-1]["ckpt"] if schedule else None  # --monotone: never before the previous stage's choice
        for probe, cache in probes:
            s_lp = data.probe_logprobs(student.eval(), probe, tok.eot, device, ctx)  # p_student now, on the probe
            kl_best, kl_student = probe_terms(cache, best, s_lp, V, logit_chunk(V, cfg.logit_chunk), cfg.student_term)
            picks.append((scd.scd_argmin(kl_best, kl_student, prev, cfg.monotone), kl_best, kl_student))
        k, kl_best, kl_student = picks[0]
        row.update(kl_best=kl_best, kl_student=kl_student, resampled=[p[0] for p in picks[1:]])
    elif cfg.method != "sft":
        k = scd.fixed_checkpoint(cfg.method, stage, cfg.stages, best)
    if world > 1:  # every process computed the same choice; rank 0's is the one used
        k = [k]
        dist.broadcast_object_list(k, src=0)
        k = k[0]
    return k, row


def probe_terms(cache, best, s_lp, V, chunk, student_term):
    """Both terms of every candidate (scd.scd_checkpoint), on the probe's tokens `chunk` at a
    time: a candidate's piece is expanded from its top-k (scd.dense_logprobs) only when scored,
    so at a 128k vocabulary no candidate exists whole as (tokens x V). The terms are means over
    the tokens: the pieces' means weighted by their share (one piece on the CPU demo)."""
    n, kl_best, kl_student = s_lp.size(0), 0.0, 0.0
    for r in range(0, n, chunk):
        piece = lambda v, i: scd.dense_logprobs(v[r:r + chunk], i[r:r + chunk], V)
        _, b, s = scd.scd_checkpoint(piece(*cache[best]), (piece(*c) for c in cache), s_lp[r:r + chunk], student_term)
        share = min(chunk, n - r) / n
        kl_best = kl_best + share * torch.tensor(b, dtype=torch.float64)
        kl_student = kl_student + share * torch.tensor(s, dtype=torch.float64)
    return kl_best.tolist(), kl_student.tolist()


def teacher_pool(cfg, student, tok):
    """The candidates: the teacher's path to T* (the lowest validation loss, from the teacher's
    manifest), from --pool_start of the way there up to T* itself, which is always the last
    candidate; checkpoints after T*, where the teacher got worse, are not on the path the
    student follows. -> (teacher folder, pool, T*'s place in it, T*: checked to share the
    student's vocabulary and context, counted in the memory plan)."""
    tdir = Path(cfg.teacher_dir)
    if not (tdir / "manifest.json").exists():
        raise RunError(f"{tdir}: no manifest.json; train a teacher first (python train_teacher.py --out_dir {tdir})")
    manifest = read_json(tdir / "manifest.json")
    ckpts = manifest["checkpoints"]
    if not ckpts:
        raise RunError(f"{tdir}/manifest.json lists no checkpoints")
    if cfg.pool_start > 1:
        raise RunError(f"--pool_start {cfg.pool_start}: a fraction of the way to T*, from 0 to 1")
    t_star = ckpts[manifest["best"]]
    pool = [c for c in ckpts if cfg.pool_start * t_star["step"] <= c["step"] <= t_star["step"]]
    best = len(pool) - 1
    t_model, t_tok = load_checkpoint(tdir / pool[best]["file"])  # on the CPU
    if t_tok.identity != tok.identity:
        raise RunError(f"{tdir} has another tokenizer than the student (vocabulary {t_tok.vocab_size} vs {tok.vocab_size}"
                       + (f", tokenizer.json sha {t_tok.identity[2]} vs {tok.identity[2]})" if t_tok.identity[0] == tok.identity[0]
                          == "tokenizer.json" else ")") + ": distillation compares their distributions token by token")
    if t_model.config.block_size < student.config.block_size:
        raise RunError(f"{tdir} has a shorter context ({t_model.config.block_size}) than the student ({student.config.block_size})")
    return tdir, pool, best, t_model


def probe_logprobs(cfg, tdir, pool, train_enc, probe_seed, train_fp, tok, device, ctx):
    """-> (the probe drawn with probe_seed, each candidate's compressed log-probs on it). The
    teacher run stored them (data.ProbeStore); a file made on another probe is never used:
    they are scored here then, and stored in the teacher's folder for the next run."""
    store = data.ProbeStore(tdir, train_enc, train_fp, cfg.probe_size, probe_seed, cfg.probe_topk)
    steps = [c["step"] for c in pool]
    cache = store.get(steps, device) if store.load() else None
    if cache is None:
        if store.path.exists():
            print(f"note: {store.path} was made on another probe or other checkpoints; computing the probe's log-probs here")
        store.data.update(steps=[], values=[], indices=[])
        model = None  # on an adapter trail each candidate swaps in its adapters only
        for c in pool:
            model = load_checkpoint(tdir / c["file"], device, into=model)[0]
            store.add(c["step"], data.probe_logprobs(model, store.probe, tok.eot, device, ctx))
        try:
            atomic_save(store.data, store.path)
        except OSError as e:
            print(f"note: could not store the probe in {tdir} ({e.strerror}); the next run will compute it again")
        cache = store.get(steps, device)
    return store.probe, cache


# -----------------------------------------------------------------------------
# what a stage reads: the anchor l_S, and the stage's teacher

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
        a = read_json(adir / "config.json")
        for k in ("seed", "init_from") + (("preset",) if cfg.init_from in ("", "base") else ()):  # "the SFT student's initialisation"
            if a.get(k) != getattr(cfg, k):
                raise RunError(f"--{k} {getattr(cfg, k)!r} differs from the SFT student's ({a.get(k)!r} in {adir}): "
                               "the student would not start where the SFT student did")
    if cfg.start == "anchor":
        m = read_json(adir / "manifest.json")
        sft = load_checkpoint(adir / m["checkpoints"][m["best"]]["file"])[0]
        student.load_state_dict(merge_lora(sft).state_dict() if not student.lora else sft.state_dict())
    return anchor


class StageTeacher:
    """The teacher checkpoint c_k of the current stage, frozen (on CUDA in the autocast dtype:
    half the memory), and its logits at every training example's answer positions, computed
    once per choice when they fit in cache_gib (each example is seen many times per stage).
    With topk, the offline signal: each row kept as its top-k log-probs (scd.compress_logprobs),
    expanded per batch, and the teacher itself let go until the next choice."""

    def __init__(self, tdir, train_enc, eot, device, dtype, ctx, cache_gib, topk=0):
        self.tdir, self.enc, self.eot, self.device, self.ctx = tdir, train_enc, eot, device, ctx
        self.cache_gib, self.topk = cache_gib, topk
        self.half = device.startswith("cuda") and dtype != "float32"
        self.file = self.model = self.rows = None

    def use(self, file):
        if file == self.file:
            return
        self.rows = None  # on an adapter trail the base stays and only the adapters are swapped
        self.model, _ = load_checkpoint(self.tdir / file, self.device, into=self.model)
        if self.half:
            self.model.to(self.ctx.fast_dtype)
        self.file, self.rows = file, teacher_logits(self.model, self.enc, self.eot, self.device, self.ctx, self.cache_gib,
                                                    topk=self.topk)
        self.vocab = self.model.config.vocab_size
        if self.topk and self.rows:
            self.model = None  # the signal is offline: no teacher in memory while the student trains

    @torch.no_grad()
    def logits(self, idx, x, mask):
        if self.rows and self.topk:  # log-probs with the tail mass spread evenly: logits of the same distribution
            return torch.cat([scd.dense_logprobs(*self.rows[j], self.vocab) for j in idx])
        return torch.cat([self.rows[j] for j in idx]) if self.rows else self.model(x, positions=mask)


@torch.no_grad()
def teacher_logits(teacher, enc, eot, device, ctx, max_gib, chunk=64, topk=0):
    """The teacher's logits at every training example's answer positions, one tensor per
    example (with topk, its top-k log-probs and their indices), or None if they would take
    more than max_gib."""
    n_tok = sum(len(a) + 1 for _, a in enc)
    if n_tok * (8 * topk if topk else 4 * teacher.config.vocab_size) > max_gib * 2**30:
        return None
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]) + len(enc[i][1]))  # chunks pad little
    chunks = data.answer_logits(teacher, [enc[i] for i in order], eot, device, ctx, chunk)
    rows = [None] * len(enc)
    for i, r in zip(order, (r for lg, _, mask in chunks for r in lg.split(mask.sum(1).tolist()))):
        rows[i] = scd.compress_logprobs(torch.log_softmax(r.float(), -1), topk) if topk else r
    return rows


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


if __name__ == "__main__":
    run_main(main, parse_config(DistillConfig, "Staged distillation from a teacher's dense checkpoints (SFT, KD, CD, SCD; optional AW)."))
