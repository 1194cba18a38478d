"""The generated summary: every "above", "rose" and "first above" is a paired test over the
probes the store keeps per-probe values of; a store without them gets point values only."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from normx_callbacks import load_run
from normx_callbacks.statistics import paired
from normx_callbacks.store import SnapshotStore
from normx_callbacks.summary import headline_lines, summary_paragraph

NAN = math.nan
N = 40
IDS = [f"p{i}" for i in range(N)]


def _store(tmp_path, metrics: dict[int, dict[str, tuple]],
           probes: dict[int, dict[str, np.ndarray]] | None = None):
    """A real store: per step a metrics table of (value, low, high) per key and, when given,
    a probes table with per-probe columns."""
    store = SnapshotStore(tmp_path / "normx")
    for step, rows in metrics.items():
        tables = {"metrics": pd.DataFrame([(k, *v) for k, v in rows.items()],
                                          columns=["key", "value", "low", "high"])}
        if probes is not None:
            tables["probes"] = pd.DataFrame({"probe_id": IDS, **probes[step]})
        store.write(step, tables)
    return load_run(tmp_path / "normx")


def _alignment_run(tmp_path, shifts: dict[int, float], accuracy: dict[int, float]):
    """Per-probe AP = random + shift + noise (the noise's mean is exactly 0, so a shift of 0
    is "not distinguishable"); contrast positive for the first accuracy * N probes."""
    rng = np.random.default_rng(0)
    random = rng.uniform(0.3, 0.5, N)
    noise = rng.normal(0, 0.1, N)
    noise -= noise.mean()
    metrics, probes = {}, {}
    for step, shift in shifts.items():
        ap = random + shift + noise
        right = round(accuracy[step] * N)
        contrast = np.r_[np.full(right, 1.0), np.full(N - right, -1.0)]
        probes[step] = {"ap": ap, "ap_random": random, "contrast": contrast}
        metrics[step] = {"alignment/ap": (ap.mean(), NAN, NAN),
                         "alignment/ap_random": (random.mean(), NAN, NAN),
                         "probe/accuracy": (right / N, NAN, NAN)}
    return _store(tmp_path, metrics, probes)


def test_above_random_is_paired_and_first_above_needs_two_consecutive_snapshots(tmp_path):
    # A blip at step 10 alone; above from step 40 on.
    run = _alignment_run(tmp_path, {0: 0.0, 10: 0.3, 20: 0.0, 40: 0.3, 80: 0.3},
                         {0: 0.5, 10: 0.5, 20: 0.6, 40: 0.9, 80: 0.95})
    text = summary_paragraph(run)
    assert "Cue AP (NormXLogit) at the last snapshot (step 80)" in text
    last = run.probes[run.probes.step == 80]
    test = paired(last.ap.to_numpy(), last.ap_random.to_numpy())
    assert test.low > 0 and f"above it (paired difference {test.interval()} over 40 probes)" in text
    assert "it was first above chance at 2 consecutive snapshots at step 40" in text
    assert "against the untrained model (step 0: " in text and ") rose (+0.30" in text
    assert "Probe accuracy first reached 0.9 at step 40" in text  # 36/40: not above 0.9
    assert "never lay above 0.9" in text
    assert headline_lines(run)[0].endswith(f"vs random (paired) {test.interval()}: above")


def test_a_blip_is_not_a_crossing(tmp_path):
    run = _alignment_run(tmp_path, {0: 0.0, 10: 0.3, 20: 0.0, 40: 0.0},
                         {0: 0.5, 10: 0.5, 20: 1.0, 40: 1.0})
    text = summary_paragraph(run)
    assert "never above chance at 2 consecutive snapshots" in text
    assert "not distinguishable from it" in text and "no detectable change" in text
    assert "Probe accuracy was above 0.9 with 95% confidence from step 20" in text


def test_without_per_probe_values_only_point_values_are_stated(tmp_path):
    metrics = {step: {"alignment/ap": (ap, ap - 0.1, ap + 0.1),
                      "alignment/ap_random": (0.4, NAN, NAN),
                      "probe/accuracy": (acc, NAN, NAN)}
               for step, ap, acc in ((0, 0.3, 0.5), (10, 0.5, 0.6), (100, 0.8, 0.95))}
    text = summary_paragraph(_store(tmp_path, metrics))
    assert "went from 0.30 at step 0 to 0.80 at step 100 (random 0.40)" in text
    assert "no comparison is tested" in text and "point value, no per-probe record" in text
    assert not re.search(r"\b(above|below|rose|fell)\b", text)


def test_norm_claims_say_the_predicted_sign_and_what_is_left_out(tmp_path):
    metrics = {0: {"embedding/norm_infogain_spearman": (0.35, 0.2, 0.5),
                   "embedding/norm_logfreq_spearman": (0.1, -0.1, 0.3),
                   "embedding/unseen_tokens": (396.0, NAN, NAN),
                   "embedding/seen_tokens": (105.0, NAN, NAN),
                   "embedding/unseen_norm_median": (11.0, NAN, NAN),
                   "embedding/seen_norm_median": (8.0, NAN, NAN),
                   "embedding/tied": (1.0, NAN, NAN)}}
    text = summary_paragraph(_store(tmp_path, metrics))
    assert ("Spearman(norm, information gain) is 0.35 [0.20, 0.50] at step 0 (positive: the "
            "predicted sign)") in text
    assert ("Spearman(norm, log frequency) is 0.10 [-0.10, 0.30] at step 0 (not "
            "distinguishable from 0: the predicted sign is not shown)") in text
    assert "396 of 501 embedding rows belong to tokens never seen" in text
    assert "(median norm 11.00, against 8.00 for seen tokens)" in text
    assert "tied" in text


def test_no_sentence_disagrees_with_the_numbers_beside_it(tmp_path):
    # Random shifts: every "above / below / not distinguishable from it (paired difference
    # m [lo, hi]" must agree with the interval it quotes.
    rng = np.random.default_rng(3)
    for trial in range(6):
        shifts = {s: float(rng.normal(0, 0.02)) for s in (0, 1, 2, 4)}
        run = _alignment_run(tmp_path / str(trial), shifts, dict.fromkeys(shifts, 0.5))
        text = summary_paragraph(run)
        found = re.findall(r"(above|below|not distinguishable from) it \(paired difference "
                           r"([+-][\d.]+) \[([+-][\d.]+), ([+-][\d.]+)\]", text)
        assert found, text
        for word, _, low, high in found:
            low, high = float(low), float(high)
            assert word == ("above" if low > 0 else "below" if high < 0
                            else "not distinguishable from"), text
        probes = run.probes[run.probes.step == 4]
        test = paired(probes.ap.to_numpy(), probes.ap_random.to_numpy())
        assert f"paired difference {test.interval()}" in text


def test_store_without_these_metrics_says_nothing(tmp_path):
    run = _store(tmp_path, {0: {"snapshot/train_seconds": (0.1, NAN, NAN)}})
    assert summary_paragraph(run) == "" and headline_lines(run) == []
