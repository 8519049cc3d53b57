"""
A checkpoint of this project (a distilled student's best.pt, any checkpoint of a trail) as a
Hugging Face model folder, for transformers, vLLM and the evaluation harnesses:

    python -m lab.export --ckpt runs/s1b_scd_aw/best.pt --out_dir exported/s1b_scd_aw --dtype bfloat16

writes config.json, model.safetensors (adapters merged into their base, in --dtype),
generation_config.json and the tokenizer files of the folder the model came from. The folder
reads back here too (--init_from exported/s1b_scd_aw). A model needs a folder's tokenizer: the
CPU demo's compact GPT-2 vocabulary has no Hugging Face tokenizer file, and is refused.
"""
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from model import merge_lora
from plumbing import FolderTokenizer, RunError, arg, load_checkpoint, parse_config, run_main

DTYPES = {"float32": (torch.float32, "F32"), "bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class ExportConfig:
    ckpt: str = arg("", "the checkpoint to export: a run's best.pt or final.pt, or a checkpoint of a teacher's trail")
    out_dir: str = arg("", "the folder to write (must not exist, or be empty)")
    dtype: str = arg("bfloat16", "the weights' dtype in model.safetensors", choices=tuple(DTYPES))


def hf_config(c, tok, dtype):
    """Our GPTConfig -> the config.json transformers builds the same model from."""
    ids = dict(bos_token_id=tok.bos[0] if tok.bos else tok.eot, eos_token_id=tok.eot, torch_dtype=dtype)
    if c.arch != "llama":  # GPT-2: LayerNorm eps 1e-5 and the tanh GELU, as model.py's GPT
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size, n_positions=c.block_size,
                    n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu_new",
                    layer_norm_epsilon=1e-5, tie_word_embeddings=True, **ids)
    kind = "qwen2" if c.qkv_bias else "llama"  # Qwen2 is the Llama block with biases on q, k and v
    rope = dict(c.rope_scaling, rope_type="llama3") if c.rope_scaling else None
    return dict(model_type=kind, architectures=["Qwen2ForCausalLM" if c.qkv_bias else "LlamaForCausalLM"],
                vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head or c.n_head,
                head_dim=c.head_dim or c.n_embd // c.n_head, max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
                rope_theta=c.rope_theta, rope_scaling=rope, hidden_act="silu", attention_bias=False,
                tie_word_embeddings=c.tie_embeddings, **({"use_sliding_window": False} if c.qkv_bias else {}), **ids)


def hf_weights(model):
    """Our weights under transformers' names: the same names; GPT-2's four projections stored
    (in, out) as its Conv1D keeps them, and its missing biases as zeros; a tied head stored once."""
    sd = model.state_dict()
    if model.config.arch != "llama":
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        sd = {k: v.t() if k.endswith(conv1d) else v for k, v in sd.items()}
        for k in [k for k in sd if k.endswith(".weight") and "wte" not in k and "wpe" not in k and k != "lm_head.weight"]:
            sd.setdefault(k[:-len("weight")] + "bias", torch.zeros(sd[k].shape[-1]))
    if model.config.arch != "llama" or model.config.tie_embeddings:
        sd.pop("lm_head.weight")
    return sd


def write_safetensors(tensors, path, dtype):
    """The safetensors format: an 8-byte little-endian header length, a JSON header naming each
    tensor's dtype, shape and byte range, then the bytes, in the header's order."""
    torch_dtype, name = DTYPES[dtype]
    blobs, header, at = [], {"__metadata__": {"format": "pt"}}, 0
    for k, v in tensors.items():
        b = v.detach().to(torch_dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[k] = dict(dtype=name, shape=list(v.shape), data_offsets=[at, at + len(b)])
        blobs.append(b)
        at += len(b)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for b in blobs:
            f.write(b)


def export(ckpt, out_dir, dtype="bfloat16"):
    """ckpt -> a Hugging Face folder at out_dir. -> out_dir."""
    model, tok = load_checkpoint(ckpt)
    if not isinstance(tok, FolderTokenizer):
        raise RunError(f"{ckpt}: its vocabulary is this project's GPT-2 ids, which no Hugging Face tokenizer file "
                       "describes; export models trained from a model folder (--init_from <folder>)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise RunError(f"{out} is not empty; export into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    merged = bool(model.lora)
    model = merge_lora(model) if merged else model  # adapters folded into their base: W + (alpha / r) B A
    (out / "config.json").write_text(json.dumps(hf_config(model.config, tok, dtype), indent=1))
    write_safetensors(hf_weights(model), out / "model.safetensors", dtype)
    src = Path(tok.ids["folder"])
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    gen = json.loads((src / "generation_config.json").read_text()) if (src / "generation_config.json").exists() else {}
    config = json.loads((out / "config.json").read_text())
    gen.update({k: config[k] for k in ("bos_token_id", "eos_token_id")})  # answers end with the end token
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1))
    print(f"{ckpt} -> {out}: {model.num_params() / 1e6:.2f}M parameters in {dtype}"
          + (", adapters merged into their base" if merged else ""))
    return out


def main(cfg):
    if not cfg.ckpt or not cfg.out_dir:
        raise RunError("--ckpt and --out_dir are both needed")
    return export(cfg.ckpt, cfg.out_dir, cfg.dtype)


if __name__ == "__main__":
    run_main(main, parse_config(ExportConfig, "A checkpoint of this project as a Hugging Face model folder."))
