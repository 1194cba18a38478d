"""The snapshot builders: tables, metrics with intervals, and the one non-finite pass."""

from __future__ import annotations

import math

import numpy as np
import torch
from training import make_model

from normx_callbacks import ProbeSet, Settings
from normx_callbacks.discovery import find_model
from normx_callbacks.measure import prepare_measurement
from normx_callbacks.snapshot import SnapshotBuilder, metrics_table


def _snapshot(dm, step=0):
    measurement = prepare_measurement(find_model(make_model(dm)), dm.tokenizer,
                                      ProbeSet.coerce(dm.probes),
                                      Settings(layers="all", faithfulness_every=None),
                                      owner="test")
    snap = measurement.take(step, False, faith_due=False)
    snap.counts = torch.arange(dm.vocab_size, dtype=torch.long)
    return measurement.ctx, snap


def test_tables_hold_one_row_per_probe_layer_and_token(dm):
    ctx, snap = _snapshot(dm)
    built = SnapshotBuilder(ctx).build(snap)
    lengths = ctx.encoded.attention_mask.sum(dim=1)
    layers = ctx.num_layers + 1  # "all": the embedding output and every block
    tokens = built.tables["tokens"]
    assert len(tokens) == int(lengths.sum()) * layers
    # Row by row, the long table is the attribution's tensors.
    attr = snap.attribution
    for b, probe_id in enumerate(ctx.encoded.ids):
        rows = tokens[(tokens.probe_id == probe_id) & (tokens.layer == ctx.num_layers)]
        n = int(lengths[b])
        assert rows.position.tolist() == list(range(n))
        np.testing.assert_allclose(rows.score, attr.scores[b, :n].double(), rtol=1e-6)
        assert rows.is_explained.tolist() == [t == int(attr.positions[b]) for t in range(n)]
    assert built.tables["probes"].probe_id.tolist() == list(ctx.encoded.ids)
    assert built.tables["embedding"]["count"].tolist() == list(range(dm.vocab_size))
    assert "nonfinite" not in built.tables


def test_probe_averages_carry_intervals_and_history_metrics_need_a_previous_snapshot(dm):
    ctx, snap = _snapshot(dm)
    builder = SnapshotBuilder(ctx)
    first = builder.build(snap)
    assert "embedding/drift" not in first.metrics and "stability/spearman" not in first.metrics
    low, high = first.intervals["probe/target_prob"]
    assert low <= first.metrics["probe/target_prob"] <= high
    table = metrics_table(first.metrics, first.intervals)
    assert math.isnan(table.set_index("key").loc["embedding/mean", "low"])  # not a probe average
    second = builder.build(_snapshot(dm, step=1)[1])  # the same weights: nothing moved
    assert second.metrics["embedding/drift"] == 0.0
    assert second.metrics["stability/spearman"] == 1.0


def test_one_nonfinite_pass_feeds_both_the_counts_and_the_table(dm):
    ctx, snap = _snapshot(dm)
    snap.norms[[3, 7]] = float("nan")
    snap.norms[11] = float("inf")
    b, t = 1, int(snap.attribution.positions[1]) - 1
    snap.attribution.scores[b, t] = float("nan")
    snap.attribution.target_logits[2] = float("-inf")
    built = SnapshotBuilder(ctx).build(snap)
    table = built.tables["nonfinite"]
    assert built.metrics["nonfinite/embedding"] == 3 == (table.source == "embedding").sum()
    assert built.metrics["nonfinite/scores"] == 1 == (table.source == "score").sum()
    assert built.metrics["nonfinite/logits"] == 1 == (table.source == "target_logit").sum()
    assert sorted(table[table.source == "embedding"].token_id) == [3, 7, 11]
    score = table[table.source == "score"].iloc[0]
    assert (score.probe_id, score.position) == (ctx.encoded.ids[b], t)
