"""Plain-PyTorch language models in the shapes small pre-training runs use (our own code).

`NanoGPT`: learned position embeddings added to token embeddings, pre-LN blocks in
`transformer.h`, `transformer.ln_f`, a bias-free head tied to the token embedding; forward
`(idx, targets=None) -> (logits, loss)`, the last position only when no targets are given.
`LitGPT`: no position embedding, rotary attention, RMSNorm, embeddings scaled by sqrt(d) in
`forward` (outside any module), an untied head; forward `(idx) -> logits`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    vocab_size: int = 97
    block_size: int = 32
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32


class _Attention(nn.Module):
    def __init__(self, c: Config, rotary: bool):
        super().__init__()
        self.n_head, self.rotary = c.n_head, rotary
        self.qkv = nn.Linear(c.n_embd, 3 * c.n_embd, bias=not rotary)
        self.proj = nn.Linear(c.n_embd, c.n_embd, bias=not rotary)

    def forward(self, x, cos=None, sin=None):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        if self.rotary:
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _NanoBlock(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(c.n_embd), nn.LayerNorm(c.n_embd)
        self.attn = _Attention(c, rotary=False)
        self.mlp = nn.Sequential(nn.Linear(c.n_embd, 4 * c.n_embd), nn.GELU(),
                                 nn.Linear(4 * c.n_embd, c.n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(0.1),
            h=nn.ModuleList(_NanoBlock(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx, targets=None):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


class _RMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


class _LitBlock(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.norm_1, self.norm_2 = _RMSNorm(c.n_embd), _RMSNorm(c.n_embd)
        self.attn = _Attention(c, rotary=True)
        self.fc_1 = nn.Linear(c.n_embd, 2 * c.n_embd, bias=False)
        self.fc_2 = nn.Linear(c.n_embd, 2 * c.n_embd, bias=False)
        self.proj = nn.Linear(2 * c.n_embd, c.n_embd, bias=False)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm_1(x), cos, sin)
        h = self.norm_2(x)
        return x + self.proj(F.silu(self.fc_1(h)) * self.fc_2(h))


class LitGPT(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList(_LitBlock(config) for _ in range(config.n_layer)),
            ln_f=_RMSNorm(config.n_embd),
        ))

    def forward(self, idx):
        t, head_dim = idx.shape[1], self.config.n_embd // self.config.n_head
        freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=idx.device) / head_dim)
        angles = torch.outer(torch.arange(t, device=idx.device), freq).repeat(1, 2)
        cos, sin = angles.cos(), angles.sin()
        x = self.transformer.wte(idx) * math.sqrt(self.config.n_embd)
        for block in self.transformer.h:
            x = block(x, cos, sin)
        return self.lm_head(self.transformer.ln_f(x))


class GPTModule(pl.LightningModule):
    """Trains `model(ids)` (or `model(ids, targets)` for NanoGPT) on next-token prediction;
    with `build` the model is created in `configure_model`, as sharded runs do."""

    def __init__(self, model: nn.Module | None = None, build=None, tokenizer=None):
        super().__init__()
        self.model, self.build, self.tokenizer = model, build, tokenizer

    def configure_model(self):
        if self.model is None and self.build is not None:
            self.model = self.build()

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        out = self.model(ids[:, :-1])
        logits = out[0] if isinstance(out, tuple) else out
        if logits.shape[1] == 1:  # NanoGPT without targets: ask for every position
            logits = self.model(ids[:, :-1], ids[:, 1:])[0]
        return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
