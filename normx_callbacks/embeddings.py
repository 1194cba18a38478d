"""Snapshots of input-embedding row norms, and the token statistics they are compared with.

The paper's premise (through Oyama et al. 2023, "Norm of Word Embedding Encodes
Information Gain") is that pre-training makes a word's embedding norm grow with the
information the word carries: the squared norm approximates its information gain
``IG(w) = KL(p(next | w) || p(next))``, which is not the same as rarity (frequency is a
confound). A snapshot records the norm of every row of the input embedding matrix,
summary statistics, the extreme tokens, how far the embeddings moved since the last
snapshot, and the rank correlations of norm with log frequency and with information gain
in the training batches counted so far (`TokenCounter` counts tokens and next-token pairs;
`information_gain` is the estimator).

Past 400 lines as one module: embedding-norm snapshots, token and next-token pair counting
and information gain are one path (the counts are what the information gain is estimated
from, folded into the same snapshot, on every rank).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from normx_callbacks.metrics import spearman

log = logging.getLogger(__name__)

# Rows per chunk are chosen so a float32 chunk stays near this many elements (64 MiB).
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class EmbeddingSnapshot:
    """Input-embedding norms at one training step."""

    norms: Tensor  # (V,) float32 on CPU: L2 norm of each embedding row
    stats: dict[str, float]  # mean, std (population), min, max, median, p05, p95 of norms
    top: list[tuple[int, float]]  # k largest (token_id, norm), largest first
    bottom: list[tuple[int, float]]  # k smallest (token_id, norm), smallest first
    drift: float | None  # relative change of the norm vector since `previous`; None at first
    norm_logfreq_spearman: float  # Spearman(norm, log count) over seen tokens; NaN if < 3
    tied: bool  # whether input and output embeddings share one matrix
    # (V,) float64 information gain per token type (`information_gain`; NaN below the
    # minimum count), None without pair counts; and Spearman(norm, IG) over those types.
    infogain: Tensor | None = None
    norm_infogain_spearman: float = math.nan


def _row_chunks(weight: Tensor) -> list[Tensor]:
    rows = max(1, _CHUNK_ELEMENTS // max(1, weight.shape[1]))
    return list(weight.split(rows, dim=0))


def _check_matrix(weight: Tensor) -> Tensor:
    if weight.ndim != 2:
        raise ValueError(f"weight must have shape (V, d), got {tuple(weight.shape)}")
    return weight.detach()


@torch.no_grad()
def embedding_norms(weight: Tensor) -> Tensor:
    """L2 norm of each row of ``weight`` ``(V, d)``, as a ``(V,)`` float32 CPU tensor.

    Half-precision matrices are upcast one chunk of rows at a time, so no
    float32 copy of the whole matrix is ever materialised.
    """
    weight = _check_matrix(weight)
    if weight.dtype in (torch.float32, torch.float64):
        norms = torch.linalg.vector_norm(weight, dim=1)
    else:
        norms = torch.cat([torch.linalg.vector_norm(c.float(), dim=1) for c in _row_chunks(weight)])
    return norms.to("cpu", torch.float32)


def _drift(norms: Tensor, previous: Tensor) -> float:
    """``||n_t - n_prev|| / ||n_prev||`` over the row-norm vectors."""
    previous = previous.detach()
    if tuple(previous.shape) != tuple(norms.shape):
        raise ValueError(f"previous norms must have shape ({norms.shape[0]},), got "
                         f"{tuple(previous.shape)}")
    prev = previous.to("cpu", torch.float64)
    denom = float(torch.linalg.vector_norm(prev))
    num = float(torch.linalg.vector_norm(norms.double() - prev))
    return num / denom if denom > 0 else math.nan


def _stats(norms: Tensor) -> dict[str, float]:
    x = norms.double().numpy()
    if x.size == 0:
        return dict.fromkeys(("mean", "std", "min", "max", "median", "p05", "p95"), math.nan)
    p05, median, p95 = np.quantile(x, [0.05, 0.5, 0.95])
    return {
        "mean": float(x.mean()),
        "std": float(x.std()),
        "min": float(x.min()),
        "max": float(x.max()),
        "median": float(median),
        "p05": float(p05),
        "p95": float(p95),
    }


def snapshot_embeddings(
    weight: Tensor,
    *,
    counts: Tensor | None = None,
    previous: Tensor | None = None,
    top_k: int = 20,
    tied: bool = False,
) -> EmbeddingSnapshot:
    """Summarise the input embedding matrix ``weight`` ``(V, d)`` (see `summarise_norms`)."""
    return summarise_norms(embedding_norms(weight), counts=counts, previous=previous,
                           top_k=top_k, tied=tied)


def summarise_norms(
    norms: Tensor,
    *,
    counts: Tensor | None = None,
    previous: Tensor | None = None,
    top_k: int = 20,
    tied: bool = False,
    pairs: PairCounts | None = None,
) -> EmbeddingSnapshot:
    """Summarise the row norms ``(V,)`` of an input embedding matrix (CPU work only: the
    writer calls this on norms the training thread measured).

    Args:
        counts: ``(V,)`` token counts (e.g. :attr:`TokenCounter.counts`); None
            leaves ``norm_logfreq_spearman`` NaN.
        previous: the previous snapshot's ``norms``: ``drift`` is
            ``||n_t - n_prev|| / ||n_prev||``; None gives ``drift=None``.
        top_k: how many largest and smallest rows to list.
        tied: recorded as is; whether the matrix is shared with the LM head.
        pairs: next-token pair counts (:meth:`TokenCounter.pairs`):
            gives ``infogain`` and ``norm_infogain_spearman``.
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    norms = norms.detach().to("cpu", torch.float32)
    vocab = norms.shape[0]
    k = min(top_k, vocab)
    hi = torch.topk(norms, k, largest=True, sorted=True)
    lo = torch.topk(norms, k, largest=False, sorted=True)
    top = [(int(i), float(v)) for i, v in zip(hi.indices, hi.values, strict=True)]
    bottom = [(int(i), float(v)) for i, v in zip(lo.indices, lo.values, strict=True)]
    drift = None if previous is None else _drift(norms, previous)
    rho = math.nan
    if counts is not None:
        if tuple(counts.shape) != (vocab,):
            raise ValueError(f"counts must have shape ({vocab},), got {tuple(counts.shape)}")
        counts = counts.detach().to("cpu")
        seen = counts > 0
        rho = spearman(norms[seen], torch.log(counts[seen].double()))
    infogain, rho_ig = None, math.nan
    if pairs is not None:
        infogain = information_gain(pairs.keys, pairs.counts, vocab)
        rho_ig = spearman(norms.double(), infogain)  # NaN (below the minimum count) left out
    return EmbeddingSnapshot(norms=norms, stats=_stats(norms), top=top, bottom=bottom,
                             drift=drift, norm_logfreq_spearman=rho, tied=tied,
                             infogain=infogain, norm_infogain_spearman=rho_ig)


class PairCounts(NamedTuple):
    """Next-token pairs counted so far: sorted keys ``w * V + next``, their counts (CPU
    int64), and the occurrences dropped past the cap on distinct pairs."""

    keys: Tensor
    counts: Tensor
    dropped: int = 0


INFOGAIN_MIN_COUNT = 20  # a type enters IG only as the first word of this many counted pairs
MAX_PAIRS = 1_000_000  # distinct (word, next word) pairs kept; past it the rarest are dropped
FOLD_KEYS = 1 << 22  # pending pair keys on the device before they are folded (one host sync)


def information_gain(keys: Tensor, counts: Tensor, vocab_size: int, *,
                     min_count: int = INFOGAIN_MIN_COUNT) -> Tensor:
    """Information gain of each token type from next-token pair counts, ``(V,)`` float64.

    ``IG(w) = KL(p(next | w) || p(next))`` (Oyama et al. 2023; for a causal LM the natural
    context of ``w`` is the token after it). Estimator:

    - ``p(next | w) = c(w, next) / n_w``, ``n_w`` the pairs counted with ``w`` first;
      ``p(next) = sum_w c(w, next) / N``, the next-token distribution of the same pairs;
    - the plug-in KL minus the Miller-Madow bias term ``(K_w - 1) / (2 n_w)``, ``K_w`` the
      number of distinct next tokens seen after ``w``: the plug-in estimate of a KL from a
      sample of ``n_w`` is too large by about that much (its entropy part is too small), which
      is what makes rare words look informative;
    - NaN for types with ``n_w < min_count``: with few pairs the estimate is noise.

    Args:
        keys: ``(P,)`` int64 pair keys ``w * V + next``; counts: ``(P,)`` their counts.
    """
    keys = keys.detach().to("cpu", torch.int64)
    counts = counts.detach().to("cpu", torch.float64)
    out = torch.full((vocab_size,), math.nan, dtype=torch.float64)
    if keys.numel() == 0:
        return out
    left, right = keys // vocab_size, keys % vocab_size
    n_w = torch.zeros(vocab_size, dtype=torch.float64).index_add_(0, left, counts)
    column = torch.zeros(vocab_size, dtype=torch.float64).index_add_(0, right, counts)
    p_next = column / column.sum()
    p_cond = counts / n_w[left]
    terms = p_cond * (torch.log(p_cond) - torch.log(p_next[right]))
    kl = torch.zeros(vocab_size, dtype=torch.float64).index_add_(0, left, terms)
    distinct = torch.zeros(vocab_size, dtype=torch.float64).index_add_(
        0, left, torch.ones_like(counts))
    corrected = kl - (distinct - 1) / (2 * n_w.clamp(min=1))
    return torch.where(n_w >= min_count, corrected, out)


class TokenCounter:
    """Token frequencies of the training batches seen so far.

    ``counts`` is a ``(V,)`` int64 CPU tensor. :meth:`update` counts one training batch
    into ``pending`` on the batch's device without a host sync; :meth:`collect` folds
    ``pending`` into ``counts`` at each snapshot (summed over ranks when given a reduce).

    Which tokens a batch holds (:meth:`batch_tokens`):

    - ``count_fn(batch)`` when given: a tensor of token ids (any shape; ids < 0 skipped);
    - a mapping (``dict``, ``BatchEncoding``): ``batch[batch_key]``, with
      ``batch[mask_key]`` as the attention mask when present;
    - a tuple or list: ``batch[batch_key]`` when ``batch_key`` is an int, else the first
      2-D integer tensor (nanoGPT's ``(x, y)``, ``TensorDataset``); ``batch[mask_key]``
      when ``mask_key`` is an int;
    - a bare tensor: the batch itself; any other object: its ``batch_key`` attribute.

    ``masked=True`` (masked-LM pre-training) counts the uncorrupted text: ``labels`` where
    they are not -100, the input ids elsewhere; the mask token and padding are never counted.

    Next-token pairs ``(w, next)`` (for `information_gain`) are counted from the same tokens:
    two adjacent counted positions of one row (the last dimension of the ids; a 1-D
    ``count_fn`` result is one row). Pending pair keys stay on the batch's device and are
    folded into (key, count) pairs there once ``fold_keys`` accumulate (one host sync per
    fold, not per step); `collect` moves them to the CPU. At most ``max_pairs`` distinct
    pairs are kept: past it the rarest are dropped (ties: the larger key), their occurrences
    are counted in ``pairs_dropped`` and one warning says so.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        batch_key: str | int = "input_ids",
        mask_key: str | int | None = "attention_mask",
        labels_key: str | int = "labels",
        masked: bool = False,
        mask_token_id: int | None = None,
        count_fn: Callable[[Any], Tensor] | None = None,
        max_pairs: int = MAX_PAIRS,
        fold_keys: int = FOLD_KEYS,
    ) -> None:
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        for name, value in (("max_pairs", max_pairs), ("fold_keys", fold_keys)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if count_fn is not None and not callable(count_fn):
            raise ValueError(f"count_fn must be a callable batch -> token ids, got {count_fn!r}")
        self.vocab_size = vocab_size
        self.batch_key = batch_key
        self.mask_key = mask_key
        self.labels_key = labels_key
        self.masked = masked
        self.mask_token_id = mask_token_id
        self.count_fn = count_fn
        self.counts = torch.zeros(vocab_size, dtype=torch.int64)
        self.pending: Tensor | None = None  # batches counted since the last `collect`
        self.device = torch.device("cpu")  # where `collect` puts an empty pending histogram
        self.max_pairs = max_pairs
        self.fold_keys = fold_keys
        # Next-token pairs: sorted unique keys w * V + next and their counts (CPU int64).
        self.pair_keys = torch.zeros(0, dtype=torch.int64)
        self.pair_counts = torch.zeros(0, dtype=torch.int64)
        self.pairs_dropped = 0  # pair occurrences dropped past max_pairs
        self._raw_pairs: list[Tensor] = []  # per-batch keys on the device (-1: not a pair)
        self._raw_size = 0
        self._folded: tuple[Tensor, Tensor] | None = None  # device (keys, counts) pending
        self._warned_cap = False

    # ------------------------------------------------------------ reading a batch

    def batch_tokens(self, batch: Any) -> tuple[Tensor, Tensor | None] | None:
        """``(ids, keep)`` of one training batch, or None when no token ids were found.

        ``keep`` is a bool tensor of ``ids``' shape (positions to count) or None (all).
        """
        if self.count_fn is not None:
            ids = self.count_fn(batch)
            if not isinstance(ids, Tensor) or not _is_int(ids):
                raise TypeError(
                    f"count_fn returned {_describe(ids)}; it must return a tensor of token ids"
                )
            return ids, None
        ids = _get(batch, self.batch_key)
        if ids is None and isinstance(batch, (tuple, list)) and not isinstance(self.batch_key, int):
            ids = next((x for x in batch if isinstance(x, Tensor) and x.ndim == 2 and _is_int(x)),
                       None)
        if not isinstance(ids, Tensor) or not _is_int(ids):
            return None
        keep = None
        if self.mask_key is not None:
            mask = _get(batch, self.mask_key)
            if isinstance(mask, Tensor) and mask.shape == ids.shape:
                keep = mask.detach().bool()
        if self.masked:
            labels = _get(batch, self.labels_key)
            if isinstance(labels, Tensor) and labels.shape == ids.shape and _is_int(labels):
                # Corrupted positions carry the original token in labels; the rest are intact.
                ids = torch.where(labels >= 0, labels, ids)
            if self.mask_token_id is not None:
                unmasked = ids != self.mask_token_id
                keep = unmasked if keep is None else keep & unmasked
        return ids, keep

    @torch.no_grad()
    def batch_counts(self, batch: Any) -> Tensor | None:
        """The ``(V,)`` int64 histogram of one batch on its device, no host sync; None when
        the batch holds no token ids this counter can find."""
        found = self.batch_tokens(batch)
        return None if found is None else self._histogram(*found)

    def _histogram(self, ids: Tensor, keep: Tensor | None) -> Tensor:
        ids = ids.detach().reshape(-1).long()
        weights = (ids >= 0) & (ids < self.vocab_size)
        if keep is not None:
            weights = weights & keep.reshape(-1).to(ids.device)
        # scatter_add with 0/1 weights: out-of-range and skipped positions add 0. A boolean
        # index would need a host sync on GPU, and so would `torch.bincount` (it reads the
        # largest id to size its output).
        counts = torch.zeros(self.vocab_size, dtype=torch.long, device=ids.device)
        return counts.scatter_add_(0, ids.clamp(0, self.vocab_size - 1), weights.long())

    @torch.no_grad()
    def batch_pairs(self, batch: Any) -> Tensor | None:
        """``(P,)`` int64 keys ``w * V + next`` of adjacent counted tokens of one batch on
        its device, -1 where a pair is not counted (padding, the mask token, an id outside
        the vocabulary); no host sync. None when the batch holds no token ids."""
        found = self.batch_tokens(batch)
        return None if found is None else self._pair_keys(*found)

    def _pair_keys(self, ids: Tensor, keep: Tensor | None) -> Tensor:
        ids = ids.detach().long()
        rows = ids.reshape(-1, ids.shape[-1]) if ids.ndim else ids.reshape(1, 1)
        ok = (rows >= 0) & (rows < self.vocab_size)
        if keep is not None:
            ok = ok & keep.reshape(rows.shape).to(rows.device)
        both = ok[:, :-1] & ok[:, 1:]
        keys = rows[:, :-1] * self.vocab_size + rows[:, 1:]
        return torch.where(both, keys, torch.full_like(keys, -1)).reshape(-1)

    def update(self, batch: Any) -> None:
        """Count one training batch: its histogram is added to :attr:`pending` and its pair
        keys to the pending pairs, on the batch's device, with no host sync (:meth:`collect`
        folds them into :attr:`counts` and the pair counts)."""
        found = self.batch_tokens(batch)
        if found is not None:
            counts = self._histogram(*found)
            self.pending = counts if self.pending is None else self.pending + counts
            keys = self._pair_keys(*found)
            self._raw_pairs.append(keys)
            self._raw_size += keys.numel()  # a shape: known without a sync
            if self._raw_size >= self.fold_keys:
                self._fold_raw()

    def _fold_raw(self) -> None:
        """The pending raw keys as (unique keys, counts) on their device (one host sync)."""
        if not self._raw_pairs:
            return
        keys, counts = torch.unique(torch.cat(self._raw_pairs), sorted=True,
                                    return_counts=True)
        if self._folded is not None:
            keys, counts = _unique_sum(torch.cat([self._folded[0].to(keys.device), keys]),
                                       torch.cat([self._folded[1].to(keys.device), counts]))
        self._folded = (keys, counts)
        self._raw_pairs, self._raw_size = [], 0

    def carry_from(self, other: TokenCounter) -> None:
        """Go on from ``other``'s folded counts (a checkpoint's, an earlier fit's), also when
        the vocabulary was resized: ids below both sizes keep their token counts and pairs
        (pair keys re-encoded for this vocabulary), ids past this one are dropped."""
        kept = min(self.vocab_size, other.vocab_size)
        self.counts = torch.zeros(self.vocab_size, dtype=torch.int64)
        self.counts[:kept] = other.counts[:kept]
        first, then = other.pair_keys // other.vocab_size, other.pair_keys % other.vocab_size
        inside = (first < self.vocab_size) & (then < self.vocab_size)
        keys = first[inside] * self.vocab_size + then[inside]
        order = torch.argsort(keys)  # still sorted when the vocabulary grew; resorted if not
        self.pair_keys, self.pair_counts = keys[order], other.pair_counts[inside][order]
        self.pairs_dropped = other.pairs_dropped

    def pairs(self) -> PairCounts:
        """The pairs counted up to the last :meth:`collect` (new tensors at each collect, so a
        snapshot may hold them without a copy)."""
        return PairCounts(self.pair_keys, self.pair_counts, self.pairs_dropped)

    def collect(self, reduce: Callable[[Tensor], Tensor] | None = None,
                gather: Callable[[tuple[Tensor, Tensor]], list | None] | None = None) -> Tensor:
        """Fold the pending histogram into :attr:`counts` and return them. ``reduce`` sums a
        ``(V,)`` tensor over ranks (every rank must call this together when given).

        ``gather`` collects every rank's pending pairs ``(keys, counts)`` (CPU) on one rank:
        it returns the list of all ranks' pairs there and None elsewhere; the pairs are kept
        only where the list arrives (the rank that writes), so no pair is counted twice.
        """
        pending = self.pending
        if pending is None:
            pending = torch.zeros(self.vocab_size, dtype=torch.long, device=self.device)
        if reduce is not None:
            pending = reduce(pending)
        self.merge_(pending)
        self.pending = None
        self._fold_raw()
        mine = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
        if self._folded is not None:
            keys, counts = (t.to("cpu") for t in self._folded)
            real = keys >= 0
            mine = (keys[real], counts[real])
        self._folded = None
        parts = [mine] if gather is None else gather(mine)
        if parts is not None:
            self._merge_pairs(parts)
        return self.counts

    def _merge_pairs(self, parts: list[tuple[Tensor, Tensor]]) -> None:
        keys = torch.cat([self.pair_keys, *(k.to(torch.int64) for k, _ in parts)])
        counts = torch.cat([self.pair_counts, *(c.to(torch.int64) for _, c in parts)])
        keys, counts = _unique_sum(keys, counts)
        if keys.numel() > self.max_pairs:
            # The most frequent max_pairs survive; among equal counts the smaller key.
            order = torch.sort(counts, descending=True, stable=True).indices
            kept = torch.sort(order[: self.max_pairs]).values
            dropped = int(counts.sum() - counts[kept].sum())
            self.pairs_dropped += dropped
            if not self._warned_cap:
                self._warned_cap = True
                log.warning("TokenCounter: more than max_pairs=%d distinct next-token pairs; "
                            "the rarest are dropped (%d occurrences so far, counted in "
                            "embedding/bigram_pairs_dropped), so information gain is estimated "
                            "from the pairs kept", self.max_pairs, self.pairs_dropped)
            keys, counts = keys[kept], counts[kept]
        self.pair_keys, self.pair_counts = keys, counts

    def first_batch_problem(self, batch: Any) -> str | None:
        """What is wrong with counting this batch (one host sync; call it once per fit):
        no tokens found, or ids outside the vocabulary (not counted); None when fine."""
        how = ("pass batch_key=<the key or index of the token ids> (mask_key= for the "
               "attention mask), or count_fn=<batch -> token ids> for other batch formats")
        found = self.batch_tokens(batch)
        if found is None or self.pending is None or int(self.pending.sum()) == 0:
            return (f"no tokens were counted in the first training batch (batch_key="
                    f"{self.batch_key!r}); the batch is {_describe(batch)}. Token counts stay 0 "
                    f"and embedding/norm_logfreq_spearman NaN: {how}")
        ids, keep = found
        ids = ids.detach().reshape(-1)
        if keep is not None:
            ids = ids[keep.reshape(-1).to(ids.device)]
        bad = ids[(ids >= self.vocab_size) | ((ids < 0) & (ids != -100))]
        if bad.numel():
            return (f"the first training batch holds token ids outside [0, vocab_size="
                    f"{self.vocab_size}) (min {int(bad.min())}, max {int(bad.max())}); they "
                    "are not counted. Does the tokenizer's vocabulary match the embedding "
                    "matrix?")
        return None

    def merge_(self, other_counts: Tensor) -> None:
        """Add ``other_counts`` ``(V,)`` in place, e.g. the other ranks' counts."""
        if tuple(other_counts.shape) != (self.vocab_size,):
            raise ValueError(
                f"other_counts must have shape ({self.vocab_size},), got {tuple(other_counts.shape)}"
            )
        self.counts += other_counts.detach().to("cpu", torch.int64)

    def state_dict(self) -> dict:
        return {"vocab_size": self.vocab_size, "counts": self.counts.clone(),
                "pair_keys": self.pair_keys.clone(), "pair_counts": self.pair_counts.clone(),
                "pairs_dropped": self.pairs_dropped}

    def load_state_dict(self, state: dict) -> None:
        if state.get("vocab_size") != self.vocab_size:
            raise ValueError(
                f"state vocab_size must be {self.vocab_size}, got {state.get('vocab_size')!r}"
            )
        counts = state["counts"]
        if tuple(counts.shape) != (self.vocab_size,):
            raise ValueError(
                f"state counts must have shape ({self.vocab_size},), got {tuple(counts.shape)}"
            )
        self.counts = counts.detach().to("cpu", torch.int64).clone()
        # Checkpoints from before pairs were counted hold none: counting starts again here.
        empty = torch.zeros(0, dtype=torch.int64)
        self.pair_keys = state.get("pair_keys", empty).detach().to("cpu", torch.int64).clone()
        self.pair_counts = state.get("pair_counts", empty).detach().to("cpu",
                                                                        torch.int64).clone()
        self.pairs_dropped = int(state.get("pairs_dropped", 0))


def _unique_sum(keys: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique ``keys`` and the summed ``counts`` of each (on their device)."""
    unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    summed = torch.zeros(unique.shape, dtype=torch.int64, device=keys.device)
    return unique, summed.index_add_(0, inverse, counts.to(torch.int64))


def _is_int(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _get(batch: Any, key: str | int | None) -> Any:
    """``batch[key]`` for mappings and sequences, the tensor itself, or an attribute."""
    if key is None:
        return None
    try:
        if isinstance(batch, Mapping):
            return batch.get(key)
        if isinstance(batch, (tuple, list)):
            return batch[key] if isinstance(key, int) else None
        if isinstance(batch, Tensor):
            return batch if key in ("input_ids", 0) else None
        return getattr(batch, key, None) if isinstance(key, str) else None
    except (IndexError, KeyError, TypeError):
        return None


def _describe(obj: Any, depth: int = 0) -> str:
    """Types, keys and shapes of a batch, e.g. ``tuple(Tensor[16, 32] int64, ...)``."""
    if isinstance(obj, Tensor):
        return f"Tensor{list(obj.shape)} {str(obj.dtype).removeprefix('torch.')}"
    if depth >= 2:
        return type(obj).__name__
    if isinstance(obj, Mapping):
        items = ", ".join(f"{k!r}: {_describe(v, depth + 1)}" for k, v in list(obj.items())[:8])
        return f"{type(obj).__name__}{{{items}{', ...' if len(obj) > 8 else ''}}}"
    if isinstance(obj, (tuple, list)):
        items = ", ".join(_describe(v, depth + 1) for v in obj[:8])
        return f"{type(obj).__name__}({items}{', ...' if len(obj) > 8 else ''})"
    return type(obj).__name__
