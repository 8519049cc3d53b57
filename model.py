"""
The models: the GPT-2 architecture and the Llama family, one interface (LM) for both.

Read top-down: the config and presets, what both share (LM), then GPT-2 (attention -> MLP
-> block -> GPT), then the Llama family (RMSNorm, rotary embeddings -> grouped-query
attention -> SwiGLU -> block -> Llama). Parameter names follow Hugging Face's
GPT2LMHeadModel and LlamaForCausalLM, so loading their weights (plumbing.load_folder) is a copy.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    block_size: int = 64     # context length
    vocab_size: int = 50257  # rows of the head; the compact vocabulary has one per token, no padding rows
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    arch: str = "gpt2"       # "gpt2" or "llama"; the fields below are the Llama family's
    n_kv_head: int = 0       # grouped-query attention: key/value heads (0: n_head)
    head_dim: int = 0        # 0: n_embd // n_head
    intermediate_size: int = 0  # the SwiGLU width (0: 4 * n_embd)
    rope_theta: float = 10000.0
    # Llama 3's RoPE scaling: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    rope_scaling: dict = field(default_factory=dict)
    norm_eps: float = 1e-5
    qkv_bias: bool = False   # Qwen2 has biases on q, k and v
    tie_embeddings: bool = True

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.intermediate_size = self.intermediate_size or 4 * self.n_embd


# Named presets. The CPU pair fits the embedded domain on a 2-core laptop (vocab_size from the
# data; a longer example than the context is an error, never a truncation); the teacher's
# dropout of 0.1 slows its memorising of wrong labels (README). Llama models come from folders.
PRESETS = {
    "teacher": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.1),
    "student": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),  # 1/6 of the teacher's parameters
    "wide": dict(n_layer=2, n_head=8, n_embd=256, block_size=128),
    # the sparse-parity control (lab/parity.py): a teacher of 16 heads and a student of 4, both of head size 8
    "parity_teacher": dict(n_layer=2, n_head=16, n_embd=128, block_size=32),
    "parity_student": dict(n_layer=2, n_head=4, n_embd=32, block_size=32),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),          # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),      # 1558M
}
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # Hugging Face names, for GPT.from_pretrained


class LM(nn.Module):
    """What both architectures share: initialisation, the answer-only head, activation checkpointing,
    AdamW groups, greedy decoding. A subclass builds its modules and body(idx) -> (B, T, C)."""
    grad_checkpointing = False  # recompute each block in the backward pass instead of keeping its activations
    lora = None  # with adapters: their rank, alpha and dropout (add_lora), and where their base is (plumbing.adapt)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if hasattr(module, "SCALE_INIT"):  # residual projections: GPT-2 scales by 1/sqrt(2 * n_layer)
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def run_block(self, block, x, *args):
        if self.grad_checkpointing and self.training:
            return checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)

    def forward(self, idx, positions=None, head=None):
        """idx (B, T) token ids -> logits (B, T, V); with positions, a (B, T) bool mask, only
        there: (N, V) in row-major order. Answers are a small share of each sequence and the
        vocabulary-sized head is the expensive part, so training asks for answer positions only.
        head(h, lm_head): what to make of the final hidden states instead of the whole logits
        (data.in_pieces: the head a piece of positions at a time, for 128k vocabularies)."""
        T = idx.size(1)
        assert T <= self.config.block_size, f"sequence of {T} tokens > block_size {self.config.block_size}"
        x = self.body(idx)
        x = x if positions is None else x[positions]
        return self.lm_head(x) if head is None else head(x, self.lm_head)

    def configure_optimizer(self, lr, weight_decay, betas, device_type):
        # decay the blocks' matrices; not biases, norms or embeddings (lookup tables, tied to the head or not)
        tables = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        train = [p for p in self.parameters() if p.requires_grad]  # with adapters, only theirs (add_lora)
        decay = [p for p in train if p.dim() >= 2 and id(p) not in tables]
        rest = [p for p in train if p.dim() < 2 or id(p) in tables]
        groups = [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=(device_type == "cuda"))

    @torch.no_grad()
    def generate(self, idx, lengths, max_new_tokens, stop_id):
        """Greedy decoding of a right-padded batch (row b's prompt is idx[b, :lengths[b]]): each row
        continues at its own position, which the padding after it cannot reach through the causal
        mask (no KV cache: answers are short). -> one list of new ids per row, stop_id cut."""
        B, rows = idx.size(0), torch.arange(idx.size(0), device=idx.device)
        total = min(int(lengths.max()) + max_new_tokens, self.config.block_size)
        buf = torch.full((B, total), stop_id, dtype=idx.dtype, device=idx.device)
        buf[:, :min(idx.size(1), total)] = idx[:, :total]
        start, lengths = lengths.clone(), lengths.clone()
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            done |= lengths >= total  # out of context: stop this row
            if done.all():
                break
            live = rows[~done]  # finished rows drop out of the forward pass
            T = int(lengths[live].max())
            at = torch.zeros(len(live), T, dtype=torch.bool, device=idx.device)
            at[torch.arange(len(live)), lengths[live] - 1] = True  # the last token of each row
            nxt = self(buf[live, :T], positions=at).argmax(-1)  # (live,)
            buf[live, lengths[live]] = nxt
            lengths[live] += 1
            done[live] |= nxt == stop_id
        out = [buf[b, start[b]:lengths[b]].tolist() for b in range(B)]
        return [o[:o.index(stop_id)] if stop_id in o else o for o in out]


# -----------------------------------------------------------------------------
# GPT-2

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.SCALE_INIT = True
        self.n_head, self.dropout = config.n_head, config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2 uses the tanh GELU


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # pre-LayerNorm residual blocks
        return x + self.mlp(self.ln_2(x))


class GPT(LM):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)

    def body(self, idx):
        pos = torch.arange(idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = self.run_block(block, x)
        return self.transformer.ln_f(x)

    @classmethod
    def from_hf(cls, state_dict, config):
        """A Hugging Face GPT2LMHeadModel state dict -> GPT. The names are the same; HF keeps
        the four projection matrices as Conv1D, stored (in, out), so those are transposed."""
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        sd = {k: (v.t() if k.endswith(conv1d) else v) for k, v in state_dict.items()
              if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # causal-mask buffers of older versions
        model = cls(config)
        model.load_state_dict(sd)  # strict: a missing or unexpected name is an error
        return model

    @classmethod
    def from_pretrained(cls, name):
        """GPT-2 weights by Hugging Face name (gpt2, gpt2-medium, gpt2-large, gpt2-xl); needs the
        optional extra (pip install transformers) and a download on first use."""
        from transformers import GPT2LMHeadModel
        hf = GPT2LMHeadModel.from_pretrained(name)
        c = hf.config
        return cls.from_hf(hf.state_dict(), GPTConfig(c.n_positions, c.vocab_size, c.n_layer, c.n_head, c.n_embd))


# -----------------------------------------------------------------------------
# the Llama family (Llama 2/3, Qwen2, Mistral and SmolLM2 configs)

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()  # the mean square in float32, as Llama computes it
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_frequencies(c):
    """The rotary embedding's inverse frequencies, (head_dim / 2,). Llama 3's rescaling:
    wavelengths longer than the original context / low_freq_factor are slowed by factor,
    those shorter than original context / high_freq_factor kept, those between blended."""
    inv = 1.0 / c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim)
    s = c.rope_scaling
    if s:
        old, lo, hi = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
        smooth = ((old * inv / (2 * math.pi) - lo) / (hi - lo)).clamp(0, 1)  # old / wavelength, mapped onto [0, 1]
        inv = (1 - smooth) * inv / s["factor"] + smooth * inv
    return inv


def rotate(x, cos, sin):
    """x (B, nh, T, hs) turned by position: the pair (i, i + hs/2) by angle position * freq_i."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_head, self.n_kv, self.hs = c.n_head, c.n_kv_head, c.head_dim
        self.q_proj = nn.Linear(c.n_embd, c.n_head * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.n_embd, c.n_kv_head * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=False)
        self.o_proj.SCALE_INIT = True

    def forward(self, x, cos, sin):
        B, T, _ = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)    # (B, n_kv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hs).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        rep = self.n_head // self.n_kv  # grouped-query attention: each key/value head serves rep query heads
        y = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class SwiGLU(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c.n_embd, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.n_embd, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.n_embd, bias=False)
        self.down_proj.SCALE_INIT = True

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = RMSNorm(c.n_embd, c.norm_eps)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = RMSNorm(c.n_embd, c.norm_eps)
        self.mlp = SwiGLU(c)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)  # pre-norm residual blocks, as GPT-2
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(LM):
    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.model = nn.ModuleDict(dict(embed_tokens=nn.Embedding(c.vocab_size, c.n_embd),
                                        layers=nn.ModuleList([LlamaBlock(c) for _ in range(c.n_layer)]),
                                        norm=RMSNorm(c.n_embd, c.norm_eps)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(c), persistent=False)
        self.apply(self._init_weights)

    def body(self, idx):
        angles = torch.arange(idx.size(1), device=idx.device, dtype=torch.float32)[:, None] * self.inv_freq  # (T, hs/2)
        angles = torch.cat((angles, angles), dim=-1)  # (T, hs), in float32 whatever the autocast
        x = self.model.embed_tokens(idx)  # (B, T, C)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for block in self.model.layers:
            x = self.run_block(block, x, cos, sin)
        return self.model.norm(x)


def build(config):
    return (Llama if config.arch == "llama" else GPT)(config)


# -----------------------------------------------------------------------------
# LoRA adapters (Hu et al., 2021): a frozen model plus a trained low-rank update of its projections

LORA_TARGETS = ("c_attn", "c_proj", "c_fc", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) B A dropout(x): a frozen nn.Linear and a rank-r update of its weight.
    B starts at zero, so a fresh adapter leaves the layer's output unchanged."""

    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.base, self.scale, self.drop = base, alpha / rank, nn.Dropout(dropout)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear draws its own weight

    def forward(self, x):
        return self.base(x) + (self.drop(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scale

    def merged(self):
        """A plain nn.Linear with the weight W + (alpha / r) B A: the same outputs, dropout off."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * self.lora_B @ self.lora_A)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out.to(self.base.weight.device)


def add_lora(model, rank, alpha=0.0, dropout=0.0, targets=LORA_TARGETS):
    """Freeze every weight of model and wrap each nn.Linear named in targets (GPT-2's c_attn,
    c_proj and c_fc; Llama's q, k, v, o, gate, up and down projections) in a LoRALinear;
    alpha 0 means 2 x rank. -> model, changed in place: only the adapters train; model.lora
    records the adapters' shape (and, from plumbing.adapt, where their base is)."""
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name in targets:
                setattr(module, name, LoRALinear(child, rank, alpha or 2 * rank, dropout))
    model.lora = dict(rank=rank, alpha=alpha or 2 * rank, dropout=dropout)
    return model


def merge_lora(model):
    """Fold every adapter into its layer: the plain model again, with its own state-dict names."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    model.lora = None
    return model


def lora_state(model):
    """The adapters' weights alone: what a checkpoint of an adapted model needs beyond its base."""
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}

