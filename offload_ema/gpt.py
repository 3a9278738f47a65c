"""A small GPT-style language model for the overhead benchmark: token and position embeddings,
pre-norm blocks of causal self-attention and an MLP, a final norm and an (untied) LM head.

With ``experts`` > 0 each block's MLP is a dense (soft) mixture of that many small expert MLPs,
each with its own four tensors: a model with many parameter tensors (``many``: over 10,000) at a
size a CPU steps quickly, to show what the averaging costs the training thread per tensor."""
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
    experts: int = 0  # > 0: each MLP is a mixture of this many expert MLPs
    expert_hidden: int = 0  # each expert's hidden width; 0: 4 * width / experts (at least 1)

    @property
    def hidden(self) -> int:
        """One expert's hidden width (the MLP's, without experts)."""
        if not self.experts:
            return 4 * self.width
        return self.expert_hidden or max(1, 4 * self.width // self.experts)

    @property
    def params(self) -> int:
        w, h, n = self.width, self.hidden, self.experts
        attn = 4 * w * w + 4 * w + 4 * w  # qkv + proj, their biases, 2 norms
        # The router (no bias) and each expert's two matrices and two biases; or the dense MLP.
        mlp = w * n + n * (2 * w * h + h + w) if n else 2 * w * h + h + w
        return 2 * self.vocab * w + self.seq * w + self.layers * (attn + mlp) + 2 * w

    @property
    def tensors(self) -> int:
        """Parameter tensors: the count the averaging's per-tensor costs scale with."""
        mlp = 1 + 4 * self.experts if self.experts else 4
        return 5 + self.layers * (8 + mlp)  # tok, pos, ln_f (2), head; per block 4 x 2 + MLP


PRESETS = {
    # The CPU default: a whole benchmark run takes well under 2 minutes on 2 cores.
    "tiny": GPTConfig(vocab=512, seq=64, width=128, layers=2, heads=4, batch=8),
    # About 1.04e9 parameters: the GPU default.
    "1b": GPTConfig(vocab=32768, seq=2048, width=2048, layers=18, heads=16, batch=8),
    # tiny with 2 x 1250 experts of hidden width 1: 10,023 parameter tensors, 1.56M parameters.
    # Its step costs per tensor (autograd's gradient accumulation, AdamW's foreach lists): about
    # 0.3 s on 2 idle cores.
    "many": GPTConfig(vocab=512, seq=64, width=128, layers=2, heads=4, batch=8, experts=1250),
}


class Experts(nn.Module):
    """A dense mixture of ``n`` expert MLPs: every token goes through every expert, and their
    outputs are summed weighted by a softmax router. Each expert keeps its own parameters (the
    tensors the benchmark counts), but the forward concatenates them into one wide MLP: a loop
    over thousands of experts would cost the step tens of milliseconds per layer in Python alone,
    and the benchmark is about the averaging's cost per tensor, not the model's."""

    def __init__(self, width: int, n: int, hidden: int):
        super().__init__()
        self.n, self.hidden = n, hidden
        self.router = nn.Linear(width, n, bias=False)
        self.fc = nn.ModuleList(nn.Linear(width, hidden) for _ in range(n))
        self.out = nn.ModuleList(nn.Linear(hidden, width) for _ in range(n))

    def forward(self, x):
        gate = F.softmax(self.router(x), dim=-1)  # (..., n)
        h = F.gelu(F.linear(x, torch.cat([e.weight for e in self.fc]),
                            torch.cat([e.bias for e in self.fc])))  # (..., n * hidden)
        h = (h.unflatten(-1, (self.n, self.hidden)) * gate.unsqueeze(-1)).flatten(-2)
        bias = torch.stack([e.bias for e in self.out])  # (n, width): expert k's, gated by g_k
        return F.linear(h, torch.cat([e.weight for e in self.out], dim=1)) + gate @ bias


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.ln1 = nn.LayerNorm(cfg.width)
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)
        self.ln2 = nn.LayerNorm(cfg.width)
        self.moe = cfg.experts > 0
        if self.moe:
            self.mlp = Experts(cfg.width, cfg.experts, cfg.hidden)
        else:
            self.fc = nn.Linear(cfg.width, cfg.hidden)
            self.out = nn.Linear(cfg.hidden, cfg.width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        h = self.ln2(x)
        return x + (self.mlp(h) if self.moe else self.out(F.gelu(self.fc(h))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ValueError(f"width ({cfg.width}) must be a multiple of heads ({cfg.heads})")
        if cfg.experts < 0 or cfg.expert_hidden < 0:
            raise ValueError(f"experts ({cfg.experts}) and expert_hidden ({cfg.expert_hidden}) "
                             "must be >= 0")
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
