"""Small built-in models for demos and tests, with no dependency beyond torch.

`TinyGPT` is a GPT-style decoder: token + position embeddings, `n_layer` pre-LayerNorm
blocks (hand-written causal self-attention and a GELU MLP), a final LayerNorm and an LM head
whose weight is TIED to the token embedding (the case the pipeline must handle: one
parameter used by the first and the last stage). It traces with `torch.fx.symbolic_trace`.

Example:
    >>> import torch
    >>> m = TinyGPT(vocab_size=64, n_positions=16, n_embd=32, n_head=4, n_layer=2)
    >>> m(torch.randint(0, 64, (3, 8))).shape
    torch.Size([3, 8, 64])
    >>> m.lm_head.weight is m.tok_emb.weight
    True
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["TinyGPT", "CausalSelfAttention", "Block", "tiny_gpt", "demo_gpt"]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask built for the input's sequence length."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # sizes and splits by index, not by unpacking: fx proxies cannot be iterated
        b, t, c = x.size(0), x.size(1), x.size(2)
        qkv = self.qkv(x).split(c, dim=2)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        i = torch.arange(t, device=x.device)  # the mask is built in-graph, so it traces for any t
        future = i.unsqueeze(0) > i.unsqueeze(1)  # [query, key]: key after query
        att = att.masked_fill(future, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        return self.proj(y)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A tiny GPT-style language model; `forward(idx)` returns logits (batch, seq, vocab)."""

    def __init__(self, vocab_size: int = 512, n_positions: int = 64, n_embd: int = 128, n_head: int = 4,
                 n_layer: int = 4):
        super().__init__()
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(n_positions, n_embd)
        self.blocks = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def tiny_gpt(vocab_size: int = 512, n_positions: int = 64, n_embd: int = 128, n_head: int = 4,
             n_layer: int = 4, seed: int | None = 0) -> TinyGPT:
    """Build a TinyGPT with a fixed seed (None: leave the global RNG as it is)."""
    if seed is not None:
        torch.manual_seed(seed)
    return TinyGPT(vocab_size, n_positions, n_embd, n_head, n_layer)


def demo_gpt(kind: str = "auto") -> tuple[nn.Module, str]:
    """The `fxpipe demo` model (4 layers, d=128, 4 heads, vocab 512, 64 positions, no dropout).

    kind: "gpt2" = transformers' GPT2LMHeadModel (random init, nothing downloaded; raises
    ImportError without transformers), "builtin" = TinyGPT, "auto" = gpt2 when transformers
    imports, else builtin. Returns (model, a one-line description).
    """
    if kind not in ("auto", "gpt2", "builtin"):
        raise ValueError(f"kind must be auto, gpt2 or builtin, got {kind!r}")
    if kind != "builtin":
        try:
            from transformers import GPT2Config, GPT2LMHeadModel
        except ImportError:
            if kind == "gpt2":
                raise
        else:
            cfg = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=512, n_positions=64, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
            return GPT2LMHeadModel(cfg), "GPT-2 (transformers, 4 layers, d=128, random init)"
    model = TinyGPT(vocab_size=512, n_positions=64, n_embd=128, n_head=4, n_layer=4)
    return model, "TinyGPT (fxpipe.models, 4 layers, d=128, tied LM head)"
