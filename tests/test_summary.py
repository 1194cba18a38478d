"""The generated summary: claims follow the stored 95% intervals, or stay at point values."""

from __future__ import annotations

import math

import pandas as pd

from normx_callbacks import load_run
from normx_callbacks.store import SnapshotStore
from normx_callbacks.summary import headline_lines, summary_paragraph

NAN = math.nan


def _store(tmp_path, rows: dict[int, dict[str, tuple]]):
    """A real store whose metrics table holds (value, low, high) per key and step."""
    store = SnapshotStore(tmp_path / "normx")
    for step, metrics in rows.items():
        frame = pd.DataFrame([(k, *v) for k, v in metrics.items()],
                             columns=["key", "value", "low", "high"])
        store.write(step, {"metrics": frame})
    return load_run(tmp_path / "normx")


def _run(tmp_path, ap, low, high, accuracy, spearman):
    rows = {}
    for i, step in enumerate((0, 10, 100)):
        rows[step] = {"alignment/ap": (ap[i], low[i], high[i]),
                      "alignment/ap_random": (0.4, NAN, NAN),
                      "probe/accuracy": (accuracy[i], NAN, NAN),
                      "embedding/norm_logfreq_spearman": (spearman[i], NAN, NAN)}
    return _store(tmp_path, rows)


def test_rose_above_random_only_where_the_interval_says_so(tmp_path):
    # Step 10's point value is above random but its interval is not: the claim waits for 100.
    run = _run(tmp_path, ap=[0.41, 0.5, 0.8], low=[0.3, 0.35, 0.7], high=[0.5, 0.6, 0.9],
               accuracy=[0.5, 0.92, 0.97], spearman=[0.05, 0.4, 0.7])
    text = summary_paragraph(run)
    assert "first rose above its random baseline at step 100" in text
    assert "[0.70, 0.90]" in text
    assert "first reached 0.9 at step 10" in text
    assert "from 0.05 at step 0 to 0.70 at step 100" in text
    assert headline_lines(run)[0].startswith("cue AP:         0.41 [0.30, 0.50] (random 0.40)")


def test_a_rise_that_does_not_last_is_said_to_end(tmp_path):
    run = _run(tmp_path, ap=[0.41, 0.6, 0.45], low=[0.3, 0.5, 0.38], high=[0.5, 0.7, 0.52],
               accuracy=[0.5, 0.6, 0.7], spearman=[0.0, 0.6, 0.1])
    text = summary_paragraph(run)
    assert "first rose above its random baseline at step 10" in text
    assert ("but at the last snapshot (step 100) it is no longer above it (0.45, interval "
            "[0.38, 0.52] vs random 0.40)") in text


def test_never_above_random_with_intervals(tmp_path):
    run = _run(tmp_path, ap=[0.41, 0.5, 0.55], low=[0.3, 0.35, 0.39], high=[0.5, 0.6, 0.7],
               accuracy=[0.5, 0.6, 0.7], spearman=[0.0, 0.6, 0.1])
    text = summary_paragraph(run)
    assert "never rose above its random baseline with 95% confidence" in text
    assert "never reached 0.9 (best 0.70" in text
    assert "did not clearly track" in text and "(highest 0.60 at step 10)" in text


def test_without_intervals_only_point_values_are_stated(tmp_path):
    run = _run(tmp_path, ap=[0.3, 0.5, 0.8], low=[NAN] * 3, high=[NAN] * 3,
               accuracy=[0.5, 0.6, 0.95], spearman=[0.1, 0.2, 0.5])
    text = summary_paragraph(run)
    assert "rose above" not in text
    assert "first above its random baseline at step 10 (0.50 vs 0.40)" in text
    assert "point values only" in text
    assert "[" not in headline_lines(run)[0]


def test_store_without_these_metrics_says_nothing(tmp_path):
    run = _store(tmp_path, {0: {"snapshot/train_seconds": (0.1, NAN, NAN)}})
    assert summary_paragraph(run) == "" and headline_lines(run) == []
