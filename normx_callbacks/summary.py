"""A run in words: headline numbers and a generated summary paragraph.

Shared by the end-of-run message of `train.py`, `normx summary`, the top of `normx report`
and the README's tables (`docs/make_tables.py`), so all say the same thing. Every "above",
"below", "rose" and "fell" comes from `statistics` (paired bootstraps over the probes the
store keeps per-probe values of; "first above" only at two consecutive snapshots); a store
without per-probe values gets point values and no verdict.

Past 400 lines as one module: every sentence written about a run, beside the tests that
license it.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .catalog import find_runs
from .loading import RunData
from .statistics import (
    ABOVE,
    BELOW,
    CONSECUTIVE,
    change,
    change_word,
    crossing,
    first_sustained,
    paired,
    probe_correct,
    probe_values,
    sign_word,
    versus_reference,
)
from .store import StoreError, read_run_record

ACCURACY_MARK = 0.9  # the accuracy level the summary reports the crossing of
VERSUS = {ABOVE: "above", BELOW: "below"}  # else "not distinguishable from"
# The gradient reference first: input x gradient needs no optional extra, so every run has it.
REFERENCE_ORDER = ("input_x_gradient", "saliency", "integrated_gradients")
METHOD_NAMES = {"input_x_gradient": "input x gradient", "saliency": "Saliency",
                "integrated_gradients": "Integrated Gradients"}


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


def _ci(point: Point) -> str:
    return (f"{_fmt(point.value)} [{_fmt(point.low)}, {_fmt(point.high)}]" if point.has_interval
            else _fmt(point.value))


def versus_random(run: RunData, column: str, baseline: str, name: str) -> str | None:
    """``name`` against its random baseline, paired over probes: at the last snapshot, the
    first step it is above at two consecutive snapshots, and its change since the first
    snapshot (the untrained model's structural reference). None without per-probe values."""
    tests = versus_reference(run, column, baseline)
    values, base = probe_values(run, column), probe_values(run, baseline)
    steps = sorted(tests)
    if not steps:
        return None
    last = steps[-1]
    test = tests[last]
    if test.verdict is None:
        return None
    word = VERSUS.get(test.verdict, "not distinguishable from")
    text = (f"{name} at the last snapshot (step {last}) is {_fmt(values[last].mean())} against "
            f"{_fmt(base[last].mean())} by chance: {word} it (paired difference "
            f"{test.interval()} over {test.n} probes)")
    first = first_sustained(steps, [tests[s] for s in steps], ABOVE)
    text += (f"; it was first above chance at {CONSECUTIVE} consecutive snapshots at step "
             f"{first}" if first is not None else
             f"; never above chance at {CONSECUTIVE} consecutive snapshots")
    if steps[0] != last:
        since = change(values[steps[0]], values[last])
        word = change_word(since)
        if word is not None:
            text += (f"; against the untrained model (step {steps[0]}: "
                     f"{_fmt(values[steps[0]].mean())}) {word} ({since.interval()})")
    return text + "."


def _point_values(run: RunData, key: str, baseline: str, name: str) -> str | None:
    """Point values only: a store without the per-probe values a test needs."""
    points, base = metric_points(run, key), metric_points(run, baseline)
    if not points:
        return None
    first, last = points[0], points[-1]
    r = _at(base, last.step)
    chance = f" (random {_fmt(r.value)})" if r is not None else ""
    return (f"{name} went from {_fmt(first.value)} at step {first.step} to {_fmt(last.value)} "
            f"at step {last.step}{chance}; the store keeps no per-probe values, so no "
            "comparison is tested.")


def ap_emergence(run: RunData) -> str | None:
    """Cue AP against random and against the first snapshot (paired), or point values."""
    return (versus_random(run, "ap", "ap_random", "Cue AP (NormXLogit)")
            or _point_values(run, "alignment/ap", "alignment/ap_random", "Cue AP"))


def controls(run: RunData) -> list[str]:
    """The controls of alignment: the target-minus-foil score and cue over attractor."""
    out = [versus_random(run, "ap_contrast", "ap_contrast_random",
                         "Cue AP of the target-minus-foil score"),
           versus_random(run, "cue_over_attractor", "cue_over_attractor_random",
                         "The share of probes whose cue outscores every attractor")]
    return [s for s in out if s]


def gradient_reference(run: RunData) -> str | None:
    """At the last snapshot with a gradient reference: its cue AP against random, and
    NormXLogit's AP against it (paired)."""
    for method in REFERENCE_ORDER:
        tests = versus_reference(run, f"ap_{method}", "ap_random")
        if not tests:
            continue
        step = max(tests)
        if tests[step].verdict is None:
            continue
        ours = versus_reference(run, "ap", f"ap_{method}")[step]
        values = probe_values(run, f"ap_{method}")[step]
        word = VERSUS.get(tests[step].verdict, "not distinguishable from")
        lead = {ABOVE: "higher than", BELOW: "lower than"}.get(ours.verdict,
                                                                "not distinguishable from")
        return (f"By {METHOD_NAMES[method]} (the gradient reference, step {step}) cue AP is "
                f"{_fmt(values.mean())}, {word} chance (paired difference "
                f"{tests[step].interval()}); NormXLogit's cue AP is {lead} it (paired "
                f"difference {ours.interval()}).")
    return None


def accuracy_crossing(run: RunData, mark: float = ACCURACY_MARK) -> str | None:
    """When probe accuracy (target logit > foil logit) crossed ``mark``, with its interval
    (per-probe right/wrong from the store's contrasts); point values without them."""
    correct = probe_correct(run)
    if correct:
        steps = sorted(correct)
        if any(np.isfinite(correct[s].to_numpy()).sum() >= 2 for s in steps):
            return crossing(steps, [correct[s].to_numpy() for s in steps],
                            mark).sentence("Probe accuracy")
    points = metric_points(run, "probe/accuracy")
    if not points:
        return None
    first = next((p for p in points if p.value >= mark), None)
    if first is None:
        return (f"Probe accuracy never reached {mark:g} (best {_fmt(max(p.value for p in points))}"
                f", last {_fmt(points[-1].value)} at step {points[-1].step}).")
    return (f"Probe accuracy first reached {mark:g} at step {first.step} ({_fmt(first.value)}; "
            "a point value, no per-probe record to test it).")


def prediction_depth(run: RunData) -> str | None:
    """When the prediction forms in depth: the mean first layer whose logit lens ranks the
    target first, at the last and the first snapshot."""
    points = metric_points(run, "probe/prediction_depth")
    never = metric_points(run, "probe/prediction_depth_never")
    probes = metric_points(run, "probe/probes")
    if not never:
        return None
    last_never = never[-1]
    step = last_never.step
    total, last = _at(probes, step), _at(points, step)
    if total is None:
        return None
    reached = int(total.value) - int(last_never.value)
    if last is None:
        text = f"At step {step} no layer's logit lens ranks any probe's target first"
    else:
        text = (f"The logit lens ranks the target first from layer {_fmt(last.value)} on "
                f"average at step {step}, over the {reached} of {int(total.value)} probes "
                "whose target some layer ranks first")
    first_step = run.steps[0] if run.steps else step
    if first_step != step and _at(never, first_step) is not None:
        start = _at(points, first_step)
        text += (f" (at step {first_step}: layer {_fmt(start.value)}, "
                 f"{int(_at(probes, first_step).value) - int(_at(never, first_step).value)} "
                 "probes)" if start is not None else
                 f" (at step {first_step}: none)")
    return text + "."


def norm_claims(run: RunData) -> list[str]:
    """The paper's first claim, measured as stated: norms against information gain and
    log frequency over token types, with the sign the paper predicts, and the tokens left
    out of both."""
    out = []
    ig = metric_points(run, "embedding/norm_infogain_spearman")
    freq = metric_points(run, "embedding/norm_logfreq_spearman")
    if ig or freq:
        parts = []
        for points, name, predicted in ((ig, "Spearman(norm, information gain)", "positive"),
                                        (freq, "Spearman(norm, log frequency)", "negative")):
            if not points:
                continue
            last = points[-1]
            sign = sign_word(last.low, last.high)
            if sign is None:
                verdict = "a point value, no interval stored"
            elif sign == predicted:
                verdict = f"{sign}: the predicted sign"
            elif sign.startswith("not"):
                verdict = f"{sign}: the predicted sign is not shown"
            else:
                verdict = f"{sign}: the opposite of the predicted sign"
            parts.append(f"{name} is {_ci(last)} at step {last.step} ({verdict})")
        out.append("The paper predicts larger norms for more informative words: a positive "
                   "Spearman(norm, information gain) (Oyama et al.'s KL of the next-token "
                   "distribution; rarer words tend to carry more, hence also a negative "
                   "Spearman(norm, log frequency)). " + "; ".join(parts) + ".")
    unseen = metric_points(run, "embedding/unseen_tokens")
    seen = metric_points(run, "embedding/seen_tokens")
    if unseen and seen:
        u, k = unseen[-1], _at(seen, unseen[-1].step)
        med_u = _at(metric_points(run, "embedding/unseen_norm_median"), u.step)
        med_s = _at(metric_points(run, "embedding/seen_norm_median"), u.step)
        medians = (f" (median norm {_fmt(med_u.value)}, against {_fmt(med_s.value)} for seen "
                   "tokens)" if med_u is not None and med_s is not None else "")
        total = int(u.value) + (int(k.value) if k is not None else 0)
        out.append(f"{int(u.value)} of {total} embedding rows belong to tokens never seen in "
                   f"training by step {u.step}{medians}; they enter neither correlation.")
    tied = metric_points(run, "embedding/tied")
    if tied and tied[-1].value == 1:
        out.append("Input and output embeddings are tied, so a row's norm is also shaped by "
                   "the output softmax, not by the input side alone.")
    return out


def paired_tests(run: RunData) -> list[dict]:
    """Every paired comparison the words rest on, at the last snapshot that holds it: the
    comparison, step, difference with its 95% interval, probes, verdict ("above", "below",
    "not distinguishable"). Empty for a store without per-probe values."""
    rows = []

    def add(what: str, step: int, test) -> None:
        if test is not None and test.verdict is not None:
            rows.append({"comparison": what, "step": step, "difference": test.interval(),
                         "probes": test.n, "verdict": test.verdict})

    for column, baseline, name in (("ap", "ap_random", "cue AP"),
                                   ("ap_contrast", "ap_contrast_random",
                                    "target-minus-foil AP"),
                                   ("cue_over_attractor", "cue_over_attractor_random",
                                    "cue over attractor")):
        tests = versus_reference(run, column, baseline)
        if not tests:
            continue
        last = max(tests)
        add(f"{name} - random", last, tests[last])
        values = probe_values(run, column)
        first = min(values)
        if first != last:
            add(f"{name} at step {last} - at step {first}", last,
                change(values[first], values[last]))
    for method in REFERENCE_ORDER:
        tests = versus_reference(run, f"ap_{method}", "ap_random")
        if tests:
            last = max(tests)
            add(f"{METHOD_NAMES[method]} AP - random", last, tests[last])
            add(f"NormXLogit AP - {METHOD_NAMES[method]} AP", last,
                versus_reference(run, "ap", f"ap_{method}")[last])
    correct = probe_correct(run)
    if correct:
        last = max(correct)
        add("probe accuracy - 0.5 (chance)", last, paired(correct[last].to_numpy(), 0.5))
    return rows


def summary_paragraph(run: RunData) -> str:
    """The run in a few sentences (empty when the store holds none of the metrics used)."""
    parts = [ap_emergence(run), *controls(run), gradient_reference(run),
             accuracy_crossing(run), prediction_depth(run), *norm_claims(run)]
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
            baseline = f" (random {_fmt(r.value)})" if r is not None else ""
            text.append(f"{_ci(p)}{baseline} at step {p.step}")
        line = "cue AP:         " + " -> ".join(text)
        test = versus_reference(run, "ap", "ap_random").get(ap[-1].step)
        if test is not None and test.verdict is not None:
            line += f"; vs random (paired) {test.interval()}: {test.verdict}"
        lines.append(line)
    acc = metric_points(run, "probe/accuracy")
    if acc:
        ends = [acc[0], acc[-1]] if len(acc) > 1 else [acc[0]]
        lines.append("probe accuracy: " + " -> ".join(f"{_ci(p)} at step {p.step}"
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
