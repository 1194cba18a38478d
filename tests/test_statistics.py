"""The paired tests behind every "above", "rose" and "first above" the tool writes, on
synthetic per-probe values whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from normx_callbacks.metrics import bootstrap_interval
from normx_callbacks.statistics import (
    ABOVE,
    BELOW,
    SAME,
    change,
    change_word,
    crossing,
    first_sustained,
    paired,
)

N_PROBES = 64
DATASETS = 400


def _verdicts(shift: float, seed: int) -> list[str]:
    """Verdicts of `paired` on DATASETS synthetic sets of per-probe differences with a true
    mean of ``shift`` (probe-level noise of standard deviation 1)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(DATASETS):
        base = rng.normal(0.4, 0.3, N_PROBES)  # e.g. a random baseline per probe
        out.append(paired(base + shift + rng.normal(0.0, 1.0, N_PROBES), base).verdict)
    return out


def test_a_known_shift_is_found_and_no_shift_is_found_at_the_stated_rate():
    # No shift: a 95% interval excludes 0 in about 5% of data sets (either side).
    null = _verdicts(0.0, seed=1)
    false = sum(v != SAME for v in null) / DATASETS
    assert false <= 0.08, false
    # A shift of half a standard deviation over 64 probes: power about 0.98.
    shifted = _verdicts(0.5, seed=2)
    assert sum(v == ABOVE for v in shifted) / DATASETS >= 0.9
    assert BELOW not in shifted
    assert sum(v == BELOW for v in _verdicts(-0.5, seed=3)) / DATASETS >= 0.9


def test_paired_sees_what_two_overlapping_intervals_hide():
    # Every probe gains 0.05 while probes differ by far more among themselves: the two
    # means' intervals overlap, the paired difference does not include 0.
    rng = np.random.default_rng(0)
    before = rng.uniform(0.1, 0.9, N_PROBES)
    after = before + 0.05 + rng.normal(0, 0.01, N_PROBES)
    low_b, high_b = bootstrap_interval(before)
    low_a, high_a = bootstrap_interval(after)
    assert low_a < high_b  # side by side: "no change"
    result = change(pd.Series(before, index=range(N_PROBES)),
                    pd.Series(after, index=range(N_PROBES)))
    assert result.verdict == ABOVE and change_word(result) == "rose"
    assert result.mean == pytest.approx(0.05, abs=0.01)


def test_change_matches_probes_by_id_and_drops_missing_values():
    ids = [f"p{i}" for i in range(20)]
    before = pd.Series(np.linspace(0, 1, 20), index=ids)
    after = (before + 0.3).iloc[::-1]  # another order: matched by id, not by position
    after.iloc[0] = np.nan
    result = change(before, after.drop(index="p3"))
    assert result.n == 18 and result.mean == pytest.approx(0.3)
    assert result.low == pytest.approx(0.3) and result.verdict == ABOVE


def test_no_test_without_two_finite_pairs():
    assert paired([np.nan, 1.0], [0.5, np.nan]).verdict is None
    assert paired([0.7], [0.5]).verdict is None and not paired([0.7], [0.5]).known
    assert math.isnan(paired([], []).mean)
    with pytest.raises(ValueError, match="one value per probe"):
        paired([1.0, 2.0], [1.0, 2.0, 3.0])


def _comparison(verdict: str):
    centre = {ABOVE: 0.2, BELOW: -0.2, SAME: 0.0}[verdict]
    return paired(np.full(8, centre) + np.linspace(-0.01, 0.01, 8), 0.0)


def test_first_above_needs_two_consecutive_snapshots():
    steps = [0, 1, 2, 4, 8, 16]
    pattern = [SAME, ABOVE, SAME, ABOVE, ABOVE, SAME]  # a one-snapshot blip at step 1
    comparisons = [_comparison(v) for v in pattern]
    assert [c.verdict for c in comparisons] == pattern
    assert first_sustained(steps, comparisons) == 4
    assert first_sustained(steps[:4], comparisons[:4]) is None  # only blips
    assert first_sustained(steps, comparisons, BELOW) is None


def test_independent_null_snapshots_rarely_give_a_sustained_crossing():
    # 14 snapshots of no effect each: one-snapshot crossings happen (about 2.5% each side
    # per snapshot), two in a row rarely.
    rng = np.random.default_rng(5)
    steps = list(range(14))
    blips = sustained = 0
    trials = 150
    for _ in range(trials):
        comparisons = [paired(rng.normal(0, 1, N_PROBES), 0.0) for _ in steps]
        blips += any(c.verdict == ABOVE for c in comparisons)
        sustained += first_sustained(steps, comparisons) is not None
    assert sustained / trials <= 0.05 < blips / trials


def test_accuracy_crossing_needs_its_interval_above_the_mark():
    steps = [0, 100, 200, 300]
    accuracy = [0.5, 0.92, 0.94, 0.92]  # at or above 0.9, but 64 probes cannot tell
    per_probe = [np.r_[np.ones(round(a * 64)), np.zeros(64 - round(a * 64))]
                 for a in accuracy]
    assert all(paired(v, 0.9).low < 0 for v in per_probe)
    found = crossing(steps, per_probe, 0.9)
    assert found.reached == 100 and found.step is None
    text = found.sentence("Probe accuracy")
    assert "first reached 0.9 at step 100 (0.92 [" in text and "never lay above" in text
    clear = crossing(steps, [np.zeros(64), np.ones(64), np.ones(64), np.ones(64)], 0.9)
    assert clear.step == 100
    assert "above 0.9 with 95% confidence from step 100" in clear.sentence("Probe accuracy")
