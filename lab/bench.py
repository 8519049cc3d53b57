"""
Speed of one training step, measured, never asserted: SFT, the teacher's forward pass, and a
distillation step (METHOD.md section 2.4 with AW) with the teacher in the loop, with the
stage's teacher logits cached (what distill.py does when they fit), and from the offline top-k
signal (--teacher_topk); --lora_rank trains the student's adapters only. Prints medians over
--rounds rounds with their spread, and one JSON line at the end.

    python -m lab.bench                                         # CPU presets on real default-domain batches
    python -m lab.bench --teacher gpt2-medium --student gpt2 --seq_len 512 --answer_len 128 \\
        --batch_size 8 --device cuda --dtype bfloat16       # GPT-2 shapes, random tokens

The rounds interleave the measurements, so a slow moment of the machine hits all of them.
Target: distillation / (SFT + teacher forward) <= 1.10, i.e. nothing beyond the teacher's
forward pass; with cached logits a distillation step should cost about an SFT step.
"""
import json
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch

import data
import scd
from model import GPTConfig, PRESETS, add_lora, build
import scale
from plumbing import arg, parse_config, run_main, setup_device

# The Llama family's shapes (from the models' config.json files), for timings and memory plans from random weights
LLAMA = dict(arch="llama", bias=False, block_size=2048, rope_theta=500000.0, vocab_size=128256)
SHAPES = {
    "llama-3.1-8b": dict(LLAMA, n_layer=32, n_head=32, n_kv_head=8, n_embd=4096, intermediate_size=14336, tie_embeddings=False),
    "llama-3.2-3b": dict(LLAMA, n_layer=28, n_head=24, n_kv_head=8, n_embd=3072, intermediate_size=8192),
    "llama-3.2-1b": dict(LLAMA, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, intermediate_size=8192),
    "qwen2.5-1.5b": dict(LLAMA, n_layer=28, n_head=12, n_kv_head=2, n_embd=1536, intermediate_size=8960, vocab_size=151936,
                         qkv_bias=True, rope_theta=1e6),
    "qwen2.5-0.5b": dict(LLAMA, n_layer=24, n_head=14, n_kv_head=2, n_embd=896, intermediate_size=4864, vocab_size=151936,
                         qkv_bias=True, rope_theta=1e6),
}
SHAPES.update(PRESETS)
# dense bf16 tensor-core peaks from the datasheets, TFLOPS; the first entry whose words all appear in the card's name
PEAK_TFLOPS = [("H100 PCIe", 756), ("H100 SXM", 989), ("H100 SXM5", 989), ("H100 HBM3", 989), ("H200", 989), ("A100", 312), ("L40S", 362),
               ("L40", 181), ("L4", 121), ("A10", 125), ("RTX 4090", 165)]


def peak_tflops(name):
    """The card's dense bf16 peak, matched on whole words of its name ("NVIDIA L40S" is not an
    L40 nor an L4, "NVIDIA H100 PCIe" not an SXM card), or None for a card not listed."""
    words = set(name.replace("-", " ").split())
    return next((v for key, v in PEAK_TFLOPS if set(key.split()) <= words), None)


@dataclass
class BenchConfig:
    teacher: str = arg("teacher", "teacher shape", choices=tuple(SHAPES))
    student: str = arg("student", "student shape", choices=tuple(SHAPES))
    grad_ckpt: bool = arg(False, "activation checkpointing in the student")
    batch_size: int = arg(16, "examples per step", low=1)
    seq_len: int = arg(0, "0: real batches of the default domain (CPU presets); N: random tokens of length N", low=0)
    answer_len: int = arg(128, "scored tokens at the end of each random example (with --seq_len)", low=1)
    steps: int = arg(20, "timed steps per measurement and round, after 3 warm-up steps", low=1)
    rounds: int = arg(7, "rounds; the figures are medians over rounds, with min..max", low=1)
    compile: bool = arg(False, "torch.compile the student and the teacher")
    lora_rank: int = arg(0, "the student trains LoRA adapters of this rank on its frozen weights (0: all weights)", low=0)
    topk: int = arg(64, "the offline teacher signal's log-probs per token (distill.py --teacher_topk), for distill_offline", low=1)
    device: str = arg("auto", "cpu, cuda, ...")
    dtype: str = arg("auto", "autocast precision", choices=("auto", "float32", "bfloat16", "float16"))


def batches(cfg, vocab, device):
    """A list of (x, y, mask): the default domain's first training batches, or random tokens."""
    if not cfg.seq_len:
        splits = data.load_domain("default")
        tok = data.Tokenizer.compact([ex["prompt"] + ex["answer"] for ex in splits["train"]])
        enc = data.encode(splits["train"], tok, 128)
        lengths = [len(p) + len(a) for p, a in enc]
        return tok.vocab_size, [data.make_batch(enc, data.batch_indices(lengths, cfg.batch_size, 0, s), tok.eot, device)
                                for s in range(cfg.steps)]
    x = torch.randint(0, vocab, (cfg.batch_size, cfg.seq_len), device=device)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, -cfg.answer_len:] = True
    return vocab, [(x, torch.randint(0, vocab, x.shape, device=device), mask)] * cfg.steps


def flops_per_step(model, x, mask, train):
    """Matmul FLOPs of one pass, x3 with the backward pass: 2 per weight per token in the blocks
    (their matrices, whatever the architecture), the head only at answer positions, and
    attention's scores and mixing, 4 L (heads x head size) T per token."""
    c = model.config
    head = {id(model.lm_head.weight)} | {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    blocks = sum(p.numel() for p in model.parameters() if p.dim() == 2 and id(p) not in head)
    attn = 4 * c.n_layer * c.n_head * c.head_dim * x.size(1)
    f = (2 * blocks + attn) * x.numel() + 2 * c.vocab_size * c.n_embd * int(mask.sum())
    return 3 * f if train else f


def measure(cfg):
    device, dtype, ctx, scaler, _, _ = setup_device(cfg.device, cfg.dtype)
    vocab, data_ = batches(cfg, SHAPES[cfg.student].get("vocab_size", 50257), device)
    block = max(128, cfg.seq_len)
    make = lambda name: build(GPTConfig(**{**SHAPES[name], "block_size": block, "vocab_size": vocab})).to(device)
    torch.manual_seed(0)
    teacher, student = make(cfg.teacher).eval(), make(cfg.student)
    if dtype != "float32":  # the frozen teacher's parameters in the autocast dtype, as scale.StageTeacher keeps them
        scale.half(teacher, ctx.fast_dtype)
        if cfg.lora_rank:  # and an adapted student's frozen base (scale.start)
            scale.half(student, ctx.fast_dtype)
    if cfg.lora_rank:
        add_lora(student, cfg.lora_rank)  # the adapters in float32, on the base's device
    student.grad_checkpointing = cfg.grad_ckpt
    opt = student.configure_optimizer(1e-4, 0.1, (0.9, 0.95), device.split(":")[0])
    t_net, s_net = (torch.compile(m) if cfg.compile else m for m in (teacher, student))
    anchor = torch.rand(cfg.batch_size, device=device) + 0.5
    chunk = data.logit_chunk(vocab)  # the losses in pieces, as the scripts compute them
    with torch.no_grad(), ctx:
        cached = [t_net(x, positions=m) for x, _, m in data_]  # what distill.py keeps per stage
        offline = [scd.compress_logprobs(torch.log_softmax(lg.float(), -1), cfg.topk) for lg in cached]  # --teacher_topk

    def sft(i):
        x, y, m = data_[i]
        with ctx:
            loss = scd.gold_ce(s_net(x, positions=m), y, m, chunk).mean()
        optimizer_step(student, opt, scaler, loss, 1.0, "bench")

    @torch.no_grad()
    def teacher_forward(i):
        x, _, m = data_[i]
        with ctx:
            return t_net(x, positions=m)

    def distill(i, cache=False):
        x, y, m = data_[i]
        with ctx:
            s_logits = s_net(x, positions=m)
            with torch.no_grad():
                t_logits = (cached[i] if cache == "logits" else scd.dense_logprobs(*offline[i], vocab) if cache == "topk"
                            else t_net(x, positions=m))
            loss, _ = scd.distill_loss(s_logits, t_logits, y, m, anchor_loss=anchor, chunk=chunk)  # in pieces, as distill.py
        optimizer_step(student, opt, scaler, loss, 1.0, "bench")

    def optimizer_step(student, opt, scaler, loss, clip, where):  # the scripts' step: backward, unscale, clip, step
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        scale.clip_grads(student, clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn):
        for i in range(3):
            fn(i % cfg.steps)
        sync()
        t = time.perf_counter()
        for i in range(cfg.steps):
            fn(i)
        sync()
        return (time.perf_counter() - t) / cfg.steps

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    kinds = dict(sft=sft, teacher_forward=teacher_forward, distill=distill, distill_cached=lambda i: distill(i, "logits"),
                 distill_offline=lambda i: distill(i, "topk"))
    runs = {k: [] for k in kinds}
    for _ in range(cfg.rounds):  # interleaved: a slow moment of the machine hits every kind alike
        for k, fn in kinds.items():
            runs[k].append(timed(fn))
    ratios = [d / (s + f) for d, s, f in zip(runs["distill"], runs["sft"], runs["teacher_forward"])]
    ratios_cached = [d / s for d, s in zip(runs["distill_cached"], runs["sft"])]
    tokens = statistics.mean(x.numel() for x, _, _ in data_)
    spread = lambda v, k=1e3: [round(k * min(v), 2), round(k * max(v), 2)]
    out = dict(device=torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu x{torch.get_num_threads()} threads",
               dtype=dtype, **{k: v for k, v in asdict(cfg).items() if k not in ("device", "dtype")}, vocab=vocab,
               tokens_per_step=round(tokens), teacher_params_M=round(teacher.num_params() / 1e6, 2),
               student_params_M=round(student.num_params() / 1e6, 2))
    for k, v in runs.items():
        out[f"{k}_ms"], out[f"{k}_ms_range"] = round(1e3 * statistics.median(v), 2), spread(v)
    out.update(ratio=round(statistics.median(ratios), 3), ratio_range=spread(ratios, 1),
               ratio_cached_vs_sft=round(statistics.median(ratios_cached), 3), ratio_cached_range=spread(ratios_cached, 1),
               distill_tok_s=round(tokens / statistics.median(runs["distill"])),
               distill_cached_tok_s=round(tokens / statistics.median(runs["distill_cached"])))
    if device.startswith("cuda"):  # model FLOPs utilisation against the card's datasheet peak
        x, _, m = data_[0]  # adapters: no weight gradients for the frozen matrices, so about 2 passes, not 3
        flops = flops_per_step(student, x, m, True) * (2 / 3 if cfg.lora_rank else 1) + flops_per_step(teacher, x, m, False)
        peak = peak_tflops(out["device"])
        out["mfu"] = round(flops / statistics.median(runs["distill"]) / (peak * 1e12), 3) if peak else None
        sft_flops = flops_per_step(student, x, m, True) * (2 / 3 if cfg.lora_rank else 1)
        out["sft_mfu"] = round(sft_flops / statistics.median(runs["sft"]) / (peak * 1e12), 3) if peak else None
        out["peak_mem_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        out["peak_mem_GiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # process RSS
    return out


def main(cfg):
    out = measure(cfg)
    for k in ("sft", "teacher_forward", "distill", "distill_cached", "distill_offline"):
        print(f"{k:16s} {out[k + '_ms']:8.2f} ms  (min..max over {cfg.rounds} rounds: "
              f"{out[k + '_ms_range'][0]}..{out[k + '_ms_range'][1]})")
    print(f"distillation / (SFT + teacher forward) = {out['ratio']} (min..max {out['ratio_range'][0]}..{out['ratio_range'][1]}; "
          f"target <= 1.10) | cached-teacher distillation / SFT = {out['ratio_cached_vs_sft']} "
          f"({out['ratio_cached_range'][0]}..{out['ratio_cached_range'][1]}) | peak memory {out['peak_mem_GiB']} GiB"
          + (f" | MFU {out['mfu']}" if out.get("mfu") is not None else ""))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    run_main(main, parse_config(BenchConfig, "Times SFT, teacher-forward and distillation steps; prints medians and spread."))
