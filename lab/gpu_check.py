"""
A check for a machine with one CUDA GPU, in about 8 minutes: nothing is downloaded. Every row is
written to rows.jsonl as soon as it is measured, and a row that runs out of memory says so and
lets the next rows run.

1. Steps (bench.measure), batch 8 x 512 tokens with 128 scored, random weights: GPT-2 shapes
   (gpt2-medium -> gpt2) under bf16 and fp16 with the gradient scaler, and Llama 3.2 3B -> 1B
   under bf16, the student's weights trained or rank-16 adapters, and the 3B's own SFT with
   adapters: step times (SFT, teacher forward, distillation with the teacher in the loop, from
   cached logits, from the offline top-k), tokens/s, MFU against the card's peak, peak memory.
2. Every phase of the three runs at Llama 3.2 3B -> 1B (lab.memtrace.trace on the device: the
   scripts' own functions, the losses and the probe in pieces, evaluation, a save, a resume, a
   stage switch, the offline signal), with and without adapters and checkpointing: CUDA's peak
   allocated and reserved memory of each phase beside the plan (scale.plan_phases).
3. The stage teacher in bf16 (scale.StageTeacher) against the float32 teacher at positions 512
   to 1023, beside the same weights under autocast and the whole model cast (RoPE rounded).
4. A teacher run stopped and resumed on the device against the same run uninterrupted, an
   fp16 run's steps skipped by the gradient scaler, an SCD run that scores no probe again, and a
   Llama folder written here (Llama 3's BOS on every prompt) trained from on the device and exported.
5. The main pipeline end to end on the device at a small budget (reproduce.py with bf16; not with --small).

    python -m lab.gpu_check --out_dir runs/gpu_check     # on the GPU machine
    python -m lab.gpu_check --small true                 # CPU-sized shapes: what the tests run
    python -m lab.gpu_check --plan true                  # the memory plans of the paper's pairs (no GPU needed)

Writes rows.jsonl, gpu_check.json (every figure) and gpu_check.md (tables) to --out_dir.
"""
import contextlib
import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import data
import distill
import plumbing
import scale
import scd
import train_teacher
from lab import bench
from lab import memtrace
from lab import reproduce
from data import logit_chunk
from plumbing import arg, parse_config, run_main
from scale import plan_parts
from model import GPTConfig, add_lora, build


@dataclass
class GpuCheckConfig:
    out_dir: str = arg("runs/gpu_check", "where the figures and the end-to-end run go")
    small: bool = arg(False, "CPU-sized shapes and budget (to keep this script tested without a GPU)")
    data: str = arg("default", "the end-to-end run's data")
    device: str = arg("auto", "cuda, cuda:1, ... (auto: cuda if available)")
    plan: bool = arg(False, "only print the memory plans of the paper's pairs at batch 8 x 512 (no GPU needed)")


PAIRS = [("llama-3.1-8b", "llama-3.2-3b"), ("llama-3.2-3b", "llama-3.2-1b"), ("qwen2.5-1.5b", "qwen2.5-0.5b")]


HELD, CACHE = 24 * 4 * 64 * 128 * 64 * 8, 2**30  # bytes: the probes' (values, indices); --teacher_cache_gib 2 in bf16


def plans(batch_size=8, seq_len=512, answer_len=128, cards=(24, 48, 80), rank=16):
    """Markdown: the training step's plan (scale.plan_parts, bf16 autocast, the losses in pieces
    of data.logit_chunk) of each run of each pair, full fine-tuning and with rank-16 adapters on
    every projection (the frozen base in bf16; weights, gradients and AdamW state in float32 for
    the adapters alone), without and with activation checkpointing; the largest phase of the run
    with checkpointing (scale.plan_phases: evaluation, the probe, a save, a stage switch, ...);
    the cards that hold the larger of the two with the margin a run is refused by (scale.card_fits),
    distillation with the default teacher-logit cache at its fullest (2 GiB of float32, kept
    in bf16) and the stored log-probs of 24 candidates on 4 probes of 64 examples; and the
    disk of a trail of 24 checkpoints (bf16 weights, or float32 adapters)."""
    gib = lambda x: f"{x / 2**30:.1f}"
    rows = ["| pair | phase | trained | weights + grads + AdamW | frozen teacher | activations (ckpt off / on) | logits | "
            "step total (off / on) | largest phase, ckpt on | fits (GB card, ckpt on) | a trail of 24 checkpoints |",
            "|" + " --- |" * 11]
    for t, s in PAIRS:
        for lora in (0, rank):
            with torch.device("meta"):  # shapes only
                T, S = (build(GPTConfig(**bench.SHAPES[n])) for n in (t, s))
                teacher = build(GPTConfig(**bench.SHAPES[t]))  # frozen in distillation: base (+ adapters) in bf16
                if lora:
                    for m in (T, S, teacher):
                        scale.half(add_lora(m, lora), torch.bfloat16, frozen_only=m is not teacher)
            for phase, model, frozen in (("teacher SFT", T, None), ("SFT student", S, None), ("distillation", S, teacher)):
                chunk = logit_chunk(model.config.vocab_size)
                off, on = (plan_parts(model, frozen, batch_size, seq_len, answer_len, "bfloat16", c, chunk) for c in (False, True))
                alive = dict(held=HELD, cache=CACHE) if frozen else {}  # the probes' stored log-probs, the teacher's logits
                phases = scale.plan_phases(model, frozen, batch_size, seq_len, answer_len, "bfloat16", True, chunk, **alive)
                top = max(phases, key=phases.get)
                need = max(sum(on.values()), phases[top])
                fits = [f"{g}" for g in cards if scale.card_fits(need, g)] or ["none"]
                trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
                disk = gib(24 * (4 * trained if lora else 2 * model.num_params())) + " GiB" if phase == "teacher SFT" else ""
                rows.append(f"| {t} -> {s} | {phase} | {f'LoRA r{lora}' if lora else 'all weights'} | "
                            f"{gib(off['weights'] + off['gradients'] + off['AdamW'])} | "
                            f"{gib(off['teacher']) if frozen else '-'} | {gib(off['activations'])} / {gib(on['activations'])} | "
                            f"{gib(off['logits'])} | {gib(sum(off.values()))} / {gib(sum(on.values()))} | "
                            f"{gib(phases[top])} ({top}) | {', '.join(fits)} | {disk} |")
    return "\n".join(rows)


def sharp_llama(seed=0):
    """A small Llama whose attention depends sharply on position (q and k scaled up), with
    Llama 3's rope_theta: where rounding RoPE's frequencies would show."""
    torch.manual_seed(seed)
    model = build(GPTConfig(arch="llama", vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=128, intermediate_size=256,
                            block_size=1024, rope_theta=500000.0, bias=False, tie_embeddings=False)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8), layer.self_attn.k_proj.weight.mul_(8)
    return model


def half_teacher(dev, folder):
    """KL(float32 teacher || each other) at positions 512 to 1023, mean over positions (nats)."""
    model = sharp_llama().to(dev)
    torch.save(plumbing.checkpoint_dict(model, data.Tokenizer(None)), folder / "sharp.pt")
    x = torch.randint(0, 64, (1, 1024), generator=torch.Generator().manual_seed(1)).to(dev)
    mask = torch.zeros(1, 1024, dtype=torch.bool, device=dev)
    mask[0, 512:] = True
    ctx = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16)
    teacher = scale.StageTeacher(folder, [([1], [2])], 0, dev, "bfloat16", ctx, cache_gib=0)
    teacher.use("sharp.pt")
    dtypes = [str(teacher.model.lm_head.weight.dtype), str(teacher.model.inv_freq.dtype)]
    with torch.no_grad():
        exact = model(x, positions=mask)
        with ctx:
            half, autocast = teacher.logits([0], x, mask), model(x, positions=mask)
            whole = model.to(torch.bfloat16)(x, positions=mask)  # buffers too: RoPE's frequencies rounded
    kl = lambda lg: round(scd.token_kl(exact.float(), lg.float()).mean().item(), 8)
    return dict(teacher_dtypes=dtypes, kl_stage_teacher=kl(half), kl_float32_weights_under_autocast=kl(autocast), kl_whole_model_cast=kl(whole))


def runs(cfg, dev, out):
    """A teacher run stopped and resumed on the device against the same run uninterrupted; an fp16 run's skipped steps."""
    common = dict(data=cfg.data, device=dev, dtype="bfloat16", ckpt_per_epoch=2, log_every=10**6,
                  **(dict(preset="student", batch_size=16, probe_size=16, epochs=1) if cfg.small else dict(epochs=2)))
    whole = train_teacher.train(train_teacher.TrainConfig(**common, out_dir=str(out / "whole")))
    total = json.loads((out / "whole" / "manifest.json").read_text())["checkpoints"][-1]["step"]
    train_teacher.train(train_teacher.TrainConfig(**common, out_dir=str(out / "resumed"), stop_at_step=total // 2 + 1))
    resumed = train_teacher.train(train_teacher.TrainConfig(**common, out_dir=str(out / "resumed")))
    last = json.loads((out / "whole" / "manifest.json").read_text())["checkpoints"][-1]["file"]
    a, b = (torch.load(out / d / last, weights_only=True)["model"] for d in ("whole", "resumed"))
    scored, real = [], data.probe_logprobs  # an SCD run on the teacher's own probes: none scored again
    data.probe_logprobs = lambda *a, **k: scored.append(1) or real(*a, **k)
    try:
        distill.main(distill.DistillConfig(data=cfg.data, device=dev, dtype="bfloat16", teacher_dir=str(out / "whole"),
                                           anchor_dir=str(out / "whole"), out_dir=str(out / "scd"), method="scd", stages=2,
                                           steps_per_stage=2, log_every=10**6, pool_start=0.0,
                                           preset=common.get("preset", train_teacher.TrainConfig().preset),
                                           **(dict(batch_size=16, probe_size=16) if cfg.small else {})))
    finally:
        data.probe_logprobs = real
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        fp16 = train_teacher.train(train_teacher.TrainConfig(**{**common, "dtype": "float16"}, out_dir=str(out / "fp16")))
    skipped = re.search(r"skipped (\d+) steps", text.getvalue())
    # On the CPU a resumed run is bit for bit the same. On CUDA it is not: index_add_ (scd.per_example) and SDPA's
    # backward sum with atomics, in an order that varies from run to run; accepted there: every weight within 4 of
    # bf16's steps (2^-6) of the largest weight
    diff, top = (max(f(k).abs().max().item() for k in a) for f in (lambda k: a[k].float() - b[k].float(), lambda k: a[k].float()))
    return dict(steps=total, resumed_at=total // 2 + 1, max_weight_diff=diff, resume_within_tolerance=diff <= 2**-6 * top,
                test_acc_whole=whole["acc"], test_acc_resumed=resumed["acc"], probe_rescored=len(scored),
                fp16_skipped=int(skipped[1]) if skipped else None,
                fp16_test_acc=fp16["acc"])


def headroom(dev):
    """What the refusal reads on this device: free memory now, the margin, what a plan may use."""
    free = scale.free_memory(dev)
    gib = lambda b: round(b / 2**30, 2)
    return dict(free_gib=gib(free), margin_gib=gib(scale.margin(free)), usable_gib=gib(free - scale.margin(free)))


def llama_folder(cfg, dev, out):
    """The researcher's path on the device: a small Llama folder written here (random weights, a
    byte-level BPE trained on the data with Llama 3's post-processor, which starts every text with
    <|begin_of_text|>), its encoded prompts checked to start with that BOS, and a short SFT run
    from the folder on the device, exported back as a folder. Needs the optional tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from lab import export
    folder, splits = out / "llama_folder", reproduce.domains.load(cfg.data)
    folder.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    tk.train_from_iterator([e["prompt"] + e["answer"] for e in splits["train"]], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(folder / "tokenizer.json"))
    model = build(GPTConfig(arch="llama", vocab_size=tk.get_vocab_size(), n_layer=2, n_head=4, n_kv_head=2, n_embd=128,
                            intermediate_size=256, block_size=256, rope_theta=500000.0, bias=False, tie_embeddings=False))
    ids = type("Ids", (), dict(bos=[0], eot=1))
    (folder / "config.json").write_text(json.dumps(export.hf_config(model.config, ids, "float32")))
    export.write_safetensors(export.hf_weights(model), folder / "model.safetensors", "float32")
    _, tok, _, enc = plumbing.prepare(cfg.data, "student", 0, init_from=str(folder))
    bos = all(p[0] == 0 for s in enc.values() for p, _ in s)
    res = train_teacher.train(train_teacher.TrainConfig(data=cfg.data, device=dev, dtype="bfloat16", init_from=str(folder),
                                                        epochs=1, ckpt_per_epoch=1, log_every=10**6, probe_resamples=0,
                                                        batch_size=16, out_dir=str(out / "from_folder")))
    m = json.loads((out / "from_folder" / "manifest.json").read_text())
    export.export(out / "from_folder" / m["checkpoints"][-1]["file"], out / "exported", dtype="bfloat16")
    return dict(tok_bos=tok.bos, every_prompt_starts_with_bos=bos, sft_test_acc=res["acc"],
                exported=sorted(p.name for p in (out / "exported").iterdir()))


def main(cfg):
    if cfg.plan:
        print(plans())
        return None
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    name = torch.cuda.get_device_name(dev) if dev.startswith("cuda") else dev
    rows, log = [], open(out / "rows.jsonl", "a")

    def row(kind, fn, **about):
        """Measure one row, write it at once; a row out of memory says so and the next rows run."""
        t = time.time()
        try:
            r = {"kind": kind, **about, **fn()}  # the measurement's own fields win
        except torch.cuda.OutOfMemoryError as e:
            r = {"kind": kind, **about, "device": name, "error": f"out of memory: {e}"[:300]}
            torch.cuda.empty_cache()
        r["wall_s"] = round(time.time() - t, 1)
        rows.append(r)
        log.write(json.dumps(r) + "\n")
        log.flush()
        print(json.dumps(r), flush=True)

    row("headroom", lambda: headroom(dev))  # the refusal's figures; the phases below say whether its margin holds
    # 1. steps
    gpt2 = dict(teacher="gpt2-medium", student="gpt2", batch_size=8, seq_len=512, answer_len=128, steps=10, rounds=3)
    llama = dict(gpt2, teacher="llama-3.2-3b", student="llama-3.2-1b", dtype="bfloat16", steps=5)
    steps = ([dict(teacher="teacher", student="student", batch_size=4, seq_len=0, steps=2, rounds=1, dtype=d, lora_rank=r)
              for d, r in (("bfloat16", 0), ("float16", 0), ("bfloat16", 4))] if cfg.small else
             [dict(gpt2, dtype="bfloat16"), dict(gpt2, dtype="float16"),  # and the paper's family, Llama 3.2 3B -> 1B,
              llama, dict(llama, lora_rank=16), dict(llama, student="llama-3.2-3b", lora_rank=16)])  # the 3B's own SFT
    for shapes in steps:
        row("steps", lambda: bench.measure(bench.BenchConfig(**shapes, device=dev)), **shapes)
    # 2. every phase against the plan
    small = dict(batch_size=2, seq_len=16, answer_len=4, eval_batch=4, probe_size=4, logit_chunk=8)  # the path, no figure
    mcfg = memtrace.MemTraceConfig(**(small if cfg.small else {}))
    pair = ("tiny-teacher", "tiny-student") if cfg.small else ("llama-3.2-3b", "llama-3.2-1b")
    # (small: adapters with checkpointing alone; the plain setting's trace is tests/test_scale.py's)
    for lora, ckpt in ((16, True),) if cfg.small else ((0, False), (0, True), (16, False), (16, True)):
        def phases():
            peaks, plan = memtrace.trace(mcfg, *pair, lora, ckpt, device=dev), memtrace.planned(mcfg, *pair, lora, ckpt)
            gib = lambda b: None if b is None else round(b / 2**30, 2)
            return dict(phases=[dict(phase=p, allocated_gib=gib(a), reserved_gib=gib(r), plan_gib=gib(plan[p]))
                                for p, (a, r) in peaks.items()])
        row("phases", phases, pair=" -> ".join(pair), lora_rank=lora, grad_ckpt=ckpt)
    # 3, 4. the half teacher; resume and fp16 on the device
    row("half teacher", lambda: half_teacher(dev, out))
    row("runs", lambda: runs(cfg, dev, out))
    row("folder", lambda: llama_folder(cfg, dev, out))  # BOS, the folder path on the device, export
    # 5. the pipeline end to end (on the device; the CPU's is tests/test_reproduce.py's)
    summary = dict(device=name, rows=rows, e2e=None)
    if not cfg.small:
        t, e2e = time.time(), out / "e2e"
        reproduce.main(reproduce.ReproduceConfig(data=cfg.data, out_dir=str(e2e), report_dir=str(e2e / "report"), device=dev,
                                                 dtype="bfloat16", teacher_epochs=4, ckpt_per_epoch=1, stage_epochs=1, stages=2,
                                                 probe_size=64), "gpu_check.py end to end")
        results = json.loads(next((e2e / "seed0").glob("scd_aw*/results.json")).read_text())  # scd_aw_k4 by default
        summary["e2e"] = dict(wall_s=round(time.time() - t, 1), scd_aw_test_acc=results["best"]["acc"],
                              report=str(e2e / "report" / "results.md"))
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    (out / "gpu_check.md").write_text(report(summary))
    print(report(summary))
    return summary


def report(summary):
    """gpu_check.md: the tables of every row."""
    rows = summary["rows"]
    lines = [f"# gpu_check.py on {summary['device']}", "", "Steps: random weights, medians of rounds of steps; the losses in "
             "pieces (data.logit_chunk).", "",
             "| teacher -> student | autocast | student trains | SFT ms | SFT MFU | teacher fwd ms | distill ms | "
             "distill, cached teacher ms | distill, offline top-k ms | distill tok/s | ratio | distill MFU | peak GiB |",
             "|" + " --- |" * 13]
    for r in (r for r in rows if r["kind"] == "steps"):
        trains = f"LoRA r{r['lora_rank']}" if r.get("lora_rank") else "all"
        if "error" in r:
            lines.append(f"| {r['teacher']} -> {r['student']} | {r.get('dtype')} | {trains} | " + r["error"][:60] + " |" * 11)
            continue
        lines.append(f"| {r['teacher']} -> {r['student']} | {r['dtype']} | {trains} | {r['sft_ms']} | {r.get('sft_mfu')} | "
                     f"{r['teacher_forward_ms']} | {r['distill_ms']} | {r['distill_cached_ms']} | {r['distill_offline_ms']} | "
                     f"{r['distill_tok_s']:,} | {r['ratio']} | {r.get('mfu')} | {r['peak_mem_GiB']} |")
    lines += ["", "Every phase: CUDA's peak allocated and reserved GiB beside the plan (scale.plan_phases).", "",
              "| pair | trained | ckpt | phase | allocated | reserved | plan | plan / reserved |", "|" + " --- |" * 8]
    for r in (r for r in rows if r["kind"] == "phases"):
        for p in r.get("phases", [dict(phase=r.get("error", "")[:60], allocated_gib=None, reserved_gib=None, plan_gib=None)]):
            ratio = f"{p['plan_gib'] / p['reserved_gib']:.2f}" if p["reserved_gib"] else "-"
            trains = f"LoRA r{r['lora_rank']}" if r["lora_rank"] else "all"
            lines.append(f"| {r['pair']} | {trains} | "
                         f"{'on' if r['grad_ckpt'] else 'off'} | {p['phase']} | {p['allocated_gib']} | {p['reserved_gib']} | "
                         f"{p['plan_gib']} | {ratio} |")
    ratios = [p["reserved_gib"] / p["allocated_gib"] for r in rows if r["kind"] == "phases" for p in r.get("phases", [])
              if p["reserved_gib"] and p["allocated_gib"]]
    if ratios:
        lines += ["", f"Reserved / allocated at the phases' peaks: {min(ratios):.2f} to {max(ratios):.2f} (the refusal's "
                  "margin assumes 1 GiB and 5% of the free memory cover this, the context aside)."]
    for r in (r for r in rows if r["kind"] in ("headroom", "half teacher", "runs", "folder")):
        lines += ["", f"{r['kind']}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("kind",))]
    if summary["e2e"]:
        lines += ["", f"End to end (reproduce.py, bf16, small budget): {summary['e2e']['wall_s']} s, "
                  f"SCD+AW test exact match {summary['e2e']['scd_aw_test_acc']:.3f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main, parse_config(GpuCheckConfig, "An eight-minute check of the CUDA paths: steps, every phase's memory, the "
                                "half teacher, resume, fp16, and the pipeline end to end."))
