"""
A small GPT (GPT-2 architecture) for teacher and student.

Read bottom-up: attention -> MLP -> block -> config -> GPT. Parameter names follow
Hugging Face's GPT2LMHeadModel (transformer.wte, transformer.h.0.attn.c_attn, ...) so
loading GPT-2 weights is a rename-free copy, apart from Conv1D's transposed matrices.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.SCALE_INIT = True
        self.n_head = config.n_head
        self.dropout = config.dropout
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
        x = x + self.mlp(self.ln_2(x))
        return x


GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # Hugging Face names, for from_pretrained


@dataclass
class GPTConfig:
    block_size: int = 64     # context length
    vocab_size: int = 50257  # tokens only: rows that are not tokens would take probability mass
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True


# Named presets. The CPU pair is sized for the embedded domain on a 2-core laptop; their
# vocab_size is set from the data at build time, their context is fixed (the longest
# default example is 83 tokens), and longer data is an error, never a silent truncation.
# The teacher has GPT-2's dropout of 0.1, which keeps it from memorising the default
# domain's wrong labels as fast (README); the 1-layer student has too little capacity to
# overfit, and no dropout.
PRESETS = {
    "teacher": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.1),
    "student": dict(n_layer=1, n_head=2, n_embd=32, block_size=128),
    "student-2l": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),  # the sparse-parity student
    "wide": dict(n_layer=2, n_head=8, n_embd=256, block_size=128),  # the sparse-parity teacher: width learns parity fast
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),          # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),      # 1558M
}


class GPT(nn.Module):
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

    def forward(self, idx, positions=None):
        """idx (B, T) token ids -> logits.

        positions=None: logits at every position, (B, T, V) (what a soft-target teacher needs).
        positions=(B, T) bool mask: logits only where it is True, (N, V) in row-major order.
        Answer tokens are a small share of each sequence, and the vocabulary-sized head is
        the expensive part of the model, so training asks only for the answer positions.
        """
        B, T = idx.size()
        assert T <= self.config.block_size, f"sequence of {T} tokens > block_size {self.config.block_size}"
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if positions is not None:
            x = x[positions]  # (N, C)
        return self.lm_head(x)

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
        config = GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd)
        return cls.from_hf(hf.state_dict(), config)

    def configure_optimizer(self, lr, weight_decay, betas, device_type):
        # decay the matrices of the blocks; no decay on biases, LayerNorms or the (tied)
        # embeddings, which are lookup tables rather than linear maps
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            (decay if p.dim() >= 2 and not name.startswith("transformer.w") else no_decay).append(p)
        groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=(device_type == "cuda"))

    @torch.no_grad()
    def generate(self, idx, lengths, max_new_tokens, stop_id):
        """Greedy decoding of a right-padded batch: row b's prompt is idx[b, :lengths[b]].

        Each row continues at its own position; the padding after it cannot reach an earlier
        position through the causal mask, so no attention mask is needed and no KV cache is
        worth it for answers of a few tokens. Returns one list of new ids per row, stop_id cut.
        """
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


if __name__ == "__main__":
    for name, p in PRESETS.items():
        m = GPT(GPTConfig(**p))
        print(f"{name:12s} {m.num_params() / 1e6:8.1f}M parameters")
