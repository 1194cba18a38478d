"""What one snapshot holds, and the pure builders that turn it into metrics and tables.

A `Snapshot` is what the training thread takes at a scheduled step: only what needs the
model's weights at that step (the probe attribution, the embedding row norms, the
faithfulness rows), already on the CPU. Everything else is built from it by
`SnapshotBuilder` in the snapshot worker (`pipeline.py`): the scalars with their bootstrap
intervals, the long-format tables the store keeps, and the one pass over non-finite values
that both the `nonfinite/*` counts and the `nonfinite` table come from.

The builder keeps the little state that spans snapshots (the previous norms and scores, for
drift and rank stability, and which probes a warning already named); snapshots reach it in
step order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .attribution import Attribution
from .embeddings import EmbeddingSnapshot, PairCounts, summarise_norms
from .faithfulness import summarise_faithfulness
from .metrics import (
    alignment_per_probe,
    bootstrap_interval,
    group_contrast,
    rank_stability,
    ranked_positions,
    spearman,
)
from .probes import EncodedProbes

log = logging.getLogger(__name__)

NAN = float("nan")


@dataclass(frozen=True)
class ProbeContext:
    """What the builders need to know about the probes and the model, fixed at setup."""

    encoded: EncodedProbes
    objective: str  # "causal" or "masked"
    protect: Tensor  # (B, T) bool: special tokens, never ranked, never removed
    tokens: list[list[str]]  # per probe, the token strings
    token_strings: list[str]  # id -> token string, for the whole vocabulary
    text_of: Callable[[Sequence[int]], list[str]]  # ids -> readable token text
    track_ids: dict[str, int]  # tracked word -> token id
    num_layers: int
    faithfulness_methods: tuple[str, ...]
    top_k: int
    tied: bool

    def token(self, token_id: int) -> str:
        strings = self.token_strings
        return strings[token_id] if 0 <= token_id < len(strings) else str(token_id)


@dataclass
class Snapshot:
    """What the training thread measured at one step, on the CPU.

    ``train_seconds`` is the wall time the training thread spent taking it: the probe
    forward (inside the run's precision context, RNG saved and restored), the embedding row
    norms, the faithfulness forwards when due, and the copies to the CPU. A rank's failure
    arrives as ``error`` (the step is then recorded as missing).
    """

    step: int
    final: bool
    attribution: Attribution | None = None
    norms: Tensor | None = None  # (V,) float32 embedding row norms
    counts: Tensor | None = None  # (V,) int64 token counts so far (a copy)
    pairs: PairCounts | None = None  # next-token pair counts so far
    faithfulness: list[pd.DataFrame] | None = None  # per-probe AOPC rows, when due
    train_seconds: float = 0.0
    error: str | None = None
    weights: dict | None = None  # the model's state, when faithfulness runs in the helper


@dataclass
class Built:
    """A snapshot's outputs: scalars (with intervals), store tables, embedding summary."""

    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    tables: dict[str, pd.DataFrame]
    embed: EmbeddingSnapshot
    nonfinite_rows: list[int] = field(default_factory=list)


class SnapshotBuilder:
    """Builds metrics and tables from snapshots taken in step order."""

    def __init__(self, ctx: ProbeContext) -> None:
        self.ctx = ctx
        self.prev_norms: Tensor | None = None
        self.prev_scores: Tensor | None = None
        self.warned_left_out: set[str] = set()

    def build(self, snap: Snapshot) -> Built:
        ctx = self.ctx
        attr = snap.attribution
        embed = summarise_norms(snap.norms, counts=snap.counts, previous=self.prev_norms,
                                top_k=ctx.top_k, tied=ctx.tied)
        nonfinite = _nonfinite(ctx, attr, embed)
        metrics, intervals = self._metrics(attr, embed, nonfinite)
        if snap.faithfulness is not None:
            found, rows = faithfulness_summary(ctx, snap.faithfulness, intervals)
            metrics.update(found)
        metrics["snapshot/train_seconds"] = snap.train_seconds
        tables = build_tables(ctx, attr, embed, snap.counts)
        if len(nonfinite):
            tables["nonfinite"] = nonfinite
        if snap.faithfulness is not None:
            tables["faithfulness"] = rows
        self.prev_norms = embed.norms
        self.prev_scores = attr.scores
        return Built(metrics, intervals, tables, embed)

    # ------------------------------------------------------------------ metrics

    def _metrics(self, attr: Attribution, embed: EmbeddingSnapshot,
                 nonfinite: pd.DataFrame) -> tuple[dict[str, float],
                                                   dict[str, tuple[float, float]]]:
        ctx = self.ctx
        enc = ctx.encoded
        intervals: dict[str, tuple[float, float]] = {}
        mean = _Mean(intervals)
        m: dict[str, float] = {f"embedding/{k}": v for k, v in embed.stats.items()}
        m["embedding/tied"] = float(embed.tied)
        if embed.drift is not None:
            m["embedding/drift"] = embed.drift
        m["embedding/norm_logfreq_spearman"] = embed.norm_logfreq_spearman
        for word, token_id in ctx.track_ids.items():
            m[f"embedding/track/{word}"] = float(embed.norms[token_id])
        mean(m, "probe/target_prob", attr.target_probs)
        mean(m, "probe/target_logit", attr.target_logits)
        m["probe/probes"] = float(len(attr.target_probs))
        has_foil = enc.foils >= 0
        if bool(has_foil.any()):
            rows = torch.arange(len(enc))[has_foil]
            contrast = attr.contrast_logat[rows, attr.positions[rows]].double()
            mean(m, "probe/contrast", contrast)
            # A NaN contrast is neither right nor wrong: it stays out of the accuracy.
            correct = torch.where(torch.isnan(contrast), contrast, (contrast > 0).double())
            mean(m, "probe/accuracy", correct)
            m["probe/accuracy_probes"] = float((~torch.isnan(contrast)).sum())
            groups = [enc.probes[i].group for i in rows.tolist()]
            for group, (accuracy, group_mean) in group_contrast(contrast, groups).items():
                m[f"probe/accuracy/{group}"] = accuracy
                m[f"probe/contrast/{group}"] = group_mean
        has_cues = bool(enc.cue_mask.any())
        without_cues = int((~enc.cue_mask.any(dim=1)).sum())
        if without_cues and has_cues:
            m["alignment/probes_without_cues"] = float(without_cues)  # left out of alignment
        if has_cues:
            m.update(self._alignment(attr, mean))
        if self.prev_scores is not None and self.prev_scores.shape == attr.scores.shape:
            m["stability/spearman"] = rank_stability(self.prev_scores, attr.scores)
        m["importance/norm_logat_spearman"] = spearman(attr.norms[attr.valid],
                                                       attr.logat[attr.valid])
        source = nonfinite["source"]
        counts = {kind: int((source == kind).sum())
                  for kind in ("embedding", "score", "target_logit")}
        m["nonfinite/embedding"] = float(counts["embedding"])
        m["nonfinite/scores"] = float(counts["score"])
        m["nonfinite/logits"] = float(counts["target_logit"])
        if len(nonfinite):
            bad_rows = nonfinite.loc[source == "embedding", "token_id"].tolist()
            log.warning("NormXLogitCallback: non-finite values at this snapshot: %d embedding "
                        "norms (token ids %s%s), %d scores, %d target logits (diverging run or "
                        "fp16 overflow?); the store's `nonfinite` table lists them",
                        len(bad_rows), bad_rows[:10], " ..." if len(bad_rows) > 10 else "",
                        counts["score"], counts["target_logit"])
        return m, intervals

    def _alignment(self, attr: Attribution, mean: _Mean) -> dict[str, float]:
        """`alignment/*` from the model's last layer (whatever `layers` lists) and AP per
        listed layer; a probe with cues that drops out is named once in a warning."""
        ctx = self.ctx
        enc = ctx.encoded
        keep = ranked_positions(attr.valid, attr.positions, ctx.objective, ctx.protect)
        last = alignment_per_probe(attr.scores[:, None], enc.cue_mask, keep)
        entered = ~torch.isnan(last["ap"][:, 0])
        out = {"alignment/probes": float(entered.sum())}
        for key, values in last.items():
            mean(out, f"alignment/{key}", values[:, 0])
        logat = alignment_per_probe(attr.logat[:, None], enc.cue_mask, keep)["ap"][:, 0]
        mean(out, "alignment/ap_logat", logat)
        if attr.layer_scores is not None and attr.layers is not None:
            per_layer = alignment_per_probe(attr.layer_scores, enc.cue_mask, keep)["ap"]
            for i, layer in enumerate(attr.layers):
                mean(out, f"alignment/ap_layer{layer}", per_layer[:, i])
        left_out = [enc.ids[b] for b in
                    torch.nonzero(enc.cue_mask.any(dim=1) & ~entered).flatten().tolist()]
        new = sorted(set(left_out) - self.warned_left_out)
        if new:
            log.warning("NormXLogitCallback: probe(s) %s have cue words but none is among the "
                        "ranked positions (cue only at the explained mask slot, a special "
                        "token, or a non-finite score); they are left out of alignment/* "
                        "(alignment/probes counts those that entered)", new)
            self.warned_left_out.update(new)
        return out


class _Mean:
    """``m[key]`` = mean of per-probe ``values`` (NaN left out), with its seeded bootstrap
    interval over probes recorded in ``intervals``."""

    def __init__(self, intervals: dict[str, tuple[float, float]]) -> None:
        self.intervals = intervals

    def __call__(self, m: dict[str, float], key: str, values: Tensor) -> None:
        values = values.detach().double().cpu().numpy()
        kept = values[~np.isnan(values)]
        m[key] = float(kept.mean()) if kept.size else NAN
        self.intervals[key] = bootstrap_interval(kept)


def faithfulness_summary(ctx: ProbeContext, parts: list[pd.DataFrame],
                         intervals: dict[str, tuple[float, float]]) -> tuple[dict[str, float],
                                                                              pd.DataFrame]:
    """The scalars (intervals into ``intervals``) and the per-probe `faithfulness` table from
    the rows of every group and rank, put in method and probe order first: the seeded
    bootstrap intervals depend on the order, which must not depend on the sharing."""
    methods = {m: i for i, m in enumerate(ctx.faithfulness_methods)}
    probes = {p: i for i, p in enumerate(ctx.encoded.ids)}
    rows = pd.concat(parts, ignore_index=True)
    rows = rows.sort_values(["method", "probe_id"], kind="stable", key=lambda c: c.map(
        methods if c.name == "method" else probes)).reset_index(drop=True)
    table = summarise_faithfulness(rows)
    first = rows[rows["method"] == rows["method"].iloc[0]]
    out = {"faithfulness/probes": float(len(first))}
    for row in table.itertuples(index=False):
        for name in ("comprehensiveness", "sufficiency"):
            key = f"faithfulness/{row.method}/{name}"
            out[key] = float(getattr(row, name))
            intervals[key] = (float(getattr(row, f"{name}_low")),
                              float(getattr(row, f"{name}_high")))
        out[f"faithfulness/{row.method}/seconds_per_instance"] = float(row.seconds_per_instance)
    out["faithfulness/degenerate_cells"] = float(first["degenerate_cells"].sum())
    return out, rows


def metrics_table(metrics: dict[str, float],
                  intervals: dict[str, tuple[float, float]]) -> pd.DataFrame:
    """The store's `metrics` table: key, value and the 95% interval (NaN where none)."""
    bounds = [intervals.get(k, (NAN, NAN)) for k in metrics]
    return pd.DataFrame({"key": list(metrics), "value": list(metrics.values()),
                         "low": [lo for lo, _ in bounds], "high": [hi for _, hi in bounds]})


def build_tables(ctx: ProbeContext, attr: Attribution, embed: EmbeddingSnapshot,
                 counts: Tensor) -> dict[str, pd.DataFrame]:
    """The long-format `tokens`, `probes` and `embedding` tables, built column-wise."""
    enc = ctx.encoded
    layers = list(attr.layers) if attr.layers is not None else [ctx.num_layers]
    n_layers = len(layers)
    lengths = enc.attention_mask.sum(dim=1).tolist()
    # One (probe, layer, position) row per kept token, in probe, layer, position order.
    b_idx = np.concatenate([np.full(n * n_layers, b) for b, n in enumerate(lengths)]
                           ).astype(np.int64)
    k_idx = np.concatenate([np.repeat(np.arange(n_layers), n) for n in lengths]).astype(np.int64)
    t_idx = np.concatenate([np.tile(np.arange(n), n_layers) for n in lengths]).astype(np.int64)

    def per_layer(full: Tensor | None, fallback: Tensor | None) -> np.ndarray:
        if full is not None:
            return full.float().numpy()[b_idx, k_idx, t_idx].astype(np.float64)
        if fallback is not None:
            return fallback.float().numpy()[b_idx, t_idx].astype(np.float64)
        return np.full(len(b_idx), NAN)

    norms = attr.norms.float().numpy()[b_idx, t_idx].astype(np.float64)
    logat = per_layer(attr.layer_logat, attr.logat)
    ids = enc.input_ids.numpy()[b_idx, t_idx]
    flat_tokens = [tok for b, n in enumerate(lengths) for _ in range(n_layers)
                   for tok in ctx.tokens[b][:n]]
    positions = attr.positions.numpy()
    tokens = pd.DataFrame({
        "probe_id": np.asarray(enc.ids, dtype=object)[b_idx],
        "layer": np.asarray(layers, dtype=np.int64)[k_idx],
        "position": t_idx,
        "token_id": ids.astype(np.int64),
        "token": flat_tokens,
        "is_cue": enc.cue_mask.numpy()[b_idx, t_idx],
        "is_explained": t_idx == positions[b_idx],
        "norm": norms,
        "logat": logat,
        "score": (attr.norms.float().numpy()[b_idx, t_idx] * logat.astype(np.float32)
                  ).astype(np.float64),
        "each": per_layer(attr.layer_each, None),
        "contrast": per_layer(attr.layer_contrast, attr.contrast_logat),
    })
    targets = attr.targets.tolist()
    probes = pd.DataFrame({
        "probe_id": enc.ids,
        "text": [p.text for p in enc.probes],
        "group": [p.group for p in enc.probes],
        "position": attr.positions.tolist(),
        "target_id": targets,
        "target": [ctx.token(i) for i in targets],
        "target_given": (enc.targets >= 0).tolist(),
        "target_logit": attr.target_logits.tolist(),
        "target_prob": attr.target_probs.tolist(),
        "foil_id": enc.foils.tolist(),
        # Every piece of the target / foil word; the explained ids are the first that differ.
        "target_tokens": enc.target_tokens,
        "foil_tokens": enc.foil_tokens,
        "contrast": _explained_contrast(attr, enc.foils),
    })
    embedding = pd.DataFrame({
        "token_id": np.arange(len(embed.norms)),
        "norm": embed.norms.numpy(),
        "count": counts.numpy(),
    })
    return {"tokens": tokens, "probes": probes, "embedding": embedding}


def _explained_contrast(attr: Attribution, foils: Tensor) -> np.ndarray:
    """Each probe's contrast at its explained position; NaN for a probe without a foil."""
    if attr.contrast_logat is None:
        return np.full(len(foils), NAN)
    at = attr.contrast_logat[torch.arange(len(foils)), attr.positions].double()
    return torch.where(foils >= 0, at, torch.full_like(at, NAN)).numpy()


def _nonfinite(ctx: ProbeContext, attr: Attribution, embed: EmbeddingSnapshot) -> pd.DataFrame:
    """The one pass over non-finite values: embedding rows, last-layer scores and target
    logits, each with where it is (the `nonfinite` table; its counts are `nonfinite/*`)."""
    enc = ctx.encoded
    rows = [("embedding", None, -1, i, float(embed.norms[i]))
            for i in torch.nonzero(~torch.isfinite(embed.norms)).flatten().tolist()]
    rows += [("score", enc.ids[b], t, int(enc.input_ids[b, t]), float(attr.scores[b, t]))
             for b, t in torch.nonzero(attr.valid & ~torch.isfinite(attr.scores)).tolist()]
    rows += [("target_logit", enc.ids[b], int(attr.positions[b]), int(attr.targets[b]),
              float(attr.target_logits[b]))
             for b in torch.nonzero(~torch.isfinite(attr.target_logits)).flatten().tolist()]
    frame = pd.DataFrame(rows, columns=["source", "probe_id", "position", "token_id", "value"])
    frame.insert(4, "token", [ctx.token(i) for i in frame["token_id"]])
    return frame
