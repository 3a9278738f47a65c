"""A small GPT-style language model for the overhead benchmark: token and position embeddings,
pre-norm blocks of causal self-attention and an MLP, a final norm and an (untied) LM head."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab: int
    seq: int
    width: int
    layers: int
    heads: int
    batch: int  # sequences per training step in the benchmark

    @property
    def params(self) -> int:
        w = self.width
        block = 12 * w * w + 13 * w  # qkv + proj + 2 MLP matrices, their biases, 2 norms
        return 2 * self.vocab * w + self.seq * w + self.layers * block + 2 * w


PRESETS = {
    # The CPU default: a whole benchmark run takes well under 2 minutes on 2 cores.
    "tiny": GPTConfig(vocab=512, seq=64, width=128, layers=2, heads=4, batch=8),
    # About 1.04e9 parameters: the GPU default.
    "1b": GPTConfig(vocab=32768, seq=2048, width=2048, layers=18, heads=16, batch=8),
}


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.fc = nn.Linear(cfg.width, 4 * cfg.width)
        self.out = nn.Linear(4 * cfg.width, cfg.width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width ({cfg.width}) must be a multiple of heads ({cfg.heads})")
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.seq, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))

    def loss(self, idx):
        return lm_loss(self, idx)


def lm_loss(model, idx):
    """Next-token cross-entropy of ``model`` (a GPT, or a wrapper such as DDP around one)."""
    logits = model(idx[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
