"""The report's and notebooks' figures of a loaded run, drawn with matplotlib.

`emergence_heatmap` (a probe's scores across snapshots), `layer_view`, `target_curve`,
`metric_history`, `alignment_curves`, `norm_distribution`, `norm_frequency` and
`layer_figure` return matplotlib `Figure` objects built without pyplot: importing this module
selects no backend (a notebook's stays as it is) and a figure needs no closing; `pages.py`
embeds them as PNG. The colour rule is the dashboards' (`images.py`).

Past 400 lines as one module: every figure of a loaded run shares the label, colour and
step-axis helpers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

from .images import ROW_SCALE_LABEL, display_token, row_scaled, score_bound

CMAP = "RdBu_r"  # red = supports the prediction, blue = argues against it
RUN_COLOURS = matplotlib.colormaps["tab10"].colors  # run i has colour i in every comparison
KEY_STYLES = ("-o", "--s", ":^", "-.v", "-D", "--x")  # several keys of one run's colour


def _subplots(*args, figsize, dpi=100, **kwargs):
    """`pyplot.subplots` without pyplot: a Figure of its own, no backend chosen."""
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(*args, **kwargs)


def _centred_norm(values: np.ndarray) -> TwoSlopeNorm:
    bound = score_bound(values)
    return TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)


def _heatmap_figure(
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
    fig, ax = _subplots(figsize=(width, height), dpi=100)
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


def layer_figure(
    scores: np.ndarray,
    tokens: Sequence[str],
    layers: Sequence[int],
    *,
    title: str = "",
    label: str = "NormXLogit",
    cues: Sequence[bool] | None = None,
) -> Figure:
    """`layer_heatmap` as a matplotlib figure, for the report and ``normx attribute --html``.

    ``tokens`` are matplotlib labels: pass them through `display_token`.
    """
    return _heatmap_figure(scores, tokens, [str(layer) for layer in layers], ylabel="layer",
                           title=title, label=label, cues=cues)


def metric_curves(
    series: dict[str, tuple[Sequence[int], Sequence[float]]],
    *,
    title: str = "",
    ylabel: str = "",
    colours: dict[str, object] | None = None,
    styles: dict[str, str] | None = None,
    bands: dict[str, tuple[Sequence[int], Sequence[float], Sequence[float]]] | None = None,
) -> Figure:
    """Line plot of several named series against training step.

    ``colours`` / ``styles``: per series name (e.g. one colour per run, one style per key);
    ``bands`` (same names: steps, low, high) are drawn as shaded 95% intervals in the
    series' colour.
    """
    fig, ax = _subplots(figsize=(6, 3.5), dpi=100)
    for name, (steps, values) in series.items():
        style = (styles or {}).get(name, "--o" if "random" in name else "-o")
        line, = ax.plot(steps, values, style, markersize=3, label=name,
                        color=(colours or {}).get(name))
        if bands and name in bands:
            ax.fill_between(*bands[name], color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_ylabel(ylabel)
    _symlog_steps(ax, [s for steps, _ in series.values() for s in steps])
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------- figures of a loaded run
# The notebook API: each takes `RunData` from `load_run` and returns a Figure. `normx report` embeds exactly these figures.


def run_labels(runs) -> list[str]:
    """Short distinct names for runs: the shortest path suffix (above the store) that differs."""
    runs = _as_runs(runs)
    if len(runs) == 1:
        return [""]
    # A run written beside another run's store (`normx-<8 hex>`) is named by its store too.
    parts = [run.path.resolve().parent.parts
             + ((run.path.name,) if re.search(r"-[0-9a-f]{8}$", run.path.name) else ())
             for run in runs]
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"run {i}" for i in range(len(runs))]


def _as_runs(runs) -> list:
    return [runs] if hasattr(runs, "tables") else list(runs)


def _labels(runs: list, labels: Sequence[str] | None) -> list[str]:
    if labels is None:
        return run_labels(runs)
    if len(labels) != len(runs):
        raise ValueError(f"labels has {len(labels)} entries for {len(runs)} runs")
    return list(labels)


def _named(label: str, name: str) -> str:
    return f"{label}: {name}" if label else name


def _probe_all(run, probe_id: str):
    """Token rows of one probe, every step and layer."""
    if "tokens" not in run:
        raise ValueError(f"{run.path} has no 'tokens' table; available: {sorted(run.tables)}")
    tokens = run["tokens"]
    rows = tokens[tokens["probe_id"] == probe_id]
    if rows.empty:
        known = list(dict.fromkeys(tokens["probe_id"]))
        raise ValueError(f"probe_id={probe_id!r} is not in {run.path}; probes: {known[:12]}"
                         + (" ..." if len(known) > 12 else ""))
    return rows


def _probe_rows(run, probe_id: str, layer: int | None):
    """Token rows of one probe at one layer (default: the last recorded layer)."""
    rows = _probe_all(run, probe_id)
    layers = sorted(int(x) for x in rows["layer"].unique())
    layer = layers[-1] if layer is None else layer
    if layer not in layers:
        raise ValueError(f"layer={layer!r} is not recorded for {probe_id!r}; layers: {layers}")
    return rows[rows["layer"] == layer], layer


def nearest_step(steps: Sequence[int], step: int | None) -> int:
    """``step`` if recorded, else the last recorded step before it (or the first); None: last."""
    steps = sorted(int(s) for s in steps)
    if not steps:
        raise ValueError("the run has no snapshots")
    if step is None:
        return steps[-1]
    before = [s for s in steps if s <= step]
    return before[-1] if before else steps[0]


def _strip(rows, step: int) -> tuple[list[str], list[bool]]:
    at = rows[rows["step"] == step].sort_values("position")
    return [display_token(t) for t in at["token"]], [bool(c) for c in at["is_cue"]]


def emergence_heatmap(run, probe_id: str, *, layer: int | None = None,
                      title: str | None = None) -> Figure:
    """Training step x token: NormXLogit of one probe at ``layer`` (default last) per snapshot."""
    rows, layer = _probe_rows(run, probe_id, layer)
    matrix = rows.pivot(index="step", columns="position", values="score").sort_index()
    tokens, cues = _strip(rows, int(matrix.index[-1]))
    if title is None:
        title = f"{probe_id}: NormXLogit (layer {layer}) over training"
    return _heatmap_figure(row_scaled(matrix.to_numpy()), tokens,
                           [str(int(s)) for s in matrix.index], ylabel="training step",
                           title=title, label=f"NormXLogit: {ROW_SCALE_LABEL}", cues=cues)


def layer_view(run, probe_id: str, step: int | None = None, *, title: str | None = None) -> Figure:
    """Layer x token: NormXLogit of one probe at every recorded layer at ``step`` (default last)."""
    rows = _probe_all(run, probe_id)
    step = nearest_step(rows["step"].unique(), step)
    rows = rows[rows["step"] == step]
    matrix = rows.pivot(index="layer", columns="position", values="score").sort_index()
    last = rows[rows["layer"] == matrix.index[-1]]
    labels, cues = _strip(last, step)
    if title is None:
        title = f"{probe_id}, step {step}: NormXLogit per layer"
    return layer_figure(matrix.to_numpy(), labels, [int(x) for x in matrix.index],
                        title=title, cues=cues)


def _symlog_steps(ax, steps) -> None:
    """Training steps on a log axis that keeps step 0: limits from 0, plain integer ticks."""
    ax.set_xlabel("training step")
    steps = [int(s) for s in steps]
    if not any(s > 0 for s in steps):
        return
    ax.set_xscale("symlog", linthresh=1, linscale=0.5)
    last = max(steps)
    ax.set_xlim(min(0, min(steps)), last * 1.15)
    ticks = [0] + [10 ** k for k in range(0, len(str(last)))]
    if last not in ticks and last > 1.5 * ticks[-1]:
        ticks.append(last)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(round(v))}"))


def target_curve(runs, probe_id: str, *, labels: Sequence[str] | None = None) -> Figure:
    """Probability of one probe's explained target over training (and target-foil contrast)."""
    runs = _as_runs(runs)
    labels = _labels(runs, labels)
    fig, ax = _subplots(figsize=(6, 3.2), dpi=100)
    twin = None
    colours = RUN_COLOURS
    all_steps: list[int] = []
    for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
        if "probes" not in run:
            continue
        rows = run["probes"]
        rows = rows[rows["probe_id"] == probe_id].sort_values("step")
        if rows.empty:
            continue
        colour = colours[i % len(colours)]
        target = display_token(str(rows["target"].iloc[-1]).replace("\u0120", " "))
        ax.plot(rows["step"], rows["target_prob"], "-o", markersize=3, color=colour,
                label=_named(label, f"p(target {target!r})"))
        all_steps += rows["step"].tolist()
        if rows["contrast"].notna().any():
            twin = twin or ax.twinx()
            twin.plot(rows["step"], rows["contrast"], "--", color=colour,
                      label=_named(label, "target - foil logit"))
    _symlog_steps(ax, all_steps)
    ax.set_ylabel("target probability")
    ax.set_ylim(bottom=0)
    handles, names = ax.get_legend_handles_labels()
    if twin is not None:
        twin.axhline(0.0, color="grey", linewidth=0.6)
        twin.set_ylabel("target - foil logit (dashed)")
        more = twin.get_legend_handles_labels()
        handles, names = handles + more[0], names + more[1]
    if handles:
        ax.legend(handles, names, fontsize=7, loc="best")
    ax.set_title(f"{probe_id}: the explained prediction over training", fontsize=9)
    fig.tight_layout()
    return fig


def metric_series(run, key: str) -> tuple[list[int], list[float]] | None:
    """(steps, values) of one key of the run's ``metrics`` table, or None when absent."""
    if "metrics" not in run:
        return None
    rows = run["metrics"]
    rows = rows[rows["key"] == key].sort_values("step")
    if rows.empty:
        return None
    return rows["step"].astype(int).tolist(), rows["value"].astype(float).tolist()


def metric_band(run, key: str) -> tuple[list[int], list[float], list[float]] | None:
    """(steps, low, high) of one key's stored 95% interval, or None when it has none."""
    if "metrics" not in run or "low" not in run["metrics"]:
        return None
    rows = run["metrics"]
    rows = rows[(rows["key"] == key) & rows["low"].notna() & rows["high"].notna()]
    if rows.empty:
        return None
    rows = rows.sort_values("step")
    return (rows["step"].astype(int).tolist(), rows["low"].astype(float).tolist(),
            rows["high"].astype(float).tolist())


def metric_history(runs, keys: Sequence[str], *, labels: Sequence[str] | None = None,
                   title: str = "", ylabel: str = "") -> Figure:
    """Several metric keys of one or more runs against training step (absent keys skipped),
    each with its 95% interval band where the store has one.

    Several runs: run i has colour ``RUN_COLOURS[i]`` (as in every other plot) and each key
    its own line style; one run: one colour per key.
    """
    runs = _as_runs(runs)
    series, colours, styles, bands = {}, {}, {}, {}
    for i, (run, label) in enumerate(zip(runs, _labels(runs, labels), strict=True)):
        for j, key in enumerate(keys):
            found = metric_series(run, key)
            if found is not None:
                name = _named(label, key)
                series[name] = found
                band = metric_band(run, key)
                if band is not None:
                    bands[name] = band
                if len(runs) > 1:
                    colours[name] = RUN_COLOURS[i % len(RUN_COLOURS)]
                    styles[name] = KEY_STYLES[j % len(KEY_STYLES)]
    if not series:
        raise ValueError(f"none of the metrics {list(keys)} are in the runs' metrics tables")
    return metric_curves(series, title=title, ylabel=ylabel, colours=colours, styles=styles,
                         bands=bands)


GRADIENT_CURVES = (("input_x_gradient", "input x gradient"), ("saliency", "Saliency"),
                   ("integrated_gradients", "Integrated Gradients"))


def alignment_curves(runs, *, labels: Sequence[str] | None = None) -> Figure:
    """Evidence alignment of the cue words beside its controls, over the positions before the
    explained one: AP (left: NormXLogit with its 95% band, LogAt, the target-minus-foil score,
    the gradient references at the faithfulness steps, the random ranking and the first
    snapshot's value), the scale-free DP (middle; the paper's DP, `dp_raw`, dash-dotted) and
    the share of probes whose cue outscores every attractor (right, with its random
    baseline). Old stores' ``alignment/dp`` is read as ``dp_raw``."""
    runs = _as_runs(runs)
    labels = _labels(runs, labels)
    fig, axes = _subplots(1, 3, figsize=(15, 3.6), dpi=100)
    colours = RUN_COLOURS
    found = False
    all_steps: list[int] = []
    gradients = tuple((f"{m}/ap", "x", f"AP by {name} (reference)")
                      for m, name in GRADIENT_CURVES)
    panels = ((axes[0], "average precision (AP)",
               (("ap", "-o", "NormXLogit"), ("ap_random", ":", "random"),
                ("ap_reference", (0, (6, 2, 1, 2)), "first snapshot"), ("ap_logat", "--", "LogAt"),
                ("ap_contrast", "-s", "norm x (target - foil) LogAt"), *gradients)),
              (axes[1], "dot product (DP)",
               (("dp_z", "-o", "DP_z (standardised, scale-free)"),
                ("dp_raw", "-.", "DP (paper, scale-dependent)"),
                ("dp_random", ":", "random"))),
              (axes[2], "cue over attractor",
               (("cue_over_attractor", "-o", "cue outscores every attractor"),
                ("cue_over_attractor_random", ":", "random"),
                ("cue_over_attractor_reference", (0, (6, 2, 1, 2)), "first snapshot"))))
    for ax, name, curves in panels:
        for i, (run, label) in enumerate(zip(runs, labels, strict=True)):
            colour = colours[i % len(colours)]
            for metric, style, what in curves:
                series = metric_series(run, f"alignment/{metric}")
                if series is None:
                    continue
                found = True
                all_steps += series[0]
                if isinstance(style, tuple):
                    ax.plot(*series, color=colour, linestyle=style, label=_named(label, what))
                else:
                    ax.plot(*series, style, color=colour, markersize=3,
                            label=_named(label, what), alpha=0.6 if style == "x" else 1.0)
                banded = style == "-o" or metric == "ap_contrast"
                band = metric_band(run, f"alignment/{metric}") if banded else None
                if band is not None:
                    ax.fill_between(*band, color=colour, alpha=0.2 if style == "-o" else 0.1,
                                    linewidth=0)
        ax.set_ylabel(name)
        ax.set_title(f"cue words: {name}", fontsize=9)
        _symlog_steps(ax, all_steps)
        if ax.lines:
            ax.legend(fontsize=6)
        else:
            ax.text(0.5, 0.5, "not logged (no attractors or no data)", ha="center",
                    transform=ax.transAxes, fontsize=8)
    if not found:
        raise ValueError("no alignment/* metrics in the runs: the probes have no cue words")
    fig.tight_layout()
    return fig


def norm_distribution(run, *, max_outlines: int = 4) -> Figure:
    """Input-embedding row norms over training: percentile bands (left), histograms (right)."""
    if "embedding" not in run:
        raise ValueError(f"{run.path} has no 'embedding' table; available: {sorted(run.tables)}")
    table = run["embedding"]
    grouped = table.groupby("step")["norm"]
    q = grouped.quantile([0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0]).unstack()
    steps = q.index.to_numpy()
    fig, (band, hist) = _subplots(1, 2, figsize=(10, 3.4), dpi=100)
    band.fill_between(steps, q[0.05], q[0.95], alpha=0.2, color="C0", label="5-95%")
    band.fill_between(steps, q[0.25], q[0.75], alpha=0.4, color="C0", label="25-75%")
    band.plot(steps, q[0.5], "-o", color="C0", markersize=3, label="median")
    band.plot(steps, q[0.0], ":", color="grey", linewidth=0.8, label="min / max")
    band.plot(steps, q[1.0], ":", color="grey", linewidth=0.8)
    _symlog_steps(band, steps.tolist())
    band.set_ylabel("input-embedding row norm")
    band.set_title("norm distribution over training", fontsize=9)
    band.legend(fontsize=7)
    picks = sorted({int(steps[round(i)]) for i in np.linspace(0, len(steps) - 1,
                                                                min(max_outlines, len(steps)))})
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(picks)))
    for step, colour in zip(picks, colours, strict=True):
        norms = table.loc[table["step"] == step, "norm"].to_numpy(dtype=float)
        norms = norms[np.isfinite(norms)]
        hist.hist(norms, bins=50, histtype="step", color=colour, label=f"step {step}")
    hist.set_xlabel("input-embedding row norm")
    hist.xaxis.set_major_locator(MaxNLocator(6))
    hist.set_ylabel("tokens")
    hist.set_title("histogram at selected steps", fontsize=9)
    hist.legend(fontsize=7)
    fig.tight_layout()
    return fig


def norm_frequency(run, step: int | None = None) -> Figure:
    """The paper's first claim at ``step``: norm vs log token frequency (left; never-seen
    tokens apart) and vs information gain (middle; types with enough next-token pairs), and
    both Spearman correlations over training with their 95% bands over token types (right)."""
    if "embedding" not in run:
        raise ValueError(f"{run.path} has no 'embedding' table; available: {sorted(run.tables)}")
    table = run["embedding"]
    step = nearest_step(table["step"].unique(), step)
    at = table[table["step"] == step]
    fig, (scatter, gain, curve) = _subplots(1, 3, figsize=(15, 3.4), dpi=100)
    seen = at["count"] > 0
    scatter.scatter(np.log10(at.loc[seen, "count"]), at.loc[seen, "norm"], s=6, alpha=0.5,
                    color="C0", label=f"seen ({int(seen.sum())})")
    if (~seen).any():
        scatter.scatter(np.full(int((~seen).sum()), -0.3), at.loc[~seen, "norm"], s=6,
                        alpha=0.5, color="C3", marker="x", label=f"never seen ({int((~seen).sum())})")
    scatter.set_xlabel("log10(times seen in training)  (x at -0.3: never seen)")
    scatter.set_ylabel("input-embedding row norm")
    scatter.set_title(f"norm vs frequency at step {step}", fontsize=9)
    scatter.legend(fontsize=7)
    info = at["infogain"] if "infogain" in at else at["norm"] * np.nan  # older stores: none
    known = info.notna()
    if known.any():
        gain.scatter(info[known], at.loc[known, "norm"], s=8, alpha=0.6, color="C2",
                     label=f"types with enough pairs ({int(known.sum())})")
        gain.legend(fontsize=7)
    else:
        gain.text(0.5, 0.5, "no information gain (no type has enough pairs yet)",
                  ha="center", transform=gain.transAxes, fontsize=8)
    gain.set_xlabel("information gain KL(p(next | w) || p(next)), nats")
    gain.set_ylabel("input-embedding row norm")
    gain.set_title(f"norm vs information gain at step {step}", fontsize=9)
    drawn = False
    for key, colour, name in (("embedding/norm_infogain_spearman", "C2", "information gain "
                               "(predicted > 0)"),
                              ("embedding/norm_logfreq_spearman", "C0", "log frequency "
                               "(predicted < 0)")):
        series = metric_series(run, key)
        if series is None:
            continue
        drawn = True
        curve.plot(*series, "-o", markersize=3, color=colour, label=name)
        band = metric_band(run, key)
        if band is not None:
            curve.fill_between(*band, color=colour, alpha=0.2, linewidth=0)
        _symlog_steps(curve, series[0])
    if drawn:
        curve.axhline(0.0, color="grey", linewidth=0.6)
        curve.set_ylim(-1.05, 1.05)
        curve.legend(fontsize=7)
    else:
        curve.text(0.5, 0.5, "no embedding/norm_*_spearman metric", ha="center",
                   transform=curve.transAxes)
    curve.set_ylabel("Spearman with the norm")
    curve.set_title("the norm correlations over training (95% bands over types)", fontsize=9)
    fig.tight_layout()
    return fig
