"""`normx report`: one self-contained HTML page from one or more snapshot stores.

Figures are the `plots` functions a notebook would call, embedded as base64 PNGs; the
page itself (escaping, styles, Content-Security-Policy) is built by `pages`.

Past 400 lines as one module: one page, its sections in order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from . import plots
from .loading import RunData, load_run
from .pages import esc, figure_html, grid, html_table, note, page, token_legend, token_strip
from .summary import paired_tests, summary_paragraph

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (done, total, what)

# Headline metrics: the `summary` table and the report's overview.
HEADLINE = {
    "target_prob": "probe/target_prob",
    "accuracy": "probe/accuracy",
    "ap": "alignment/ap",
    "ap_random": "alignment/ap_random",
    "ap_contrast": "alignment/ap_contrast",
    "cue_over_attractor": "alignment/cue_over_attractor",
    "ap_input_x_gradient": "alignment/input_x_gradient/ap",
    "dp_raw": "alignment/dp_raw",
    "dp_z": "alignment/dp_z",
    "dp_random": "alignment/dp_random",
    "prediction_depth": "probe/prediction_depth",
    "stability": "stability/spearman",
    "norm_logfreq_spearman": "embedding/norm_logfreq_spearman",
    "norm_infogain_spearman": "embedding/norm_infogain_spearman",
}

SECTIONS = {
    "runs": "Runs",
    "loss": "Training loss",
    "alignment": "Evidence alignment",
    "predictions": "Probe predictions",
    "stability": "Stability",
    "embedding-norms": "Embedding norms",
    "norm-frequency": "Norm vs frequency",
    "faithfulness": "Faithfulness",
    "probes": "Probes",
}

# ------------------------------------------------------------------------- data from a run


def headline_table(run: RunData) -> pd.DataFrame:
    """One row per snapshot: step and the headline metrics (NaN where not recorded)."""
    columns = ["step", *HEADLINE]
    if "metrics" not in run:
        return pd.DataFrame({"step": run.steps}, columns=columns)
    wide = run["metrics"].pivot_table(index="step", columns="key", values="value",
                                      aggfunc="last")
    frame = pd.DataFrame({"step": wide.index.astype(int)})
    for name, key in HEADLINE.items():
        frame[name] = wide[key].to_numpy(dtype=float) if key in wide else float("nan")
    return frame


def tensorboard_folders(run: RunData) -> list[Path]:
    """The TensorBoard runs of a store: the folder next to it when it holds event files (a
    Lightning logger's version folder), else the folders below it where the transformers
    Trainer callback wrote this run's event files (named by its run id), in the order they
    were started: a resumed run's folders follow the first."""
    folder = run.path.parent
    if any(p.name.startswith("events.out.tfevents") for p in folder.iterdir()):
        return [folder]
    run_id = run.run_record.get("run_id")
    if not run_id:
        return []
    from .loggers import tensorboard_suffix

    files = folder.glob(f"runs/**/events.out.tfevents.*{tensorboard_suffix(run_id)}")
    started = {}
    for path in files:  # events.out.tfevents.<unix time>.<host>...: the time it was started
        started.setdefault(path.parent, path.name.split(".")[3])
    return sorted(started, key=lambda p: (started[p], str(p)))


def read_losses(run: RunData) -> tuple[dict[str, tuple[list[int], list[float]]], str | None]:
    """Loss curves from the store's TensorBoard event files: (series, note-if-none)."""
    folders = tensorboard_folders(run)
    folder = run.path.parent
    if not folders:
        return {}, f"no TensorBoard event files next to the store (in {folder}): loss not shown"
    try:
        from tensorboard.backend.event_processing import event_accumulator as ea
    except ImportError:
        return {}, "tensorboard is not installed (pip install tensorboard): loss not shown"
    guidance = {ea.SCALARS: 0, ea.IMAGES: 1, ea.HISTOGRAMS: 1, ea.TENSORS: 1, ea.AUDIO: 1,
                ea.COMPRESSED_HISTOGRAMS: 1}
    merged: dict[str, dict[int, float]] = {}
    try:
        for folder in folders:  # a later folder (a resumed run) replaces the steps it re-logs
            acc = ea.EventAccumulator(str(folder), size_guidance=guidance)
            acc.Reload()
            tags = [t for t in acc.Tags().get("scalars", []) if "loss" in t.lower()
                    and not t.startswith("normx/")]
            for tag in tags:
                merged.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    except Exception as error:  # a damaged event file must not cost the whole report
        return {}, f"could not read the TensorBoard event files in {folder} ({error})"
    series = {tag: (sorted(points), [points[s] for s in sorted(points)])
              for tag, points in merged.items()}
    if not series:
        return {}, f"the TensorBoard event files in {folder} hold no scalar tag with 'loss'"
    return series, None


def select_probes(runs: Sequence[RunData], max_probes: int,
                  wanted: Sequence[str] | None = None) -> list[str]:
    """Probe ids to show: ``wanted``, else probes common to all runs first, in run order."""
    per_run = []
    for run in runs:
        ids = run["probes"]["probe_id"] if "probes" in run else (
            run["tokens"]["probe_id"] if "tokens" in run else [])
        per_run.append(list(dict.fromkeys(ids)))
    known = list(dict.fromkeys(p for ids in per_run for p in ids))
    if wanted:
        unknown = [p for p in wanted if p not in known]
        if unknown:
            raise ValueError(f"probe {unknown[0]!r} is in none of the runs; probes: "
                             f"{known[:12]}{' ...' if len(known) > 12 else ''}")
        return list(dict.fromkeys(wanted))
    common = [p for p in known if all(p in ids for ids in per_run)]
    rest = [p for p in known if p not in common]
    return (common + rest)[:max_probes]


# ------------------------------------------------------------------------- the report


class _Counter:
    def __init__(self, total: int, progress: Progress | None):
        self.done, self.total, self.progress = 0, total, progress

    def __call__(self, what: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total, what)


def _try_figure(make: Callable, alt: str, caption: str = "") -> str:
    try:
        fig = make()
    except ValueError as error:  # data absent for this figure: say so, keep the report
        return note(str(error))
    return figure_html(fig, alt, caption)


def render_report(
    runs: Sequence[RunData],
    *,
    labels: Sequence[str] | None = None,
    step: int | None = None,
    max_probes: int = 12,
    probes: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> str:
    """The report as an HTML string. ``step``: the snapshot for the layer view (default last)."""
    runs = list(runs)
    if not runs:
        raise ValueError("render_report needs at least one run")
    if max_probes < 0:
        raise ValueError(f"max_probes={max_probes!r} must be >= 0")
    labels = list(labels) if labels is not None else plots.run_labels(runs)
    names = [label or run.path.parent.name for run, label in zip(runs, labels, strict=True)]
    chosen = select_probes(runs, max_probes, probes)
    r = len(runs)
    count = _Counter(3 + 2 * r + len(chosen) * (2 * r + 1), progress)

    parts = [f"<h1>normx report</h1><p class=\"meta\">{len(runs)} run(s), generated "
             f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}</p>",
             "<nav>" + "".join(f'<a href="#{k}">{esc(v)}</a>' for k, v in SECTIONS.items())
             + "</nav>"]
    parts.append(_summary_html(runs, names))
    parts.append(_runs_section(runs, names, step))
    parts.append(grid([_loss_section(runs, labels), _section("predictions", _try_figure(
        lambda: plots.metric_history(runs, ["probe/target_prob", "probe/accuracy"],
                                     labels=labels, title="mean over probes",
                                     ylabel="probability / accuracy"), "probe predictions")
        + _group_figure(runs, labels)
        + _try_figure(lambda: plots.metric_history(
            runs, ["probe/prediction_depth"], labels=labels,
            title="when the prediction forms: first layer whose logit lens ranks the target "
                  "first (mean over probes that have one)", ylabel="layer"),
            "prediction depth"))]))
    count("loss and predictions")
    parts.append(_section("alignment", "<p class=\"meta\">Do the cue words get the highest "
                          "scores among the positions before the explained one? AP/DP of the "
                          "cue positions under NormXLogit (last layer) and LogAt, beside their "
                          "controls: the random ranking, the first snapshot (the untrained "
                          "model: what word class alone gives), the target-minus-foil score, "
                          "cue over attractor, and gradient methods as a reference.</p>"
                          + _try_figure(lambda: plots.alignment_curves(runs, labels=labels),
                                        "evidence alignment")
                          + _tests_html(runs, names)))
    count("alignment")
    parts.append(grid([_section("stability", "<p class=\"meta\">Spearman rank correlation of "
                                 "the NormXLogit scores with the previous snapshot.</p>"
                                 + _try_figure(lambda: plots.metric_history(
                                     runs, ["stability/spearman"], labels=labels,
                                     ylabel="Spearman"), "stability")),
                        _faithfulness_section(runs, labels)]))
    count("stability and faithfulness")

    for key, make, alt in (("embedding-norms", plots.norm_distribution, "embedding norms"),
                           ("norm-frequency", lambda run: plots.norm_frequency(run, step),
                            "norm vs frequency")):
        cells = []
        for run, name in zip(runs, names, strict=True):
            cells.append(_label_html(name, r) + _try_figure(lambda run=run, make=make: make(run), alt))
            count(f"{alt} of {name}")
        parts.append(_section(key, grid(cells)))

    probe_parts = [token_legend()]
    total = len(set().union(*(set(run["probes"]["probe_id"]) for run in runs if "probes" in run)))
    if total > len(chosen):
        probe_parts.append(f'<p class="meta">Showing {len(chosen)} of {total} probes '
                           "(--max-probes / --probe to change).</p>")
    for i, probe_id in enumerate(chosen):
        probe_parts.append(_probe_html(i, probe_id, runs, labels, names, step, count))
    parts.append(_section("probes", "".join(probe_parts)))
    return page("normx report", "\n".join(parts))


def _loss_section(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    losses = [read_losses(run) for run in runs]
    body = [note(n) for (_, n) in losses if n]
    series, colours, styles = {}, {}, {}
    for i, (label, (found, _)) in enumerate(zip(labels, losses, strict=True)):
        for j, (tag, s) in enumerate(found.items()):
            name = f"{label}: {tag}" if label else tag
            series[name] = s
            if len(runs) > 1:  # one colour per run, as in every other plot
                colours[name] = plots.RUN_COLOURS[i % len(plots.RUN_COLOURS)]
                styles[name] = plots.KEY_STYLES[j % len(plots.KEY_STYLES)]
    if series:
        body.append(figure_html(plots.metric_curves(series, title="training loss (TensorBoard)",
                                                    ylabel="loss", colours=colours,
                                                    styles=styles), "training loss"))
    return _section("loss", "".join(body))


def _group_figure(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    """Accuracy per probe group (e.g. BLiMP paradigm); empty when no probe has a group."""
    keys = sorted({k for run in runs if "metrics" in run for k in run["metrics"]["key"].unique()
                   if str(k).startswith("probe/accuracy/")})
    if not keys:
        return ""
    return _try_figure(lambda: plots.metric_history(runs, keys, labels=labels,
                                                    title="accuracy per probe group",
                                                    ylabel="accuracy"), "accuracy per group")


def _faithfulness_section(runs: Sequence[RunData], labels: Sequence[str]) -> str:
    keys = sorted({k for run in runs if "metrics" in run for k in run["metrics"]["key"].unique()
                   if str(k).startswith("faithfulness/")})
    if not keys:
        return _section("faithfulness", note("no faithfulness/* metrics in the store(s): the "
                                             "faithfulness evaluation was not run"))
    figures = [_try_figure(lambda kind=kind: plots.metric_history(
        runs, [k for k in keys if k.endswith(f"/{kind}")], labels=labels,
        title=f"{kind} (AOPC; {'higher' if kind == 'comprehensiveness' else 'lower'} is "
              "more faithful)", ylabel=kind), f"faithfulness: {kind}")
        for kind in ("comprehensiveness", "sufficiency")]
    return _section("faithfulness", "".join(figures) + _cost_table(runs, labels, keys))


def _cost_table(runs: Sequence[RunData], labels: Sequence[str], keys: Sequence[str]) -> str:
    """Seconds per probe of each method at the last snapshot that measured it."""
    rows = []
    for run, label in zip(runs, labels, strict=True):
        for key in (k for k in keys if k.endswith("/seconds_per_instance")):
            series = plots.metric_series(run, key)
            if series is not None:
                rows.append({"run": label or run.path.parent.name, "method": key.split("/")[1],
                             "step": series[0][-1], "seconds per probe": series[1][-1]})
    if not rows:
        return ""
    frame = pd.DataFrame(rows)
    if len(runs) == 1:
        frame = frame.drop(columns="run")
    return ('<p class="meta">Cost of each method (last snapshot that measured it):</p>'
            + html_table(frame, left=("run", "method")))


def _tests_html(runs: Sequence[RunData], names: Sequence[str]) -> str:
    """The paired tests the summary's words rest on, per run (`summary.paired_tests`)."""
    out = []
    for run, name in zip(runs, names, strict=True):
        rows = paired_tests(run)
        if not rows:
            out.append(note(f"{name}: the store keeps no per-probe values, so no paired test "
                            "can be shown (point values only)"))
            continue
        lead = f"{esc(name)}: " if len(runs) > 1 else ""
        out.append(f'<p class="meta">{lead}Paired tests over probes (bootstrap of the '
                   "per-probe difference, 95% interval):</p>"
                   + html_table(pd.DataFrame(rows), left=("comparison", "verdict")))
    return "".join(out)


def _section(key: str, body: str) -> str:
    return f'<section id="{key}"><h2>{esc(SECTIONS[key])}</h2>{body}</section>\n'


def _label_html(name: str, runs: int) -> str:
    return f'<div class="runlabel">{esc(name)}</div>' if runs > 1 else ""


def _summary_html(runs: Sequence[RunData], names: Sequence[str]) -> str:
    """The generated summary paragraph of each run, first thing on the page."""
    out = []
    for run, name in zip(runs, names, strict=True):
        text = summary_paragraph(run)
        if text:
            lead = f"<b>{esc(name)}:</b> " if len(runs) > 1 else ""
            out.append(f'<p class="summary">{lead}{esc(text)}</p>')
    return "".join(out)


def _runs_section(runs: Sequence[RunData], names: Sequence[str], step: int | None) -> str:
    rows = []
    body = []
    for run, name in zip(runs, names, strict=True):
        meta = run.meta.get("run_meta", {}) if isinstance(run.meta, dict) else {}
        missing = ", ".join(f"{s} ({reason})" for s, reason in
                            zip(run.missing["step"], run.missing["reason"], strict=True))
        rows.append({"run": name, "store": str(run.path), "snapshots": len(run.steps),
                     "steps": f"{run.steps[0]}..{run.steps[-1]}" if run.steps else "-",
                     "model": str(meta.get("model", "-")),
                     "objective": str(meta.get("objective", "-")),
                     "missing snapshots": missing or "none"})
    body.append(html_table(pd.DataFrame(rows), left=("run", "store", "model", "objective",
                                                 "missing snapshots")))
    for run, name in zip(runs, names, strict=True):
        table = headline_table(run)
        at = plots.nearest_step(run.steps, step) if run.steps else None
        if step is not None and at != step:
            body.append(note(f"{name}: step {step} was not recorded; showing step {at}"))
        body.append(f"<p class=\"meta\">Headline metrics of {esc(name)} per snapshot (the "
                    f"layer views below use step {at}):</p>" + html_table(table))
    return _section("runs", "".join(body))


def _probe_html(index, probe_id, runs, labels, names, step, count) -> str:
    head = f'<article class="probe" id="probe-{index}"><h3>{esc(probe_id)}</h3>'
    text = next((run["probes"].loc[run["probes"]["probe_id"] == probe_id, "text"].iloc[-1]
                 for run in runs if "probes" in run
                 and (run["probes"]["probe_id"] == probe_id).any()), None)
    if text is not None:
        head += f'<div class="text">{esc(text)}</div>'
    cells = []
    for run, name in zip(runs, names, strict=True):
        cells.append(_label_html(name, len(runs)) + _probe_run_html(run, probe_id, step, count))
    curve = _try_figure(lambda: plots.target_curve(runs, probe_id, labels=labels),
                        f"{probe_id}: target probability over training")
    count(f"probe {probe_id}")
    return head + grid(cells) + curve + "</article>\n"


def _probe_run_html(run: RunData, probe_id: str, step: int | None, count) -> str:
    tokens = run["tokens"] if "tokens" in run else None
    if tokens is None or not (tokens["probe_id"] == probe_id).any():
        count(probe_id)
        count(probe_id)
        return note(f"probe {probe_id!r} is not in this run")
    rows = tokens[tokens["probe_id"] == probe_id]
    at = plots.nearest_step(rows["step"].unique(), step)
    last = rows[(rows["step"] == at) & (rows["layer"] == rows["layer"].max())]
    last = last.sort_values("position")
    out = [f'<p class="meta">Step {at}, last layer (NormXLogit):</p>',
           token_strip(last["token"].tolist(), last["score"].astype(float).tolist())]
    if "probes" in run:
        info = run["probes"]
        info = info[(info["probe_id"] == probe_id) & (info["step"] == at)]
        if not info.empty:
            row = info.iloc[-1]
            target = str(row["target"]).replace("\u0120", " ")
            facts = f"explained target {target!r}: p = {float(row['target_prob']):.3f}"
            if pd.notna(row.get("contrast")):
                facts += f", target - foil logit = {float(row['contrast']):+.3f}"
            out.append(f'<p class="meta">{esc(facts)} at step {at}</p>')
    figures = [_try_figure(lambda: plots.emergence_heatmap(run, probe_id),
                           f"{probe_id}: NormXLogit per token over training",
                           "Emergence: each row is a snapshot, each column a token; each row "
                           "is scaled to its own largest |score|, so early steps stay "
                           "readable (compare sizes across steps in the headline table).")]
    count(probe_id)
    figures.append(_try_figure(lambda: plots.layer_view(run, probe_id, at),
                               f"{probe_id}: NormXLogit per layer at step {at}",
                               f"Layer x token at step {at}."))
    count(probe_id)
    out.extend(figures)  # full width: token labels stay at their drawn size
    return "".join(out)


def write_report(
    paths: Sequence[str | os.PathLike | RunData],
    out: str | os.PathLike,
    *,
    step: int | None = None,
    max_probes: int = 12,
    probes: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Load the runs (store dirs or run dirs), render the report and write it to ``out``."""
    runs = [p if isinstance(p, RunData) else load_run(p) for p in paths]
    for run in runs:
        if not run.steps:
            raise ValueError(f"{run.path} has no committed snapshots to report on")
    text = render_report(runs, step=step, max_probes=max_probes, probes=probes,
                         progress=progress)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out
