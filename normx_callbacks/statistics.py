"""Paired statistics over the probes: the one module that decides "above", "below", "rose"
and "fell".

The probes are the same at every snapshot and for every method, so every comparison the
tool states is a comparison *of the same probes*: a metric against its random baseline,
one snapshot against another, one method against another. Each is a seeded bootstrap over
probes of the per-probe difference (`metrics.bootstrap_interval`'s resampling), never two
intervals set side by side: two intervals that overlap can still hide a difference every
probe shows, and two that do not overlap say nothing about pairs.

Rules (docs/method.md states them with their reasons):

- **a vs b** (`paired`): the mean over probes of ``a_i - b_i`` with its 95% percentile
  bootstrap interval over the probes where both are finite; "above" when the interval lies
  above 0, "below" when it lies below, "not distinguishable" otherwise. A reference that is
  one number (a mark such as 0.5) is the same test with ``b_i`` constant.
- **change between two snapshots** (`change`): the same test on the probes both hold,
  matched by probe id; its words are "rose", "fell" or "no detectable change".
- **first above X** (`first_sustained`): scanning many snapshots for the first crossing
  would find one by chance; a step counts only when the test says "above" there *and* at
  the next snapshot (two consecutive), and the words name the rule.
- **a mark** (`crossing`, e.g. accuracy 0.9): the first step whose interval lies above the
  mark at two consecutive snapshots; where none does, the first point value at or above it
  is reported with its interval and the words say the interval does not clear the mark.

Where a store lacks the per-probe values (stores written before they were kept), there is
no test: callers state point values and no verdict (`Comparison.known` is False).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .metrics import bootstrap_interval

CONFIDENCE = 0.95
N_RESAMPLES = 2000
SEED = 0
ABOVE, BELOW, SAME = "above", "below", "not distinguishable"
CONSECUTIVE = 2  # snapshots in a row a "first above" claim needs

# Per-probe columns of the store's `probes` table that carry a probe's alignment values.
PROBE_COLUMNS = ("ap", "ap_random", "ap_logat", "ap_contrast", "ap_contrast_random", "dp_z",
                 "dp_raw", "dp_random", "cue_over_attractor", "cue_over_attractor_random",
                 "prediction_depth")


@dataclass(frozen=True)
class Comparison:
    """The paired comparison of two per-probe series: mean difference and its interval."""

    mean: float  # mean over probes of a_i - b_i
    low: float  # 95% bootstrap interval of that mean
    high: float
    n: int  # probes where both values are finite

    @property
    def known(self) -> bool:
        """Whether there is a test at all (at least 2 pairs and a finite interval)."""
        return self.n >= 2 and math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def verdict(self) -> str | None:
        """"above", "below", "not distinguishable", or None when there is no test."""
        if not self.known:
            return None
        if self.low > 0:
            return ABOVE
        if self.high < 0:
            return BELOW
        return SAME

    def interval(self, digits: int = 2, *, signed: bool = True) -> str:
        """E.g. ``+0.12 [+0.05, +0.19]``."""
        sign = "+" if signed else ""
        if not math.isfinite(self.mean):
            return "n/a"
        if not self.known:
            return f"{self.mean:{sign}.{digits}f}"
        return (f"{self.mean:{sign}.{digits}f} [{self.low:{sign}.{digits}f}, "
                f"{self.high:{sign}.{digits}f}]")


NO_TEST = Comparison(math.nan, math.nan, math.nan, 0)


def paired(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray | float,
           *, seed: int = SEED) -> Comparison:
    """Paired bootstrap of ``a_i - b_i`` over the probes where both are finite.

    ``b`` may be one number (a fixed reference such as a mark or 0). The resampling is
    `metrics.bootstrap_interval`'s (seeded, 2000 resamples, percentile interval).
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.broadcast_to(np.asarray(b, dtype=np.float64), a.shape) if np.ndim(b) == 0 else (
        np.asarray(b, dtype=np.float64).reshape(-1))
    if a.shape != b.shape:
        raise ValueError(f"a and b must hold one value per probe, got {a.shape} and {b.shape}")
    both = np.isfinite(a) & np.isfinite(b)
    diff = a[both] - b[both]
    if diff.size == 0:
        return NO_TEST
    low, high = bootstrap_interval(diff, confidence=CONFIDENCE, n_resamples=N_RESAMPLES,
                                   seed=seed)
    return Comparison(float(diff.mean()), low, high, int(diff.size))


def change(before: pd.Series, after: pd.Series, *, seed: int = SEED) -> Comparison:
    """Paired change ``after - before`` over the probes both series hold (indexed by
    probe id)."""
    common = before.index.intersection(after.index)
    return paired(after.loc[common].to_numpy(dtype=float),
                  before.loc[common].to_numpy(dtype=float), seed=seed)


CHANGE_WORDS = {ABOVE: "rose", BELOW: "fell", SAME: "no detectable change"}


def change_word(comparison: Comparison) -> str | None:
    """"rose", "fell", "no detectable change", or None when there is no test."""
    verdict = comparison.verdict
    return None if verdict is None else CHANGE_WORDS[verdict]


def first_sustained(steps: Sequence[int], comparisons: Sequence[Comparison],
                    verdict: str = ABOVE, run: int = CONSECUTIVE) -> int | None:
    """The first step whose comparison says ``verdict`` there and at the ``run - 1``
    snapshots after it (consecutive snapshots); None when no step does."""
    if len(steps) != len(comparisons):
        raise ValueError(f"steps and comparisons differ in length ({len(steps)} and "
                         f"{len(comparisons)})")
    says = [c.verdict == verdict for c in comparisons]
    for i in range(len(steps) - run + 1):
        if all(says[i: i + run]):
            return int(steps[i])
    return None


@dataclass(frozen=True)
class Crossing:
    """When a per-probe mean (e.g. probe accuracy) crossed a mark."""

    mark: float
    step: int | None  # the first step clearing the mark at two consecutive snapshots
    at: Comparison | None  # mean - mark there (interval of the difference)
    reached: int | None  # the first step whose point value is at or above the mark
    reached_at: Comparison | None

    def sentence(self, name: str) -> str:
        """The crossing in words (the mean is ``mark + difference``)."""
        def value(c: Comparison) -> str:
            return (f"{self.mark + c.mean:.2f} [{self.mark + c.low:.2f}, "
                    f"{self.mark + c.high:.2f}]" if c.known else f"{self.mark + c.mean:.2f}")

        if self.step is not None:
            return (f"{name} was above {self.mark:g} with 95% confidence from step {self.step} "
                    f"({value(self.at)}; the first of {CONSECUTIVE} consecutive snapshots whose "
                    f"interval lies above {self.mark:g}).")
        if self.reached is not None:
            return (f"{name} first reached {self.mark:g} at step {self.reached} "
                    f"({value(self.reached_at)}), but its 95% interval never lay above "
                    f"{self.mark:g} at {CONSECUTIVE} consecutive snapshots.")
        return f"{name} never reached {self.mark:g}."


def crossing(steps: Sequence[int], per_probe: Sequence[np.ndarray], mark: float) -> Crossing:
    """The mark's crossing from one per-probe array per step (see the module docstring)."""
    comparisons = [paired(values, mark) for values in per_probe]
    step = first_sustained(steps, comparisons, ABOVE)
    at = comparisons[list(steps).index(step)] if step is not None else None
    means = [float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
             for v in (np.asarray(values, dtype=np.float64) for values in per_probe)]
    reached = next((i for i, m in enumerate(means) if m >= mark), None)
    return Crossing(mark, step, at, None if reached is None else int(steps[reached]),
                    None if reached is None else comparisons[reached])


# ----------------------------------------------------------------------------- a run's values


def probe_values(run, column: str) -> dict[int, pd.Series]:
    """``{step: per-probe values indexed by probe id}`` of a column of the run's `probes`
    table; empty when the store does not keep that column (older stores)."""
    if "probes" not in run:
        return {}
    table = run["probes"]
    if column not in table.columns:
        return {}
    out = {}
    for step, rows in table.groupby("step", sort=True):
        values = pd.to_numeric(rows[column], errors="coerce")
        if values.notna().any():
            out[int(step)] = pd.Series(values.to_numpy(dtype=float),
                                       index=rows["probe_id"].to_numpy())
    return out


def probe_correct(run) -> dict[int, pd.Series]:
    """Per step, 1 where a probe's target logit beats its foil's, 0 where not, NaN without a
    foil or with a non-finite contrast (the store's `contrast` column)."""
    return {step: values.where(values.isna(), (values > 0).astype(float))
            for step, values in probe_values(run, "contrast").items()}


def versus_reference(run, column: str, reference: str) -> dict[int, Comparison]:
    """Per step, the paired comparison of a per-probe column with another (its random
    baseline): ``column_i - reference_i``."""
    values, refs = probe_values(run, column), probe_values(run, reference)
    out = {}
    for step, series in values.items():
        if step in refs:
            common = series.index.intersection(refs[step].index)
            out[step] = paired(series.loc[common].to_numpy(), refs[step].loc[common].to_numpy())
    return out


def versus_step(run, column: str, step: int | None = None) -> dict[int, Comparison]:
    """Per step, the paired change of a per-probe column since ``step`` (default: the first
    snapshot holding it, the untrained model's structural reference)."""
    values = probe_values(run, column)
    if not values:
        return {}
    base = values[min(values)] if step is None else values.get(step)
    if base is None:
        return {}
    return {s: change(base, v) for s, v in values.items()}


def sign_word(low: float, high: float) -> str | None:
    """"positive", "negative" or "not distinguishable from 0" by a 95% interval (e.g. a
    Spearman correlation's bootstrap interval over token types); None without one."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return None
    if low > 0:
        return "positive"
    if high < 0:
        return "negative"
    return "not distinguishable from 0"
