"""Removing tokens for AOPC: how many at each fraction k, how, and which tokens may go.

Removal count c(k, n) (`removal=`):
- "nearest" (default): round(k * n) (halves up), clipped to 1..n-1 when n >= 2 (1 when
  n = 1). Every k > 0 removes at least one token and keeps at least one, so no cell is
  degenerate when a probe has two or more candidates.
- "floor": floor(k * n), the original protocol's `int(n * k)`. On short probes it removes
  nothing at small k (comprehensiveness 0, sufficiency the same for every method).
A cell (row, k) is degenerate when c is 0 or n: the ranking cannot matter there; `aopc`
counts them per row.

Removing a token (`replacement=`, see `resolve_replacement`): write a stand-in token id
over it (the tokenizer's mask, unk, pad or eos token, or any id), or "attention": set its
attention mask to 0 while every other token keeps its position id.

Candidates are the tokens that carry a score (not NaN), are real (attention mask 1) and are
not protected. Never a candidate: the explained position itself (for a causal LM the token
AT t whose next-token prediction is explained: removing it would change the question rather
than remove evidence; for a masked LM the mask token; for a classifier the pooled [CLS] or
last token), for causal LMs every position after t (they cannot influence the prediction),
and whatever `protect` marks: by default the special tokens (the same tokens that evidence
alignment never ranks). `n` counts candidates only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from .adapters import ModelAdapter
from .metrics import ranked_positions

log = logging.getLogger(__name__)

FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # the fractions k of AOPC
REMOVALS = ("nearest", "floor")
ReplacementName = Literal["auto", "mask", "unk", "pad", "eos", "attention"]
REPLACEMENTS = get_args(ReplacementName)
# What "auto" tries in order, a rule fixed before any result was looked at: a token the model
# was trained to read in place of a word. A masked LM's mask token is exactly that; a causal
# LM pre-trained on concatenated documents has read its end-of-text token at every document
# boundary (and never reads a pad token it is not trained on); a tokenizer with neither
# deletes by attention mask. docs/replacement.md compares the strategies as a sensitivity
# check only: it did not choose the default.
AUTO_ORDER = ("mask", "eos", "attention")


@dataclass(frozen=True)
class Replacement:
    """How AOPC removes a token: ``strategy`` is "mask", "unk", "pad", "eos" or "token"
    (write ``token_id`` over it) or "attention" (attention mask 0, positions kept;
    ``token_id`` None)."""

    strategy: str
    token_id: int | None = None
    token: str | None = None

    def describe(self) -> str:
        """E.g. ``eos token '<|endoftext|>' (id 0)`` or ``attention mask (positions kept)``."""
        if self.strategy == "attention":
            return "attention mask (positions kept)"
        name = "" if self.token is None else f" {self.token!r}"
        return f"{self.strategy} token{name} (id {self.token_id})"


def resolve_replacement(tokenizer: Any, strategy: str = "auto", *,
                        attention: bool = True) -> Replacement:
    """The removal `strategy` for `tokenizer` (one of `REPLACEMENTS`).

    "mask" / "unk" / "pad" / "eos": that token of the tokenizer (ValueError naming what
    it has if it lacks it); "attention": deletion by attention mask; "auto": the first of
    `AUTO_ORDER` the tokenizer offers (mask token, else eos token, else attention). For a
    model that takes no attention mask (``attention=False``) "auto" falls back to the unk,
    then the pad token instead of attention, and fails if the tokenizer has neither.
    """
    if strategy not in REPLACEMENTS:
        raise ValueError(f"replacement strategy {strategy!r} is not one of {REPLACEMENTS}")
    if strategy == "auto":
        order = AUTO_ORDER if attention else (*AUTO_ORDER[:-1], "unk", "pad")
        strategy = next((s for s in order if s == "attention"
                         or isinstance(getattr(tokenizer, f"{s}_token_id", None), int)), "eos")
    if strategy == "attention":
        return Replacement("attention")
    token_id = getattr(tokenizer, f"{strategy}_token_id", None)
    if not isinstance(token_id, int):
        have = [n for n in ("mask", "unk", "pad", "eos")
                if isinstance(getattr(tokenizer, f"{n}_token_id", None), int)]
        raise ValueError(f"{type(tokenizer).__name__} has no {strategy} token (it has: "
                         f"{', '.join(have) or 'none of mask, unk, pad, eos'}); choose "
                         "another replacement or 'attention'")
    return Replacement(strategy, token_id, getattr(tokenizer, f"{strategy}_token", None))


def as_replacement(replacement: Replacement | int | str, vocab: int) -> Replacement:
    if isinstance(replacement, Replacement):
        found = replacement
    elif replacement == "attention":
        found = Replacement("attention")
    elif isinstance(replacement, int) and not isinstance(replacement, bool):
        found = Replacement("token", replacement)
    else:
        raise ValueError(f"replacement={replacement!r} must be a Replacement (see "
                         "resolve_replacement), a token id or 'attention'")
    if found.strategy != "attention" and not (
        isinstance(found.token_id, int) and 0 <= found.token_id < vocab
    ):
        raise ValueError(f"replacement token id {found.token_id!r} must be a token id in "
                         f"0..{vocab - 1}")
    return found


def special_token_mask(input_ids: Tensor, tokenizer: Any) -> Tensor:
    """[B, T] bool, True on the tokenizer's special tokens (`all_special_ids`)."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=input_ids.dtype)
    return torch.isin(input_ids, special.to(input_ids.device))


def config_special_mask(adapter: ModelAdapter, input_ids: Tensor) -> Tensor | None:
    """Special tokens named by a Hugging Face model's config (bos, eos, pad, sep, cls,
    mask, unk ids), or None when the model has no config."""
    config = getattr(adapter.module, "config", None)
    if config is None:
        return None
    ids = set()
    for name in ("bos", "eos", "pad", "sep", "cls", "mask", "unk"):
        value = getattr(config, f"{name}_token_id", None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, int) and not isinstance(v, bool):
                ids.add(v)
    special = torch.tensor(sorted(ids), dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, special)


def protect_mask(protect, adapter, input_ids: Tensor, tokenizer) -> Tensor | None:
    if protect is None or isinstance(protect, Tensor):
        return protect
    if protect != "special":
        raise ValueError(f"protect={protect!r} must be 'special', a [B, T] bool tensor or None")
    if tokenizer is not None:
        return special_token_mask(input_ids, tokenizer)
    found = config_special_mask(adapter, input_ids)
    if found is None:
        log.warning("aopc: protect='special' but neither a tokenizer nor a model config says "
                    "which tokens are special; none is protected (pass tokenizer=...)")
    return found


def candidate_mask(
    attention_mask: Tensor,
    positions: Tensor,
    scores: Tensor,
    *,
    causal: bool = False,
    protect: Tensor | None = None,
) -> Tensor:
    """[B, T] bool: tokens that may be removed (see the module docstring): the positions
    evidence alignment ranks (`metrics.ranked_positions`, one rule for both) that carry a
    score."""
    valid = attention_mask.bool() & ~torch.isnan(scores)
    return ranked_positions(valid, positions, "causal" if causal else "other", protect)


def ranks(scores: Tensor, candidates: Tensor) -> Tensor:
    """[B, T] long: 0 for the highest-scoring candidate; candidates rank before the rest.

    Descending signed score; equal scores keep position order (stable sorts), so the
    ranking is deterministic.
    """
    key = torch.where(candidates, scores.float(), -torch.inf)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    # Second stable sort on the candidate flag: a candidate scored -inf still precedes
    # a non-candidate.
    flags = candidates.gather(1, order).to(torch.int8)
    order = order.gather(1, torch.sort(flags, dim=1, descending=True, stable=True).indices)
    rank = torch.empty_like(order)
    arange = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return rank.scatter_(1, order, arange)


def removal_counts(n: Tensor, fractions: Sequence[float], removal: str = "nearest") -> Tensor:
    """[K, B] long: how many of each row's `n` [B] candidates fraction k removes (module
    docstring: "nearest" or "floor")."""
    if removal not in REMOVALS:
        raise ValueError(f"removal={removal!r} is not one of {REMOVALS}")
    check_fractions(fractions)
    n = n.double()
    frac = torch.tensor(fractions, dtype=torch.float64, device=n.device)[:, None]
    if removal == "floor":
        # float64 product then floor: exactly Python's int(n * k).
        return torch.floor(frac * n[None, :]).long()
    counts = torch.floor(frac * n[None, :] + 0.5)
    upper = torch.where(n >= 2, n - 1, n)[None, :]
    return torch.minimum(counts.clamp(min=1), upper).clamp(min=0).long()


def removal_masks(
    attention_mask: Tensor,
    positions: Tensor,
    scores: Tensor,
    *,
    fractions: Sequence[float] = FRACTIONS,
    causal: bool = False,
    protect: Tensor | None = None,
    removal: str = "nearest",
) -> tuple[Tensor, Tensor, Tensor]:
    """(comprehensive, sufficient, counts): [K, B, T] bool masks of the tokens each variant
    removes (the top c(k, n) candidates / every other candidate) and the [K, B] counts."""
    candidates = candidate_mask(attention_mask, positions, scores, causal=causal,
                                protect=protect)  # (B, T)
    rank = ranks(scores, candidates)  # (B, T)
    counts = removal_counts(candidates.sum(dim=1), fractions, removal)  # (K, B)
    top = candidates[None] & (rank[None] < counts[:, :, None])  # (K, B, T)
    return top, candidates[None] & ~top, counts


def check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) == 0 or any(
        isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1 for f in fractions
    ):
        raise ValueError(f"fractions={tuple(fractions)!r} must be a non-empty list in (0, 1]")
