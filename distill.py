"""
Scheduled checkpoint distillation (METHOD.md sections 2.3-2.5 and 3): K stages of T steps;
each stage distils from one teacher checkpoint, chosen by the method's policy.

    python distill.py --method scd --aw true --out_dir runs/scd_aw   # SCD+AW on the CPU default
    python distill.py --method kd --out_dir runs/kd                  # plain distillation from T*

Needs a teacher run (train_teacher.py) and, for AW, the SFT student run whose
train_losses.json holds the anchor l_S. Writes schedule.json (the chosen checkpoint and
both KL terms for every candidate, per stage), best.pt and final.pt, their test records,
log.txt, and state.pt after each stage (rerun the same command to resume). Under torchrun
every process trains on its share of the batch and rank 0 chooses the checkpoints.
"""
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import data
import scd
from train_teacher import (DDP, arg, atomic_save, dist, global_mean, load_checkpoint, lr_at, optimizer_step,
                           parse_config, prepare, progress, resumable, setup_device, shard)


@dataclass
class DistillConfig:
    data: str = arg("default", "'default' or a folder with train/val/test.jsonl (the teacher's data)")
    teacher_dir: str = arg("runs/teacher", "the teacher run: manifest.json and its checkpoints")
    anchor_dir: str = arg("runs/student_sft", "the SFT student run whose train_losses.json is l_S (AW only)")
    out_dir: str = arg("runs/scd_aw", "output folder; rerunning the same command resumes it")
    preset: str = arg("student", "student model preset")
    init_from: str = arg("", "'' (random init of --preset) or pretrained GPT-2 weights: gpt2, gpt2-medium, ...")
    method: str = arg("scd", "teacher schedule: sft (no teacher), kd (T* only), cd (fixed order), scd (adaptive)")
    aw: bool = arg(False, "Adaptive Weighting instead of the fixed alpha")
    alpha: float = arg(0.5, "fixed KL weight w when AW is off")
    stages: int = arg(4, "K, the number of stages")
    steps_per_stage: int = arg(480, "T, steps per stage (K x T = the SFT student's 1,920 steps by default)")
    batch_size: int = arg(16, "examples per step")
    lr: float = arg(3e-3, "peak learning rate of each stage")
    weight_decay: float = arg(0.1, "AdamW weight decay on matrices")
    warmup_frac: float = arg(0.1, "warm-up share of each stage; the cosine restarts every stage")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: off)")
    kl_direction: str = arg("forward", "distillation KL: forward KL(p_c || p_student) or reverse")
    temperature: float = arg(1.0, "softmax temperature of the distillation KL")
    probe_size: int = arg(256, "probe examples (a seeded subset of train) for choosing checkpoints")
    student_term: str = arg("flipped", "schedule's student term: flipped KL(p_c || p_student) or as_written KL(p_student || p_c)")
    pool_start: float = arg(0.0, "candidate pool starts at this fraction of the teacher's training")
    monotone: bool = arg(False, "never choose a checkpoint earlier than the previous stage's")
    start: str = arg("init", "student start: init (the SFT student's initialisation) or anchor (its trained weights)")
    seed: int = arg(0, "seed of the student init, the data order and the probe")
    device: str = arg("auto", "cpu, cuda, ... (auto: cuda if available)")
    dtype: str = arg("auto", "float32, bfloat16 or float16 autocast (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    log_every: int = arg(40, "steps between progress lines")
    compile: bool = arg(False, "torch.compile the trained model (CUDA; slow to start, faster per step)")
    eval_every: int = arg(0, "steps between test-accuracy points of a learning curve in schedule.json (0: none)")
    stop_at_stage: int = arg(0, "stop after this many stages as if interrupted (to test resuming; 0: off)")


def fail(msg):
    raise SystemExit(f"distill.py: {msg}")


@torch.no_grad()
def probe_logprobs(model, enc, eot, device, ctx, chunk=32):
    """Log-probabilities at the probe's answer positions: (N answer tokens, V), float32.
    The probe is sorted by length, so chunks of similar lengths waste little on padding."""
    out = []
    for s in range(0, len(enc), chunk):
        x, y, mask = data.make_batch(enc, range(s, min(s + chunk, len(enc))), eot, device)
        with ctx:
            out.append(torch.log_softmax(model(x, positions=mask).float(), -1))
    return torch.cat(out)


def main(cfg):
    t_start = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype, ctx, scaler, rank, world = setup_device(cfg.device, cfg.dtype)
    splits, tok, student = prepare(cfg.data, cfg.preset, cfg.seed, cfg.init_from)
    student.to(device)
    train_enc = data.encode(splits["train"], tok, student.config.block_size)
    lengths = [len(p) + len(a) for p, a in train_enc]
    fingerprint = data.fingerprint(splits["train"])

    # the teacher's checkpoints: the candidate pool, T*, and a check that the models can talk
    tdir = Path(cfg.teacher_dir)
    if not (tdir / "manifest.json").exists():
        fail(f"{tdir}: no manifest.json; train a teacher first (python train_teacher.py --out_dir {tdir})")
    manifest = json.loads((tdir / "manifest.json").read_text())
    ckpts = manifest["checkpoints"]
    if not ckpts:
        fail(f"{tdir}/manifest.json lists no checkpoints")
    last_step = ckpts[-1]["step"]
    pool = [c for c in ckpts if c["step"] >= cfg.pool_start * last_step]
    best = pool.index(ckpts[manifest["best"]]) if ckpts[manifest["best"]] in pool else fail(
        f"--pool_start {cfg.pool_start} leaves the best checkpoint out of the pool")
    t_model, t_tok = load_checkpoint(tdir / pool[best]["file"], device)
    if t_tok.ids != tok.ids or t_model.config.block_size != student.config.block_size:
        fail(f"{tdir} was trained with another vocabulary or context length than --data {cfg.data} gives the student")
    del t_model  # at most one teacher checkpoint in memory at a time

    # AW's anchor: the SFT student's per-example training loss, for this very training set
    anchor = None
    if cfg.aw:
        path = Path(cfg.anchor_dir) / "train_losses.json"
        if not path.exists():
            fail(f"{path}: missing; AW needs the SFT student's losses (python train_teacher.py --preset student --out_dir {cfg.anchor_dir})")
        a = json.loads(path.read_text())
        if a["fingerprint"] != fingerprint:
            fail(f"{path} was made for other training data (fingerprint {a['fingerprint']})")
        anchor = torch.tensor(a["loss"], device=device)

    config = dict(asdict(cfg), stop_at_stage=0, fingerprint=fingerprint)
    schedule, state_path, stage, best_val = [], out / "state.pt", 0, -1.0
    if resumable(out, config, asdict(DistillConfig())):  # the stage-level state: each stage restarts its optimizer anyway
        st = torch.load(state_path, map_location=device, weights_only=True)
        if st["stage"] == cfg.stages and (out / "results.json").exists():
            print(f"{out} holds this run, finished: nothing to do")
            return json.loads((out / "results.json").read_text())
        student.load_state_dict(st["model"])
        stage, best_val = st["stage"], st["best_val"]
        schedule = json.loads((out / "schedule.json").read_text())["stages"][:stage]
        print(f"resuming {out} at stage {stage}")
    elif cfg.start == "anchor":  # start from the SFT student's weights instead of its initialisation
        a = json.loads((Path(cfg.anchor_dir) / "manifest.json").read_text())
        student.load_state_dict(load_checkpoint(Path(cfg.anchor_dir) / a["checkpoints"][a["best"]]["file"], device)[0].state_dict())

    # the probe: KL(p_T* || p_c) is fixed, so each checkpoint's probe log-probs are computed
    # once and kept (memory: pool x probe answer tokens x vocab x 4 bytes)
    t_sched = time.time()
    g = torch.Generator().manual_seed(cfg.seed)
    probe = sorted((train_enc[i] for i in torch.randperm(len(train_enc), generator=g)[:cfg.probe_size].tolist()),
                   key=lambda e: len(e[0]) + len(e[1]))
    cache = []
    if cfg.method == "scd" and rank == 0:  # under torchrun rank 0 chooses for everyone
        for c in pool:
            m, _ = load_checkpoint(tdir / c["file"], device)
            cache.append(probe_logprobs(m, probe, tok.eot, device, ctx))
        del m
        kl_best = [scd.token_kl(cache[best], lp).mean().item() for lp in cache]
        print(f"probe cache: {len(pool)} checkpoints x {cache[0].shape[0]} tokens x {cache[0].shape[1]} "
              f"= {sum(c.numel() for c in cache) * 4 / 2**20:.0f} MiB")
    t_sched = time.time() - t_sched

    atomic_save(config, out / "config.json")
    log = open(out / "log.txt" if rank == 0 else os.devnull, "a")
    net = DDP(student) if world > 1 else student
    net = torch.compile(net) if cfg.compile else net
    total = cfg.stages * cfg.steps_per_stage
    t0, start_step, tokens = time.time(), stage * cfg.steps_per_stage, 0

    # ------------------------------------------------------------------ the stages
    for stage in range(stage, cfg.stages):
        # 1. choose this stage's teacher checkpoint c_k
        t = time.time()
        row = dict(stage=stage)
        if cfg.method == "scd" and rank == 0:
            s_lp = probe_logprobs(student.eval(), probe, tok.eot, device, ctx)
            kl_student = [scd.student_term(s_lp, lp, cfg.student_term) for lp in cache]
            row.update(kl_best=kl_best, kl_student=kl_student)
        prev = schedule[-1].get("ckpt") if schedule else None
        k = None if cfg.method == "sft" or rank > 0 else scd.choose_checkpoint(
            cfg.method, stage, cfg.stages, best, row.get("kl_best"), row.get("kl_student"), prev, cfg.monotone)
        if world > 1:  # every process distils from rank 0's choice
            k = [k]
            dist.broadcast_object_list(k, src=0)
            k = k[0]
        t_sched += time.time() - t
        teacher = None
        if k is not None:
            teacher, _ = load_checkpoint(tdir / pool[k]["file"], device)  # one teacher in memory
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
                ce = scd.gold_ce(s_logits, y, mask)                              # CE(y_i; p_student)
                if teacher is None:
                    kl, w = torch.zeros_like(ce), 0.0                            # SFT: w = 0
                else:
                    with torch.no_grad():
                        t_logits = teacher(x, positions=mask)
                    kl = scd.per_example(scd.distill_kl(t_logits, s_logits, cfg.kl_direction, cfg.temperature), mask)
                    w = scd.aw_weights(anchor[idx], scd.gold_ce(t_logits, y, mask)) if cfg.aw else cfg.alpha
                loss = scd.scd_loss(kl, ce, w)
            optimizer_step(student, optimizer, scaler, loss, cfg.grad_clip)
            tokens += x.numel() * world
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:  # a learning-curve point (test accuracy)
                row.setdefault("curve", []).append([step + 1, data.evaluate(student, splits["test"], tok, device, ctx=ctx)[0]["acc"]])
            if (step + 1) % cfg.log_every == 0:  # the global batch's means
                ce_, kl_, w_ = (global_mean(torch.as_tensor(v, dtype=torch.float, device=device).detach().mean(), world).item()
                                for v in (ce, kl, w))
                line = progress(step + 1, total, t0, start_step, tokens, f"ce {ce_:.4f} | kl {kl_:.4f} | "
                                f"w {w_:.3f} | ckpt {row.get('ckpt', '-')}")
                print(line, flush=True)
                log.write(line + "\n")

        # 3. validate; keep the best student and the stage's state
        summary, _ = data.evaluate(student, splits["val"], tok, device, ctx=ctx)
        row.update(val_loss=round(summary["loss"], 5), val_acc=round(summary["acc"], 4))
        schedule.append(row)
        weights = dict(model=student.state_dict(), model_config=asdict(student.config), vocab=tok.ids)
        if summary["acc"] >= best_val:  # best-on-validation accuracy; ties go to the later stage
            best_val = summary["acc"]
            atomic_save(weights, out / "best.pt")
        atomic_save(dict(stages=schedule, pool=[c["file"] for c in pool], best=best), out / "schedule.json")
        atomic_save(dict(model=student.state_dict(), stage=stage + 1, best_val=best_val), state_path)
        print(f"stage {stage} done: val loss {summary['loss']:.4f}, val acc {summary['acc']:.3f}")
        if stage + 1 == cfg.stop_at_stage:
            print(f"stopping after stage {stage} as asked (--stop_at_stage); rerun to resume")
            return None
    atomic_save(dict(model=student.state_dict(), model_config=asdict(student.config), vocab=tok.ids), out / "final.pt")
    log.close()
    if rank > 0:  # the test pass is rank 0's
        return None

    # ------------------------------------------------------------------ test, both students
    results = {}
    for name in ("best", "final"):
        model, _ = load_checkpoint(out / f"{name}.pt", device)
        summary, records = data.evaluate(model, splits["test"], tok, device, ctx=ctx)
        atomic_save(records, out / f"test_records_{name}.jsonl")
        results[name] = {k: round(v, 4) for k, v in summary.items()}
        print(f"{name} student on test: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    wall = time.time() - t_start
    results.update(wall_s=round(wall, 1), schedule_s=round(t_sched, 1))  # of the sitting that finished the run
    atomic_save(results, out / "results.json")
    print("schedule: " + " -> ".join(str(r.get("ckpt", "-")) for r in schedule) + f" (pool of {len(pool)}, T* = {best})")
    print(f"choosing checkpoints took {t_sched:.1f}s of {wall:.0f}s ({100 * t_sched / wall:.1f}%)")
    return results


if __name__ == "__main__":
    torch.set_num_threads(min(os.cpu_count() or 1, 8))
    main(parse_config(DistillConfig))
    if dist.is_initialized():
        dist.destroy_process_group()
