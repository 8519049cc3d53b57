"""
Hugging Face model folders, read without transformers: config.json -> our config,
model.safetensors (or its shards, or pytorch_model.bin) -> our weights, read one tensor at
a time, tokenizer.json -> a tokenizer (through the tokenizers library, an optional extra:
pip install tokenizers). Nothing is downloaded: a folder is what `huggingface-cli download NAME
--local-dir DIR` leaves.
"""
import hashlib
import json
from pathlib import Path

import torch

from model import GPT, GPTConfig, Llama, rope_frequencies


class UnsupportedModel(ValueError):
    """A model folder this implementation cannot reproduce: the message names the field."""


def config_from_hf(c, path):
    """config.json (a dict) -> GPTConfig, or UnsupportedModel naming the field."""
    kind = c.get("model_type")

    def refuse(name, why):
        raise UnsupportedModel(f"{path}/config.json: field '{name}' = {c.get(name)!r}: {why}")
    if kind == "gpt2":
        return GPTConfig(block_size=c["n_positions"], vocab_size=c["vocab_size"], n_layer=c["n_layer"], n_head=c["n_head"],
                         n_embd=c["n_embd"])
    if kind not in ("llama", "qwen2", "mistral"):
        refuse("model_type", "supported are llama, qwen2, mistral (and SmolLM2, a llama) and gpt2")
    if c.get("use_sliding_window", kind != "qwen2") and c.get("sliding_window") is not None:
        refuse("sliding_window", "sliding-window attention is not supported")
    for name in ("num_local_experts", "num_experts", "n_routed_experts"):
        if c.get(name):
            refuse(name, "mixture-of-experts models are not supported")
    if c.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "the Llama block's MLP is SwiGLU (silu)")
    if c.get("attention_bias") or c.get("mlp_bias"):
        refuse("attention_bias" if c.get("attention_bias") else "mlp_bias", "biases beyond Qwen2's q/k/v are not supported")
    rs = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers 5 writes the first, Hub files the second
    rope = rs.get("rope_type", rs.get("type", "default"))
    if rope not in ("default", "llama3"):
        refuse("rope_parameters" if c.get("rope_parameters") else "rope_scaling", "supported are no scaling and Llama 3's")
    keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return GPTConfig(arch="llama", block_size=c["max_position_embeddings"], vocab_size=c["vocab_size"],
                     n_layer=c["num_hidden_layers"], n_head=c["num_attention_heads"], n_embd=c["hidden_size"],
                     n_kv_head=c.get("num_key_value_heads") or 0, head_dim=c.get("head_dim") or 0,
                     intermediate_size=c["intermediate_size"], rope_theta=c.get("rope_theta", rs.get("rope_theta", 10000.0)),
                     rope_scaling={k: rs[k] for k in keep} if rope == "llama3" else {},
                     norm_eps=c.get("rms_norm_eps", 1e-6), qkv_bias=kind == "qwen2", bias=False,
                     tie_embeddings=c.get("tie_word_embeddings", False))  # False: LlamaConfig's default, and Qwen2's


def load_folder(path):
    """A Hugging Face model folder -> our model, in float32. Reads model.safetensors, or the
    shards its index names, or pytorch_model.bin. A Llama-family model is built without memory
    (on the meta device), given one float32 copy, and filled one tensor at a time: host memory
    peaks near that one copy, not the file's weights, a float32 copy of them and a randomly
    initialised model at once (80 GB for an 8B folder)."""
    path = Path(path)
    config = config_from_hf(json.loads((path / "config.json").read_text(encoding="utf-8")), path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    if (path / files[0]).exists():
        tensors = (kv for f in files for kv in read_safetensors(path / f))
    else:
        tensors = iter(torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True, mmap=True).items())
    if config.arch == "gpt2":  # GPT2Model files name the blocks without the "transformer." of GPT2LMHeadModel
        sd = {k if k.startswith(("transformer.", "lm_head.")) else f"transformer.{k}": v.float() for k, v in tensors}
        sd.setdefault("lm_head.weight", sd["transformer.wte.weight"])
        return GPT.from_hf(sd, config)
    with torch.device("meta"):
        model = Llama(config)  # shapes only: nothing allocated, nothing drawn
    model.to_empty(device="cpu")  # one float32 copy, uninitialised
    if config.tie_embeddings:  # to_empty gives each module its own tensor: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq.copy_(rope_frequencies(config))  # a computed buffer, not in the files
    want, seen = model.state_dict(keep_vars=True), set()
    for name, t in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if name not in want:
            raise UnsupportedModel(f"{path}: weight {name!r} has no place in a {config.arch} model of this config")
        if tuple(t.shape) != tuple(want[name].shape):
            raise UnsupportedModel(f"{path}: weight {name!r} has shape {tuple(t.shape)}, config.json says {tuple(want[name].shape)}")
        with torch.no_grad():
            want[name].copy_(t)  # converted to float32 in place; the file's tensor goes at the next one
        seen.add(name)
    if config.tie_embeddings:
        seen.add("lm_head.weight")  # the embedding's own tensor
    if set(want) - seen:
        raise UnsupportedModel(f"{path}: weights missing from the files: {sorted(set(want) - seen)[:4]}")
    return model


SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


def read_safetensors(path):
    """A .safetensors file's tensors, one at a time: (name, tensor) read from disk on demand
    (the format: an 8-byte header length, a JSON header of dtypes, shapes and byte offsets, then
    the bytes), so no more than one tensor of the file is in memory at once."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, h in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if h["dtype"] not in SAFETENSORS_DTYPES:
                raise UnsupportedModel(f"{path}: tensor {name!r} has dtype {h['dtype']}, not one of {', '.join(SAFETENSORS_DTYPES)}")
            begin, end = h["data_offsets"]
            f.seek(8 + n + begin)
            raw = torch.empty(end - begin, dtype=torch.uint8)
            f.readinto(raw.numpy())  # straight into the tensor's memory: no second copy of the bytes
            yield name, raw.view(SAFETENSORS_DTYPES[h["dtype"]]).reshape(h["shape"])


class FolderTokenizer:
    """A model folder's tokenizer.json, read by Hugging Face's tokenizers library. The same
    interface as data.Tokenizer; ids are the model's own. spec (what checkpoints store)
    names the folder and the file's sha256, and identity is what teacher and student must
    share: the vocabulary size and that hash."""

    def __init__(self, spec):
        from tokenizers import Tokenizer  # the optional extra
        folder = Path(spec["folder"] if isinstance(spec, dict) else spec)
        raw = (folder / "tokenizer.json").read_bytes()
        sha = hashlib.sha256(raw).hexdigest()[:16]
        if isinstance(spec, dict) and spec["sha"] != sha:
            raise UnsupportedModel(f"{folder}/tokenizer.json has changed since the run was made (sha {sha}, not {spec['sha']})")
        self.tk = Tokenizer.from_str(raw.decode("utf-8"))
        c = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        # The end token every answer is followed by. Llama 3's instruction-tuned configs list
        # several ([128001, 128008, 128009]: <|end_of_text|>, <|eom_id|>, <|eot_id|>); the first
        # is the one that ends a document in pretraining, which is the role it has here (prompt
        # and answer are one continuous text, no chat template), and the only one base models list.
        eos = c.get("eos_token_id")
        self.eot = eos[0] if isinstance(eos, list) and eos else eos
        if not isinstance(self.eot, int):
            raise UnsupportedModel(f"{folder}/config.json: field 'eos_token_id' is missing or empty: answers need an end token")
        self.vocab_size, self.ids = c["vocab_size"], dict(folder=str(folder), sha=sha)
        self.identity = ("tokenizer.json", self.vocab_size, sha, self.eot)  # teacher and student end answers alike

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids  # no BOS: prompt + answer are one continuous text

    def decode(self, ids):
        return self.tk.decode(ids)
