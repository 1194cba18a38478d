"""Evidence-alignment and ranking metrics.

Pure functions: tensors in, tensors or floats out. Positions are the last
dimension ``T``. A position takes part in a row only when it is valid (``valid``
mask, default all) and its score is not NaN; NaN marks padding and positions
after the explained one, and is always ignored.

Ties: rankings use a stable descending sort, so equal scores rank by position
order (the earlier position first). This is deterministic but not neutral: a
cue that ties with a later non-cue position is ranked above it.

Past 400 lines as one module: pure functions over arrays whose definitions depend on each
other (alignment, its exact random baselines and intervals, Spearman and its interval).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

_EULER_GAMMA = 0.5772156649015329


def _work_dtype(scores: Tensor) -> torch.dtype:
    # Half-precision scores are too coarse for softmax sums and precisions.
    return torch.float64 if scores.dtype == torch.float64 else torch.float32


def _prepare(
    scores: Tensor, relevant: Tensor, valid: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Broadcast the three inputs and fold NaN scores into ``valid``."""
    if scores.ndim == 0:
        raise ValueError(f"scores must have a position dimension, got shape {tuple(scores.shape)}")
    if valid is None:
        valid = torch.ones_like(relevant, dtype=torch.bool)
    scores, relevant, valid = torch.broadcast_tensors(
        scores.to(_work_dtype(scores)), relevant.bool(), valid.bool()
    )
    valid = valid & ~torch.isnan(scores)
    return scores, relevant & valid, valid


def _counts(relevant: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """(R, N): relevant-and-valid and valid counts per row, as float32."""
    if relevant.ndim == 0:
        raise ValueError(
            f"relevant must have a position dimension, got shape {tuple(relevant.shape)}"
        )
    if valid is None:
        valid = torch.ones_like(relevant, dtype=torch.bool)
    relevant, valid = torch.broadcast_tensors(relevant.bool(), valid.bool())
    r = (relevant & valid).sum(-1).to(torch.float32)
    n = valid.sum(-1).to(torch.float32)
    return r, n


def average_precision(scores: Tensor, relevant: Tensor, valid: Tensor | None = None) -> Tensor:
    """Average precision of the relevant positions in the descending score ranking.

    Args:
        scores: ``(..., T)`` scores; NaN positions are ignored.
        relevant: ``(..., T)`` bool, the cue positions.
        valid: ``(..., T)`` bool, positions that take part (default: all non-NaN).

    Returns:
        ``(...)`` AP per row; NaN for rows without a relevant valid position.
        Ties rank by position order (stable sort), see the module docstring.
    """
    scores, relevant, valid = _prepare(scores, relevant, valid)
    filled = scores.masked_fill(~valid, float("-inf"))
    # Invalid positions may land anywhere in the sort: ranks below count only
    # valid positions, so they never shift a valid one.
    order = torch.sort(filled, dim=-1, descending=True, stable=True).indices
    rel = relevant.gather(-1, order)
    rank = valid.gather(-1, order).cumsum(-1).clamp(min=1).to(scores.dtype)
    hits = rel.cumsum(-1).to(scores.dtype)
    n_rel = rel.sum(-1).to(scores.dtype)
    precision_sum = torch.where(rel, hits / rank, torch.zeros_like(rank)).sum(-1)
    return torch.where(n_rel > 0, precision_sum / n_rel.clamp(min=1), float("nan"))


def random_average_precision(relevant: Tensor, valid: Tensor | None = None) -> Tensor:
    """Exact expected AP of a uniformly random ranking of the valid positions.

    With ``R`` relevant among ``N`` valid items, position ``k`` holds a relevant
    item with probability ``R/N`` and, given that, each earlier position does
    with probability ``(R-1)/(N-1)``. Hence

        E[AP] = (1/R) sum_{k=1..N} (1/k) [R/N + (k-1) R(R-1) / (N(N-1))]
              = (1/N) [H_N + (R-1)/(N-1) (N - H_N)],

    with ``H_N`` the N-th harmonic number (``N = 1`` gives 1).

    Returns:
        ``(...)`` float32; NaN for rows with ``R = 0``.
    """
    r, n = _counts(relevant, valid)
    h = torch.special.digamma(n + 1) + _EULER_GAMMA  # H_N
    # N - H_N is 0 at N = 1, so the clamp only avoids 0/0.
    expected = (h + (r - 1) / (n - 1).clamp(min=1) * (n - h)) / n.clamp(min=1)
    return torch.where(r > 0, expected, float("nan"))


def dot_product(scores: Tensor, relevant: Tensor, valid: Tensor | None = None) -> Tensor:
    """Softmax of the scores over valid positions, summed over relevant positions.

    Returns:
        ``(...)`` DP per row; NaN for rows without a relevant valid position
        (undefined as an alignment score, and kept out of means like AP).
        Scores must be finite where valid: ``+inf`` gives NaN.
    """
    scores, relevant, valid = _prepare(scores, relevant, valid)
    probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    # where() rather than a product: an all-invalid row softmaxes to NaN.
    dp = torch.where(relevant, probs, torch.zeros_like(probs)).sum(-1)
    return torch.where(relevant.any(-1), dp, float("nan"))


def random_dot_product(relevant: Tensor, valid: Tensor | None = None) -> Tensor:
    """DP under a uniform softmax: ``R / N``; NaN for rows with ``R = 0``. Shape ``(...)``."""
    r, n = _counts(relevant, valid)
    return torch.where(r > 0, r / n.clamp(min=1), float("nan"))


def standardised(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """Scores standardised per row over its valid positions: ``(s - mean) / std``.

    ``std`` is the population standard deviation over the row's valid, non-NaN
    positions; a row whose valid scores are all equal (or has one) becomes 0 there.
    Invalid positions become NaN. Multiplying a row by ``c > 0`` or adding a constant
    leaves the result unchanged.
    """
    if valid is None:
        valid = torch.ones_like(scores, dtype=torch.bool)
    scores, valid = torch.broadcast_tensors(scores.to(_work_dtype(scores)), valid.bool())
    valid = valid & ~torch.isnan(scores)
    zero = torch.zeros_like(scores)
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    mean = torch.where(valid, scores, zero).sum(-1, keepdim=True) / n
    centred = torch.where(valid, scores - mean, zero)
    std = (centred.square().sum(-1, keepdim=True) / n).sqrt()
    z = torch.where(std > 0, centred / std.clamp(min=torch.finfo(scores.dtype).tiny), zero)
    return z.masked_fill(~valid, float("nan"))


def dot_product_z(scores: Tensor, relevant: Tensor, valid: Tensor | None = None) -> Tensor:
    """Scale-free DP: :func:`dot_product` of the per-row :func:`standardised` scores.

    The softmax mass on the relevant positions once each row's scores have mean 0 and
    standard deviation 1, so it reflects where the cues sit in the row's score
    distribution, not how spread out the scores are. Its exact expectation when the
    relevant positions are placed uniformly at random among the valid ones is
    :func:`random_dot_product` (``R / N``): each valid position is relevant with
    probability ``R / N`` and the softmax sums to 1.
    """
    return dot_product(standardised(scores, valid), relevant, valid)


def ranked_positions(
    valid: Tensor, positions: Tensor, objective: str, special: Tensor | None = None
) -> Tensor:
    """``(B, T)`` bool: the candidate positions, which alignment ranks and AOPC removes.

    Real tokens (``valid``) that are not special (``special``, e.g. BOS/EOS), other than
    the explained position ``t``: for a causal LM every position before ``t`` (``idx < t``),
    for any other objective (masked LM, classifier) every position but ``t``.

    Why ``t`` is never a candidate: for a causal LM the last-layer LogAt at ``t`` *is* the
    model's own logit of the target, so ranking it measures the model's confidence, not
    where the evidence sits (and the paper removes it); for a masked LM it is the mask slot,
    which holds no word. Faithfulness (`removal.candidate_mask`) uses this function, so
    both panels rank and remove the same positions.
    """
    b, t = valid.shape
    if tuple(positions.shape) != (b,):
        raise ValueError(f"positions must have shape (B,) = {(b,)}, got {tuple(positions.shape)}")
    positions = positions.to(device=valid.device, dtype=torch.long)
    if positions.numel() and (positions.min() < 0 or positions.max() >= t):
        raise ValueError(f"positions must index [0, {t}), got {positions.tolist()}")
    idx = torch.arange(t, device=valid.device)[None, :]
    keep = valid.bool() & (idx < positions[:, None] if objective == "causal"
                           else idx != positions[:, None])
    if special is not None:
        keep = keep & ~special.bool().to(valid.device)
    return keep


def cue_over_attractor(
    scores: Tensor, cue_mask: Tensor, attractor_mask: Tensor, keep: Tensor
) -> tuple[Tensor, Tensor]:
    """Whether the cue outscores every attractor, per probe and layer, and its random baseline.

    Args:
        scores: ``(B, L, T)`` token scores; NaN is ignored.
        cue_mask, attractor_mask: ``(B, T)`` bool: the cue words, and the words of the wrong
            number or gender (a heuristic that reads the nearest noun would follow them).
        keep: ``(B, T)`` bool, the candidate positions (:func:`ranked_positions`).

    Returns:
        ``(win, random)``, each ``(B, L)``: ``win`` is 1 when the highest-scoring cue
        position scores above the highest-scoring attractor position, 0 when below, and 0.5
        on an exact tie (neither is preferred; the convention of the area under a ROC
        curve); ``random`` is its exact expectation under a uniformly random ranking of the
        candidates, ``r / (r + a)`` with ``r`` cue and ``a`` attractor positions among them
        (the first of the ``r + a`` positions to come up is a cue with that probability).
        Both NaN where a probe has no cue or no attractor among its candidates.
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must have shape (B, L, T), got {tuple(scores.shape)}")
    b, _, t = scores.shape
    for name, mask in (("cue_mask", cue_mask), ("attractor_mask", attractor_mask),
                       ("keep", keep)):
        if tuple(mask.shape) != (b, t):
            raise ValueError(f"{name} must have shape (B, T) = {(b, t)}, got {tuple(mask.shape)}")
    scores = scores.to(_work_dtype(scores))
    keep = keep.bool().to(scores.device)[:, None, :] & ~torch.isnan(scores)  # (B, L, T)
    cues = cue_mask.bool().to(scores.device)[:, None, :] & keep
    attractors = attractor_mask.bool().to(scores.device)[:, None, :] & keep & ~cues
    low = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)
    best_cue = torch.where(cues, scores, low).amax(-1)
    best_attractor = torch.where(attractors, scores, low).amax(-1)
    win = (best_cue > best_attractor).to(scores.dtype) + 0.5 * (best_cue == best_attractor)
    r = cues.sum(-1).to(scores.dtype)
    a = attractors.sum(-1).to(scores.dtype)
    defined = (r > 0) & (a > 0)
    nan = torch.tensor(float("nan"), dtype=scores.dtype, device=scores.device)
    return (torch.where(defined, win, nan),
            torch.where(defined, r / (r + a).clamp(min=1), nan))


ALIGNMENT_KEYS = ("ap", "ap_random", "dp_raw", "dp_z", "dp_random")


def alignment_per_probe(scores: Tensor, cue_mask: Tensor, keep: Tensor) -> dict[str, Tensor]:
    """AP, paper's DP (``dp_raw``), scale-free DP (``dp_z``) and baselines per probe and layer.

    Args:
        scores: ``(B, L, T)`` token scores; NaN is ignored.
        cue_mask: ``(B, T)`` bool, the cue tokens.
        keep: ``(B, T)`` bool, the positions ranked (see :func:`ranked_positions`).

    Returns:
        ``{key: (B, L)}`` for :data:`ALIGNMENT_KEYS`; NaN where a probe has no cue among
        its ranked positions. ``dp_random`` is the exact random baseline of both DPs.
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must have shape (B, L, T), got {tuple(scores.shape)}")
    b, _, t = scores.shape
    for name, mask in (("cue_mask", cue_mask), ("keep", keep)):
        if tuple(mask.shape) != (b, t):
            raise ValueError(f"{name} must have shape (B, T) = {(b, t)}, got {tuple(mask.shape)}")
    cues = cue_mask.bool().to(scores.device)[:, None, :]  # (B, 1, T)
    keep = keep.bool().to(scores.device)[:, None, :] & ~torch.isnan(scores)  # (B, L, T)
    return {
        "ap": average_precision(scores, cues, keep),
        "ap_random": random_average_precision(cues, keep),
        "dp_raw": dot_product(scores, cues, keep),
        "dp_z": dot_product_z(scores, cues, keep),
        "dp_random": random_dot_product(cues, keep),
    }


def evidence_alignment(
    scores: Tensor, cue_mask: Tensor, valid: Tensor, exclude: Tensor | None = None
) -> dict[str, Tensor]:
    """Per-layer alignment of cue positions (:func:`alignment_per_probe`), averaged over probes.

    Args:
        scores: ``(B, L, T)`` token scores per probe and layer; NaN is ignored.
        cue_mask: ``(B, T)`` bool, the cue tokens of each probe.
        valid: ``(B, T)`` bool, the positions ranked (e.g. :func:`ranked_positions`).
        exclude: ``(B,)`` long, a position per probe removed before ranking (a masked
            LM's mask slot); None removes nothing.

    Returns:
        ``{key: (L,)}`` for :data:`ALIGNMENT_KEYS`: the mean over probes with at least
        one cue left (NaN if none has).
    """
    if scores.ndim != 3:
        raise ValueError(f"scores must have shape (B, L, T), got {tuple(scores.shape)}")
    b, _, t = scores.shape
    if tuple(valid.shape) != (b, t):
        raise ValueError(f"valid must have shape (B, T) = {(b, t)}, got {tuple(valid.shape)}")
    keep = valid.bool().to(scores.device)
    if exclude is not None:
        if tuple(exclude.shape) != (b,):
            raise ValueError(f"exclude must have shape (B,) = {(b,)}, got {tuple(exclude.shape)}")
        if exclude.numel() and (exclude.min() < 0 or exclude.max() >= t):
            raise ValueError(f"exclude must index positions in [0, {t}), got {exclude.tolist()}")
        keep = keep & ranked_positions(keep, exclude, "masked")
    per_probe = alignment_per_probe(scores, cue_mask, keep)
    return {k: torch.nanmean(v.to(torch.float32), dim=0) for k, v in per_probe.items()}


def bootstrap_interval(
    values, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampling the values).

    NaN values are dropped first (the caller reports how many entered). Seeded, so the
    same values give the same interval. ``(nan, nan)`` with fewer than 2 values.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    x = x[~np.isnan(x)]
    if x.size < 2:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    if np.isfinite(x).all():
        means = _resample_counts(x.size, n_resamples, seed) @ x / x.size
    else:  # 0 * inf is NaN in a product: resamples without the inf must not see it
        means = x[_resamples(x.size, n_resamples, seed)].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    with np.errstate(invalid="ignore"):  # inf - inf between infinite means: NaN, as it is
        low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@functools.lru_cache(maxsize=16)
def _resamples(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """``(n_resamples, n)`` indices drawn with replacement, seeded (shared by every metric
    over the same number of probes, as one seed per interval would draw them)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


@functools.lru_cache(maxsize=16)
def _resample_counts(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """``(n_resamples, n)``: how often each value is drawn in each resample of
    `_resamples`. A resample's mean is then one row times the values."""
    counts = np.zeros((n_resamples, n))
    np.add.at(counts, (np.arange(n_resamples)[:, None], _resamples(n, n_resamples, seed)), 1.0)
    return counts


def _to_numpy(x: Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).reshape(-1).numpy()


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation over positions where both ``a`` and ``b`` are finite.

    Ties get average ranks. NaN when fewer than 3 pairs remain or either side
    has zero rank variance.
    """
    if a.shape != b.shape:
        raise ValueError(
            f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    x, y = _to_numpy(a), _to_numpy(b)
    both = np.isfinite(x) & np.isfinite(y)
    if both.sum() < 3:
        return math.nan
    rx = rankdata(x[both]) - (both.sum() + 1) / 2
    ry = rankdata(y[both]) - (both.sum() + 1) / 2
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if denom == 0.0:
        return math.nan
    return float(rx @ ry) / denom


SPEARMAN_ELEMENTS = 20_000_000  # resampled values per Spearman interval, at most


def spearman_interval(a: Tensor, b: Tensor, *, confidence: float = 0.95,
                      n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`spearman` over items (e.g. token types),
    resampling the pairs where both are finite; seeded.

    A resample is held as how often each item is drawn, so its ranks come from one sort of
    the items (an item drawn k times is a tie of k, with average ranks, as `rankdata` gives
    the resampled values) and its Spearman is the weighted Pearson of those ranks. Large
    samples take fewer resamples (``SPEARMAN_ELEMENTS // n``, at least 200), so the cost
    stays bounded: their interval is narrow anyway. ``(nan, nan)`` with fewer than 3 pairs.
    """
    x, y = _to_numpy(a), _to_numpy(b)
    both = np.isfinite(x) & np.isfinite(y)
    x, y = x[both], y[both]
    n = x.size
    if n < 3:
        return math.nan, math.nan
    n_resamples = min(n_resamples, max(200, SPEARMAN_ELEMENTS // n))
    rng = np.random.default_rng(seed)
    chunk = max(1, (1 << 22) // n)
    rhos = []
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        if rows == n_resamples:  # one chunk: the same draws at every snapshot, kept
            weights = _spearman_weights(n, n_resamples, seed)
        else:
            weights = _draw_weights(rng, rows, n)
        rx, ry = _weighted_ranks(x, weights), _weighted_ranks(y, weights)
        rx -= (weights * rx).sum(axis=1, keepdims=True) / n
        ry -= (weights * ry).sum(axis=1, keepdims=True) / n
        denom = np.sqrt((weights * rx * rx).sum(axis=1) * (weights * ry * ry).sum(axis=1))
        with np.errstate(invalid="ignore", divide="ignore"):
            rhos.append((weights * rx * ry).sum(axis=1) / denom)
    rhos = np.concatenate(rhos)
    rhos = rhos[np.isfinite(rhos)]  # a resample without rank variance has none
    if rhos.size == 0:
        return math.nan, math.nan
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(rhos, [tail, 100 - tail])
    return float(low), float(high)


def _draw_weights(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """``(rows, n)``: how often each of ``n`` items is drawn in each of ``rows`` resamples."""
    idx = rng.integers(0, n, size=(rows, n))
    flat = (idx + np.arange(rows)[:, None] * n).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


@functools.lru_cache(maxsize=2)
def _spearman_weights(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """`_draw_weights` of a fresh seeded generator, kept for the next snapshot: the norm
    statistics draw over the same number of token types each time (at most ~33 MB each,
    since one chunk holds at most 2**22 values; two kept: seen tokens and information gain).
    Read-only, so no caller can change what the next one gets."""
    weights = _draw_weights(np.random.default_rng(seed), n_resamples, n)
    weights.flags.writeable = False
    return weights


def _weighted_ranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``(R, n)`` average ranks of the items in each resample, ``weights`` ``(R, n)`` how
    often each item is drawn: equal values (and the copies of one item) share the mean of
    the ranks they span."""
    n = values.size
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    group = weights[:, order]
    if starts.size < n:  # ties: one column per group of equal values
        group = np.add.reduceat(group, starts, axis=1)  # (R, G) items per tie group
    rank = np.cumsum(group, axis=1) - group + (group + 1) / 2
    ranks = np.empty_like(weights)
    ranks[:, order] = rank if starts.size == n else np.repeat(rank, np.diff(np.r_[starts, n]),
                                                               axis=1)
    return ranks


def rank_stability(prev: Tensor, cur: Tensor) -> float:
    """Mean over rows of the Spearman correlation between two snapshots' scores.

    Args:
        prev, cur: ``(B, T)`` (or ``(T,)``) scores of the same probes at two steps.

    Returns:
        Mean of the per-row correlations that are defined (see :func:`spearman`);
        NaN when none is.
    """
    if prev.shape != cur.shape:
        raise ValueError(
            f"prev and cur must have the same shape, got {tuple(prev.shape)} and {tuple(cur.shape)}"
        )
    if prev.ndim not in (1, 2):
        raise ValueError(f"prev and cur must have shape (B, T) or (T,), got {tuple(prev.shape)}")
    if prev.ndim == 1:
        prev, cur = prev[None], cur[None]
    x = prev.detach().to("cpu", torch.float64).numpy()
    y = cur.detach().to("cpu", torch.float64).numpy()
    both = np.isfinite(x) & np.isfinite(y)
    # Per row, over the positions finite in both: average ranks, centred (all rows at once).
    rx = rankdata(np.where(both, x, np.nan), axis=1, nan_policy="omit")
    ry = rankdata(np.where(both, y, np.nan), axis=1, nan_policy="omit")
    count = both.sum(axis=1)
    centre = (count + 1) / 2
    rx = np.where(both, rx - centre[:, None], 0.0)
    ry = np.where(both, ry - centre[:, None], 0.0)
    denom = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rhos = (rx * ry).sum(axis=1) / denom
    defined = rhos[(count >= 3) & (denom > 0)]
    return float(defined.mean()) if defined.size else math.nan


def group_contrast(contrast: Tensor, groups: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Accuracy and mean contrast per probe group.

    Args:
        contrast: ``(N,)`` target-minus-foil logit of each probe with a foil.
        groups: the group of each of those probes; ``""`` (no group) is left out.

    Returns:
        ``{group: (accuracy, mean contrast)}``, accuracy the fraction of probes with
        contrast > 0, in order of first appearance; a NaN contrast (a non-finite
        forward) is neither right nor wrong and stays out of both.
    """
    if len(groups) != contrast.shape[0]:
        raise ValueError(f"groups has {len(groups)} entries for {contrast.shape[0]} contrasts")
    out = {}
    for group in dict.fromkeys(g for g in groups if g):
        rows = torch.tensor([g == group for g in groups])
        values = contrast[rows].to(torch.float64)
        values = values[~torch.isnan(values)]
        out[group] = (float((values > 0).double().mean()), float(values.mean()))
    return out
