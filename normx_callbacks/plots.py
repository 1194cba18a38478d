"""Heatmaps of token scores: shared by the dashboards and the post-hoc report.

Every figure uses a diverging colour scale centred at zero (LogAt and NormXLogit
are signed), labels its axes with layers or training steps, and carries a
colour bar. Functions return matplotlib figures; callers close them.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: dashboards and reports render to files

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

CMAP = "RdBu_r"  # red = supports the prediction, blue = argues against it


def _centred_norm(values: np.ndarray) -> TwoSlopeNorm:
    finite = values[np.isfinite(values)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    bound = bound if bound > 0 else 1.0
    return TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)


def _heatmap(
    values: np.ndarray,
    tokens: Sequence[str],
    row_labels: Sequence[str],
    *,
    ylabel: str,
    title: str,
    label: str,
    cues: Sequence[bool] | None = None,
) -> Figure:
    values = np.asarray(values, dtype=np.float64)
    rows, cols = values.shape
    width = min(2.0 + 0.45 * cols, 18.0)
    height = min(1.6 + 0.32 * rows, 12.0)
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    masked = np.ma.masked_invalid(values)
    image = ax.imshow(masked, aspect="auto", cmap=CMAP, norm=_centred_norm(values),
                      interpolation="nearest")
    ax.set_xticks(range(cols))
    ax.set_xticklabels(list(tokens), rotation=60, ha="right", fontsize=8)
    if cues is not None:
        for tick, is_cue in zip(ax.get_xticklabels(), cues, strict=False):
            if is_cue:
                tick.set_fontweight("bold")
                tick.set_color("darkgreen")
    step = max(1, rows // 16)
    ax.set_yticks(range(0, rows, step))
    ax.set_yticklabels([row_labels[i] for i in range(0, rows, step)], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_xlabel("token (cue words in bold green)" if cues is not None else "token")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label, fraction=0.04, pad=0.02)
    fig.tight_layout()
    return fig


def layer_heatmap(
    scores: np.ndarray,
    tokens: Sequence[str],
    layers: Sequence[int],
    *,
    title: str = "",
    label: str = "NormXLogit",
    cues: Sequence[bool] | None = None,
) -> Figure:
    """Tokens x layers at one step. scores: [K, T] (NaN for padding)."""
    return _heatmap(scores, tokens, [str(layer) for layer in layers], ylabel="layer",
                    title=title, label=label, cues=cues)


def history_heatmap(
    scores: np.ndarray,
    tokens: Sequence[str],
    steps: Sequence[int],
    *,
    title: str = "",
    label: str = "NormXLogit",
    cues: Sequence[bool] | None = None,
) -> Figure:
    """Tokens x snapshots: how importance emerged. scores: [S, T]."""
    return _heatmap(scores, tokens, [str(s) for s in steps], ylabel="training step",
                    title=title, label=label, cues=cues)


def norm_histogram(norms_by_step: Sequence[np.ndarray], steps: Sequence[int]) -> Figure:
    """Embedding-norm distribution at several steps (one outline per step)."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    colours = plt.cm.viridis(np.linspace(0, 1, max(len(steps), 1)))
    for norms, step, colour in zip(norms_by_step, steps, colours, strict=True):
        finite = np.asarray(norms)[np.isfinite(norms)]
        ax.hist(finite, bins=50, histtype="step", color=colour, label=f"step {step}")
    ax.set_xlabel("input-embedding row norm")
    ax.set_ylabel("tokens")
    if len(steps) <= 8:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def metric_curves(
    series: dict[str, tuple[Sequence[int], Sequence[float]]],
    *,
    title: str = "",
    ylabel: str = "",
) -> Figure:
    """Line plot of several named series against training step."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, (steps, values) in series.items():
        style = "--" if "random" in name else "-"
        ax.plot(steps, values, style, marker="o", markersize=3, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    if any(s > 0 for steps, _ in series.values() for s in steps):
        ax.set_xscale("symlog", linthresh=1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
