"""What one snapshot holds, and the pure builders that turn it into metrics and tables.

A `Snapshot` is what the training thread takes at a scheduled step: only what needs the
model's weights at that step (the probe attribution, the embedding row norms, the
faithfulness rows), already on the CPU. Everything else is built from it by
`SnapshotBuilder` in the writer (`writer.py`, in the helper process by default): the scalars with their bootstrap
intervals, the long-format tables the store keeps, and the one pass over non-finite values
that both the `nonfinite/*` counts and the `nonfinite` table come from.

The builder keeps the little state that spans snapshots (the previous norms and scores, for
drift and rank stability, the first snapshot's per-probe alignment as the structural
reference, and which probes a warning already named); snapshots reach it in step order.

Past 400 lines as one module: the builders of one snapshot's metrics and tables share its
state (previous norms and scores, the alignment reference) and the one non-finite pass.
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
from .encoding import EncodedProbes
from .faithfulness import summarise_faithfulness
from .metrics import (
    alignment_per_probe,
    bootstrap_interval,
    cue_over_attractor,
    group_contrast,
    rank_stability,
    ranked_positions,
    spearman,
    spearman_interval,
)
from .statistics import paired

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
    owner: str  # the driver's name, in what it logs

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
    # Gradient reference of alignment at faithfulness steps: method -> ((B, T) scores, seconds)
    gradient: dict[str, tuple[Tensor, float]] | None = None


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
        # Per-probe alignment of the first snapshot (the untrained model in a training run):
        # the structural reference "above step 0" is tested against (`reference_from_store`
        # restores it after a resume).
        self.reference: pd.DataFrame | None = None

    def build(self, snap: Snapshot) -> Built:
        ctx = self.ctx
        attr = snap.attribution
        previous = self.prev_norms
        if previous is not None and previous.shape != snap.norms.shape:
            previous = None  # the vocabulary was resized: no drift across the change
        embed = summarise_norms(snap.norms, counts=snap.counts, previous=previous,
                                top_k=ctx.top_k, tied=ctx.tied, pairs=snap.pairs)
        nonfinite = _nonfinite(ctx, attr, embed)
        self._per_probe: dict[str, np.ndarray] = {}
        metrics, intervals = self._metrics(attr, embed, nonfinite, snap)
        if snap.faithfulness is not None:
            found, rows = faithfulness_summary(ctx, snap.faithfulness, intervals)
            metrics.update(found)
        metrics["snapshot/train_seconds"] = snap.train_seconds
        tables = build_tables(ctx, attr, embed, snap.counts, self._per_probe)
        if len(nonfinite):
            tables["nonfinite"] = nonfinite
        if snap.faithfulness is not None:
            tables["faithfulness"] = rows
        self.prev_norms = embed.norms
        self.prev_scores = attr.scores
        return Built(metrics, intervals, tables, embed)

    # ------------------------------------------------------------------ metrics

    def _metrics(self, attr: Attribution, embed: EmbeddingSnapshot,
                 nonfinite: pd.DataFrame, snap: Snapshot) -> tuple[dict[str, float],
                                                                   dict[str, tuple[float, float]]]:
        ctx = self.ctx
        enc = ctx.encoded
        intervals: dict[str, tuple[float, float]] = {}
        self._intervals = intervals
        mean = _Mean(intervals)
        m: dict[str, float] = {f"embedding/{k}": v for k, v in embed.stats.items()}
        m["embedding/tied"] = float(embed.tied)
        if embed.drift is not None:
            m["embedding/drift"] = embed.drift
        m.update(_norm_statistics(embed, snap, intervals))
        for word, token_id in ctx.track_ids.items():
            m[f"embedding/track/{word}"] = float(embed.norms[token_id])
        mean(m, "probe/target_prob", attr.target_probs)
        mean(m, "probe/target_logit", attr.target_logits)
        m["probe/probes"] = float(len(attr.target_probs))
        if attr.prediction_depth is not None:
            depth = attr.prediction_depth.double()
            # Over the probes whose target some layer ranks first; the others are counted.
            mean(m, "probe/prediction_depth", depth)
            m["probe/prediction_depth_never"] = float(torch.isnan(depth).sum())
            self._per_probe["prediction_depth"] = depth.numpy()
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
        keep = ranked_positions(attr.valid, attr.positions, ctx.objective, ctx.protect)
        if has_cues:
            m.update(self._alignment(attr, mean, keep, snap))
        if self.prev_scores is not None and self.prev_scores.shape == attr.scores.shape:
            # Over the candidates alignment ranks (the same probes, so the same positions).
            nan = torch.tensor(float("nan"))
            m["stability/spearman"] = rank_stability(torch.where(keep, self.prev_scores, nan),
                                                     torch.where(keep, attr.scores, nan))
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
            log.warning("%s: non-finite values at this snapshot: %d embedding "
                        "norms (token ids %s%s), %d scores, %d target logits (diverging run or "
                        "fp16 overflow?); the store's `nonfinite` table lists them",
                        self.ctx.owner, len(bad_rows), bad_rows[:10], " ..." if len(bad_rows) > 10 else "",
                        counts["score"], counts["target_logit"])
        return m, intervals

    def _alignment(self, attr: Attribution, mean: _Mean, keep: Tensor,
                   snap: Snapshot) -> dict[str, float]:
        """`alignment/*` from the model's last layer (whatever `layers` lists) over the
        candidate positions (`ranked_positions`: never the explained one), its controls (the
        target-minus-foil score, cue over attractor, the first snapshot's value) with paired
        tests, AP per listed layer and of the gradient reference methods; per-probe values
        go to the `probes` table. A probe with cues that cannot enter is named once."""
        ctx = self.ctx
        enc = ctx.encoded
        per_probe = self._per_probe
        last = alignment_per_probe(attr.scores[:, None], enc.cue_mask, keep)
        entered = ~torch.isnan(last["ap"][:, 0])
        rows = torch.arange(len(enc))
        has_cue = enc.cue_mask.any(dim=1)
        at_target = has_cue & ~entered & enc.cue_mask[rows, attr.positions]
        out = {"alignment/probes": float(entered.sum()),
               "alignment/probes_cue_at_target": float(at_target.sum())}
        for key, values in last.items():
            mean(out, f"alignment/{key}", values[:, 0])
            per_probe[key] = values[:, 0].double().numpy()
        self._paired(out, "alignment/ap_vs_random", per_probe["ap"], per_probe["ap_random"])
        logat = alignment_per_probe(attr.logat[:, None], enc.cue_mask, keep)["ap"][:, 0]
        mean(out, "alignment/ap_logat", logat)
        per_probe["ap_logat"] = logat.double().numpy()
        if attr.layer_scores is not None and attr.layers is not None:
            per_layer = alignment_per_probe(attr.layer_scores, enc.cue_mask, keep)["ap"]
            for i, layer in enumerate(attr.layers):
                mean(out, f"alignment/ap_layer{layer}", per_layer[:, i])
        if attr.contrast_scores is not None and bool((enc.foils >= 0).any()):
            # norm x (LogAt(target) - LogAt(foil)): what speaks for the target over the foil,
            # not for the target's word class (NaN without a foil: those probes stay out).
            contrast = alignment_per_probe(attr.contrast_scores[:, None], enc.cue_mask, keep)
            for key in ("ap", "ap_random"):
                name = "ap_contrast" + key[2:]
                per_probe[name] = contrast[key][:, 0].double().numpy()
                mean(out, f"alignment/{name}", contrast[key][:, 0])
            out["alignment/ap_contrast_probes"] = float(np.isfinite(per_probe["ap_contrast"]).sum())
            self._paired(out, "alignment/ap_contrast_vs_random", per_probe["ap_contrast"],
                         per_probe["ap_contrast_random"])
        if enc.attractor_mask is not None:
            win, random = cue_over_attractor(attr.scores[:, None], enc.cue_mask,
                                             enc.attractor_mask, keep)
            per_probe["cue_over_attractor"] = win[:, 0].double().numpy()
            per_probe["cue_over_attractor_random"] = random[:, 0].double().numpy()
            mean(out, "alignment/cue_over_attractor", win[:, 0])
            mean(out, "alignment/cue_over_attractor_random", random[:, 0])
            out["alignment/cue_over_attractor_probes"] = float(torch.isfinite(win).sum())
            self._paired(out, "alignment/cue_over_attractor_vs_random",
                         per_probe["cue_over_attractor"], per_probe["cue_over_attractor_random"])
        self._reference(out, enc.ids)
        for method, (scores, seconds) in (snap.gradient or {}).items():
            self._gradient(out, mean, method, scores, seconds, attr, keep)
        self._name_left_out(enc, entered, at_target)
        return out

    def _reference(self, out: dict[str, float], ids: list[str]) -> None:
        """`alignment/<key>_reference` (the first snapshot's mean) and the paired change
        since then, `alignment/<key>_vs_reference`, for AP, its contrast form and cue over
        attractor."""
        columns = [c for c in REFERENCE_COLUMNS if c in self._per_probe]
        now = pd.DataFrame({c: self._per_probe[c] for c in columns}, index=ids)
        if self.reference is None:
            self.reference = now
        reference = self.reference.reindex(index=ids)
        for column in columns:
            if column not in reference:
                continue
            before = reference[column].to_numpy(dtype=float)
            kept = before[np.isfinite(before)]
            out[f"alignment/{column}_reference"] = float(kept.mean()) if kept.size else NAN
            self._paired(out, f"alignment/{column}_vs_reference", now[column].to_numpy(), before)

    def _gradient(self, out: dict[str, float], mean: _Mean, method: str, scores: Tensor,
                  seconds: float, attr: Attribution, keep: Tensor) -> None:
        """AP of a gradient reference method on the same probes and candidates, against its
        random baseline and against NormXLogit's AP (paired), and how closely NormXLogit's
        ranking follows it (mean per-probe Spearman over the candidates)."""
        enc = self.ctx.encoded
        found = alignment_per_probe(scores.float()[:, None], enc.cue_mask, keep)
        ap = found["ap"][:, 0].double().numpy()
        self._per_probe[f"ap_{method}"] = ap
        mean(out, f"alignment/{method}/ap", found["ap"][:, 0])
        mean(out, f"alignment/{method}/ap_random", found["ap_random"][:, 0])
        self._paired(out, f"alignment/{method}/ap_vs_random", ap,
                     found["ap_random"][:, 0].double().numpy())
        self._paired(out, f"alignment/{method}/normxlogit_minus_method",
                     self._per_probe["ap"], ap)
        nan = torch.tensor(float("nan"))
        out[f"alignment/{method}/spearman"] = rank_stability(
            torch.where(keep, attr.scores, nan), torch.where(keep, scores.float(), nan))
        out[f"alignment/{method}/seconds"] = float(seconds)

    def _paired(self, out: dict[str, float], key: str, a: np.ndarray, b: np.ndarray) -> None:
        found = paired(a, b)
        out[key] = found.mean
        self._intervals[key] = (found.low, found.high)

    def _name_left_out(self, enc: EncodedProbes, entered: Tensor, at_target: Tensor) -> None:
        ids = np.asarray(enc.ids, dtype=object)
        at = sorted(set(ids[at_target.numpy()]) - self.warned_left_out)
        if at:
            log.warning("%s: probe(s) %s have cue words only at the explained "
                        "position, which alignment never ranks (for a causal LM its last-layer "
                        "LogAt is the model's own target logit); they cannot enter alignment/* "
                        "and are counted in alignment/probes_cue_at_target", self.ctx.owner, at)
            self.warned_left_out.update(at)
        other = enc.cue_mask.any(dim=1) & ~entered & ~at_target
        new = sorted(set(ids[other.numpy()]) - self.warned_left_out)
        if new:
            log.warning("%s: probe(s) %s have cue words but none is among the "
                        "ranked positions (a special token, or a non-finite score); they are "
                        "left out of alignment/* (alignment/probes counts those that entered)",
                        self.ctx.owner, new)
            self.warned_left_out.update(new)


REFERENCE_COLUMNS = ("ap", "ap_contrast", "cue_over_attractor")


def reference_from_store(store) -> pd.DataFrame | None:
    """The per-probe reference columns of the first snapshot a store holds (a resumed run's
    structural reference), or None when it holds none or an older store lacks them."""
    steps = store.steps() if store is not None else []
    if not steps:
        return None
    path = store.root / "probes" / f"step={steps[0]:09d}.parquet"
    try:
        table = pd.read_parquet(path)
    except (OSError, ValueError):
        return None
    columns = [c for c in REFERENCE_COLUMNS if c in table.columns]
    if not columns:
        return None
    return table.set_index("probe_id")[columns]


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


def _norm_statistics(embed: EmbeddingSnapshot, snap: Snapshot,
                     intervals: dict[str, tuple[float, float]]) -> dict[str, float]:
    """The paper's first claim over token types: Spearman(norm, log frequency) over types
    seen in training and Spearman(norm, information gain) over types with enough pairs, each
    with a bootstrap interval over the types; never-seen tokens reported apart."""
    norms = embed.norms.double()
    m = {"embedding/norm_logfreq_spearman": embed.norm_logfreq_spearman}
    if snap.counts is not None:
        counts = snap.counts.to(torch.float64)
        seen = counts > 0
        intervals["embedding/norm_logfreq_spearman"] = spearman_interval(
            norms[seen], torch.log(counts[seen]))
        m["embedding/seen_tokens"] = float(seen.sum())
        m["embedding/unseen_tokens"] = float((~seen).sum())
        for name, rows in (("seen", seen), ("unseen", ~seen)):
            values = norms[rows & torch.isfinite(norms)]
            m[f"embedding/{name}_norm_median"] = (float(np.median(values.numpy()))
                                                  if values.numel() else NAN)
    if embed.infogain is not None:
        key = "embedding/norm_infogain_spearman"
        m[key] = embed.norm_infogain_spearman
        intervals[key] = spearman_interval(norms, embed.infogain)
        m["embedding/infogain_types"] = float(torch.isfinite(embed.infogain).sum())
    if snap.pairs is not None:
        m["embedding/bigram_pairs"] = float(snap.pairs.keys.numel())
        m["embedding/bigram_pairs_dropped"] = float(snap.pairs.dropped)
    return m


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
                 counts: Tensor, per_probe: dict[str, np.ndarray] | None = None
                 ) -> dict[str, pd.DataFrame]:
    """The long-format `tokens`, `probes` and `embedding` tables, built column-wise;
    ``per_probe``: each probe's alignment values (columns of `probes`, for paired tests)."""
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
        "is_attractor": (enc.attractor_mask.numpy()[b_idx, t_idx]
                         if enc.attractor_mask is not None else np.zeros(len(b_idx), bool)),
        "is_special": ctx.protect.numpy()[b_idx, t_idx],
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
        **{name: np.asarray(values, dtype=np.float64)
           for name, values in (per_probe or {}).items()},
    })
    embedding = pd.DataFrame({
        "token_id": np.arange(len(embed.norms)),
        "norm": embed.norms.numpy(),
        "count": counts.numpy(),
        "infogain": (embed.infogain.numpy() if embed.infogain is not None
                     else np.full(len(embed.norms), NAN)),
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
