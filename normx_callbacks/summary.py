"""A run in words: headline numbers and a generated summary paragraph.

Shared by the end-of-run message of `train.py`, `normx summary` and the top of
`normx report`, so all three say the same thing. A claim that cue AP "rose above
random" is made only when the store's 95% interval (`low`/`high` columns of the
metrics table) lies above the random baseline; a store without intervals gets the
point values and nothing stronger.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from .store import RunData, StoreError, find_runs, read_run_record

ACCURACY_MARK = 0.9  # the accuracy level the summary reports the crossing of


@dataclass(frozen=True)
class Point:
    """One metric at one snapshot: value and its 95% interval (NaN where none stored)."""

    step: int
    value: float
    low: float = math.nan
    high: float = math.nan

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)


def metric_points(run: RunData, key: str) -> list[Point]:
    """Every snapshot's value of one metric key, by step (finite values only)."""
    if "metrics" not in run:
        return []
    rows = run["metrics"]
    rows = rows[rows["key"] == key].sort_values("step").drop_duplicates("step", keep="last")
    points = []
    for row in rows.itertuples(index=False):
        value = float(row.value)
        if not math.isfinite(value):
            continue
        low = float(getattr(row, "low", math.nan))
        high = float(getattr(row, "high", math.nan))
        points.append(Point(int(row.step), value, low, high))
    return points


def _at(points: list[Point], step: int) -> Point | None:
    return next((p for p in points if p.step == step), None)


def _fmt(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "n/a"


def ap_emergence(run: RunData) -> str | None:
    """When cue AP first rose above its random baseline, or the point values when it is unsure."""
    ap = metric_points(run, "alignment/ap")
    rand = metric_points(run, "alignment/ap_random")
    if not ap or not rand:
        return None
    pairs = [(p, r) for p in ap if (r := _at(rand, p.step)) is not None]
    if not pairs:
        return None
    if all(p.has_interval for p, _ in pairs):
        first = next(((p, r) for p, r in pairs if p.low > r.value), None)
        if first is None:
            last, r = pairs[-1]
            return (f"Cue AP never rose above its random baseline with 95% confidence (last "
                    f"snapshot, step {last.step}: {_fmt(last.value)}, interval "
                    f"[{_fmt(last.low)}, {_fmt(last.high)}], random {_fmt(r.value)}).")
        p, r = first
        text = (f"Cue AP first rose above its random baseline at step {p.step} "
                f"({_fmt(p.value)}, 95% interval [{_fmt(p.low)}, {_fmt(p.high)}] vs random "
                f"{_fmt(r.value)})")
        last, r = pairs[-1]
        if last.step != p.step and not last.low > r.value:
            # The first crossing is not the end of the story: say where the run ended.
            text += (f", but at the last snapshot (step {last.step}) it is no longer above it "
                     f"({_fmt(last.value)}, interval [{_fmt(last.low)}, {_fmt(last.high)}] "
                     f"vs random {_fmt(r.value)})")
        return text + "."
    above = next(((p, r) for p, r in pairs if p.value > r.value), None)
    if above is None:
        last, r = pairs[-1]
        return (f"Cue AP stayed at or below its random baseline (step {last.step}: "
                f"{_fmt(last.value)} vs random {_fmt(r.value)}).")
    p, r = above
    return (f"Cue AP was first above its random baseline at step {p.step} ({_fmt(p.value)} vs "
            f"{_fmt(r.value)}); the store has no intervals, so these are point values only.")


def accuracy_crossing(run: RunData, mark: float = ACCURACY_MARK) -> str | None:
    """When probe accuracy (target logit > foil logit) first reached ``mark``."""
    points = metric_points(run, "probe/accuracy")
    if not points:
        return None
    first = next((p for p in points if p.value >= mark), None)
    if first is None:
        return (f"Probe accuracy never reached {mark:g} (best {_fmt(max(p.value for p in points))}"
                f", last {_fmt(points[-1].value)} at step {points[-1].step}).")
    return f"Probe accuracy first reached {mark:g} at step {first.step} ({_fmt(first.value)})."


def norm_frequency(run: RunData) -> str | None:
    """How the Spearman correlation of embedding norm and log frequency moved."""
    points = metric_points(run, "embedding/norm_logfreq_spearman")
    if not points:
        return None
    first, last = points[0], points[-1]
    if first.step == last.step:
        return (f"Embedding norms and log token frequency: Spearman {_fmt(last.value)} "
                f"at step {last.step}.")
    verb = "tracked" if last.value >= 0.3 else "did not clearly track"
    peak = max(points, key=lambda p: p.value)
    extra = (f" (highest {_fmt(peak.value)} at step {peak.step})"
             if peak.value - last.value > 0.1 else "")
    return (f"Embedding norms {verb} token frequency at the last snapshot: Spearman(norm, log "
            f"frequency) over tokens seen in training went from {_fmt(first.value)} at step "
            f"{first.step} to {_fmt(last.value)} at step {last.step}{extra}.")


def summary_paragraph(run: RunData) -> str:
    """The run in a few sentences (empty when the store holds none of the metrics used)."""
    parts = [ap_emergence(run), accuracy_crossing(run), norm_frequency(run)]
    return " ".join(p for p in parts if p)


def headline_lines(run: RunData) -> list[str]:
    """Cue AP vs random and probe accuracy at the first and last snapshot, one line each."""
    lines = []
    ap = metric_points(run, "alignment/ap")
    rand = metric_points(run, "alignment/ap_random")
    if ap:
        ends = [ap[0], ap[-1]] if len(ap) > 1 else [ap[0]]
        text = []
        for p in ends:
            r = _at(rand, p.step)
            interval = f" [{_fmt(p.low)}, {_fmt(p.high)}]" if p.has_interval else ""
            baseline = f" (random {_fmt(r.value)})" if r is not None else ""
            text.append(f"{_fmt(p.value)}{interval}{baseline} at step {p.step}")
        lines.append("cue AP:         " + " -> ".join(text))
    acc = metric_points(run, "probe/accuracy")
    if acc:
        ends = [acc[0], acc[-1]] if len(acc) > 1 else [acc[0]]
        lines.append("probe accuracy: " + " -> ".join(f"{_fmt(p.value)} at step {p.step}"
                                                     for p in ends))
    return lines



def _shown(path: str | os.PathLike, cwd: Path) -> str:
    """A path as a shell word: relative to ``cwd`` when below it, quoted when needed."""
    path = Path(path).absolute()
    try:
        text = str(path.relative_to(cwd.absolute()))
    except ValueError:
        text = str(path)
    return shlex.quote(text)


def _tool(name: str, cwd: Path) -> str:
    """The command that runs ``name`` from this interpreter's environment (e.g. .venv/bin)."""
    candidate = Path(sys.executable).parent / name
    return _shown(candidate, cwd) if candidate.exists() else name


def _has_make_targets(cwd: Path) -> bool:
    makefile = cwd / "Makefile"
    if not makefile.is_file():
        return False
    text = makefile.read_text(encoding="utf-8", errors="replace")
    return all(f"\n{t}:" in text for t in ("summary", "report", "dashboard"))


def _run_selector(store: Path) -> str:
    """`` --run <id prefix>`` when the run directory holds other runs' stores too, else ''."""
    record = read_run_record(store)
    try:
        several = record is not None and len(find_runs(store.parent)) > 1
    except StoreError:
        several = False
    return f" --run {record['run_id'][:8]}" if several else ""


def next_commands(store: str | os.PathLike, *, tensorboard_dir: str | os.PathLike | None = None,
                  wandb_dir: str | os.PathLike | None = None, wandb_url: str | None = None,
                  cwd: str | os.PathLike | None = None) -> list[str]:
    """Commands that work as printed from ``cwd``: summary, report and the dashboard.

    The repository's `make` targets when ``cwd`` has them, else the tools of this
    interpreter's environment by path. ``tensorboard_dir``: the TensorBoard log directory
    (dashboard via tensorboard); ``wandb_dir``: an offline W&B run directory (dashboard via
    `wandb sync`); ``wandb_url``: an online W&B run.
    """
    cwd = Path(cwd or os.getcwd())
    run = _shown(Path(store).parent, cwd)  # the run directory: the store is found below it
    select = _run_selector(Path(store))
    make = _has_make_targets(cwd) and not select
    if make:
        lines = [f"make summary RUN={run}", f"make report RUN={run}"]
    else:
        normx = _tool("normx", cwd)
        report = _shown(Path(store).parent / "report.html", cwd)
        lines = [f"{normx} summary {run}{select}", f"{normx} report {run}{select} -o {report}"]
    if tensorboard_dir is not None:
        logdir = _shown(tensorboard_dir, cwd)
        lines.append(f"make dashboard RUN={logdir}" if make and logdir == run else
                     f"{_tool('tensorboard', cwd)} --logdir {logdir} "
                     "--samples_per_plugin images=200,text=200")
        lines[-1] += "  # then open http://localhost:6006/#custom_scalars"
    if wandb_url:
        lines.append(f"open {wandb_url}")
    elif wandb_dir is not None:
        lines.append(f"{_tool('wandb', cwd)} sync {_shown(wandb_dir, cwd)}  "
                     "(uploads the offline run; then open it on wandb.ai)")
    return lines
