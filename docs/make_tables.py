"""Regenerate README's emergence and faithfulness tables, and the account of the default run,
from fresh demo runs, so that the README cannot drift from the code.

    python docs/make_tables.py                 # trains configs/tiny.yaml and docs.yaml afresh
    python docs/make_tables.py --tiny RUN_DIR  # reuse a finished tiny.yaml run
    make tables                                # the same as the first line

Each run's store gives the emergence table; its final checkpoint gives the faithfulness
table (every method, 64 held-out probes, the default replacement and count rule). The
README is rewritten between `<!-- tables:NAME:start -->` and `<!-- tables:NAME:end -->`.

Sentences follow the intervals: "above random" only when the 95% interval over probes lies
entirely above the random baseline, "rose" only when the later step's interval lies entirely
above the earlier one's; otherwise the text says the difference is within the intervals.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from normx_callbacks import load_run
from normx_callbacks.adapters import resolve_adapter
from normx_callbacks.checkpoints import load_model_and_tokenizer
from normx_callbacks.demo.corpora import load_corpus
from normx_callbacks.faithfulness import (
    faithfulness_rows,
    resolve_replacement,
    summarise_faithfulness,
)
from normx_callbacks.methods import METHODS
from normx_callbacks.metrics import bootstrap_interval
from normx_callbacks.probes import ProbeSet
from normx_callbacks.report import read_losses

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EMERGENCE_STEPS = (0, 32, 100, 300, 600)
NAMES = {"normxlogit": "NormXLogit", "logat": "LogAt", "norm": "norm alone", "random": "random",
         "saliency": "Saliency", "input_x_gradient": "InputXGradient",
         "integrated_gradients": "Integrated Gradients"}


# ------------------------------------------------------------------------------ runs


def train(config: str, root: Path) -> Path:
    """A fresh `train.py fit --config configs/<config>` run under `root`; its version dir."""
    command = [sys.executable, str(ROOT / "train.py"), "fit", "--config",
               str(ROOT / "configs" / config), "--trainer.default_root_dir", str(root),
               "--trainer.logger.init_args.save_dir", str(root)]
    print("running", " ".join(command), file=sys.stderr)
    subprocess.run(command, check=True, cwd=ROOT)
    return version_dir(root)


def version_dir(root: Path) -> Path:
    versions = sorted((root / "lightning_logs").glob("version_*"),
                      key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        raise SystemExit(f"no lightning_logs/version_* under {root}")
    return versions[-1]


def final_checkpoint(version: Path) -> Path:
    found = sorted((version / "checkpoints").glob("*.ckpt"), key=os.path.getmtime)
    if not found:
        raise SystemExit(f"no checkpoint in {version / 'checkpoints'}")
    return found[-1]


# ------------------------------------------------------------------------------ emergence


def _interval(metrics: pd.DataFrame, step: int, key: str) -> tuple[float, float, float]:
    row = metrics[(metrics.step == step) & (metrics.key == key)]
    if row.empty:
        return math.nan, math.nan, math.nan
    r = row.iloc[-1]
    return float(r.value), float(r.low), float(r.high)


def _ci(value: float, low: float, high: float, digits: int = 2) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isnan(low):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _versus(value_low_high, baseline: float) -> str:
    """'above', 'below' or 'within' random, by the interval."""
    _, low, high = value_low_high
    if low > baseline:
        return "above"
    if high < baseline:
        return "below"
    return "within"


def _score_spread(run, step: int) -> float:
    """Mean over probes of the standard deviation of last-layer NormXLogit over tokens."""
    tokens = run.tokens
    at = tokens[(tokens.step == step)]
    at = at[at.layer == at.layer.max()]
    return float(at.groupby("probe_id")["score"].std(ddof=0).mean())


def emergence(version: Path) -> str:
    run = load_run(version)
    metrics = run.metrics
    steps = [min(run.steps, key=lambda s, want=want: abs(s - want)) for want in EMERGENCE_STEPS]
    steps = list(dict.fromkeys(steps))
    losses, _ = read_losses(run)
    train_loss = next((v for k, v in losses.items() if "train" in k), None)
    val_loss = next((v for k, v in losses.items() if "val" in k), None)
    lines = ["| step | train loss | probe accuracy (target > foil) | cue AP | AP random | "
             "cue DP_z (scale-free) | DP random | cue DP (paper) | score spread | "
             "Spearman(norm, log freq) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for step in steps:
        loss = ""
        if train_loss is not None:
            s, v = train_loss
            i = int(np.argmin([abs(x - step) for x in s]))
            loss = f"{v[i]:.2f} (step {s[i]})" if s[i] != step else f"{v[i]:.2f}"
        if step == steps[-1] and val_loss is not None:
            loss += f" (val {val_loss[1][-1]:.2f})"
        ap = _interval(metrics, step, "alignment/ap")
        dpz = _interval(metrics, step, "alignment/dp_z")
        rho = _interval(metrics, step, "embedding/norm_logfreq_spearman")[0]
        lines.append(" | ".join([
            f"| {step}", loss, _ci(*_interval(metrics, step, "probe/accuracy")), _ci(*ap),
            f"{_interval(metrics, step, 'alignment/ap_random')[0]:.2f}", _ci(*dpz),
            f"{_interval(metrics, step, 'alignment/dp_random')[0]:.2f}",
            f"{_interval(metrics, step, 'alignment/dp_raw')[0]:.2f}",
            f"{_score_spread(run, step):.2f}",
            "n/a (no tokens seen)" if math.isnan(rho) else f"{rho:.2f}"]) + " |")
    return "\n".join(lines) + "\n\n" + account(run, steps)


def account(run, steps: list[int]) -> str:
    """What the table supports, in sentences that follow the intervals."""
    metrics = run.metrics
    first, last = steps[0], steps[-1]
    n = int(_interval(metrics, last, "alignment/probes")[0])
    text = [f"Brackets: 95% bootstrap intervals over the {n} probes (2000 resamples, seeded). "
            "Score spread: the mean over probes of the standard deviation of the last-layer "
            "scores over tokens, which the paper's DP depends on and DP_z does not."]
    ap_random = _interval(metrics, first, "alignment/ap_random")[0]
    where = {"above": "above", "below": "below", "within": "not distinguishable from"}
    for step in steps:
        ap = _interval(metrics, step, "alignment/ap")
        dpz = _interval(metrics, step, "alignment/dp_z")
        dp_random = _interval(metrics, step, "alignment/dp_random")[0]
        text.append(f"Step {step}: cue AP {where[_versus(ap, ap_random)]} random, DP_z "
                    f"{where[_versus(dpz, dp_random)]} random.")
    first_above = next((s for s in steps if _versus(_interval(metrics, s, "alignment/ap"),
                                                    ap_random) == "above"), None)
    if first_above is not None:
        text.append(f"The first tabulated step whose AP interval lies above random is "
                    f"{first_above}.")
    for key, name in (("alignment/dp_z", "DP_z"), ("alignment/ap", "AP"),
                      ("probe/accuracy", "Probe accuracy")):
        a, b = _interval(metrics, steps[1], key), _interval(metrics, last, key)
        if b[1] > a[2]:
            verdict = "rose"
        elif b[2] < a[1]:
            verdict = "fell"
        else:
            verdict = "did not change beyond the intervals"
        text.append(f"{name} between steps {steps[1]} and {last}: {verdict} "
                    f"({_ci(*a)} to {_ci(*b)}).")
    raw_a = _interval(metrics, steps[1], "alignment/dp_raw")[0]
    raw_b = _interval(metrics, last, "alignment/dp_raw")[0]
    text.append(f"The paper's DP went from {raw_a:.2f} to {raw_b:.2f} while the score spread "
                f"went from {_score_spread(run, steps[1]):.2f} to {_score_spread(run, last):.2f}; "
                "read its change through DP_z, which removes the spread.")
    layers = sorted(int(k.removeprefix("alignment/ap_layer")) for k in metrics.key.unique()
                    if k.startswith("alignment/ap_layer"))
    if layers:
        parts = []
        for layer in layers:
            ap = _interval(metrics, last, f"alignment/ap_layer{layer}")
            parts.append(f"layer {layer} {_ci(*ap)} ({where[_versus(ap, ap_random)]} random)")
        text.append(f"Per-layer AP at step {last}: " + "; ".join(parts) + ".")
    return " ".join(text)


# ------------------------------------------------------------------------------ faithfulness


def faithfulness(version: Path, suite: str, num_probes: int = 64) -> str:
    checkpoint = final_checkpoint(version)
    model, tokenizer = load_model_and_tokenizer(checkpoint)
    adapter = resolve_adapter(model)
    corpus = load_corpus(suite, seed=0, num_probes=num_probes)
    probes = ProbeSet(corpus.probes if adapter.kind == "causal" else corpus.masked_probes())
    config = model.config
    encoded = probes.encode(tokenizer, objective=adapter.kind,
                            max_length=getattr(config, "n_positions", None)
                            or getattr(config, "max_position_embeddings", None))
    replacement = resolve_replacement(tokenizer)
    rows = faithfulness_rows(model, encoded, METHODS, replacement=replacement,
                             tokenizer=tokenizer)
    table = summarise_faithfulness(rows).set_index("method")
    lines = ["| method | comprehensiveness ↑ [95% CI] | sufficiency ↓ [95% CI] | "
             "vs random (paired 95% CI of the difference) |", "|---|---|---|---|"]
    random = rows[rows.method == "random"].set_index("probe_id")
    for method, row in table.iterrows():
        verdict = "" if method == "random" else _paired(rows, random, method)
        comp = _ci(row.comprehensiveness, row.comprehensiveness_low, row.comprehensiveness_high, 3)
        suff = _ci(row.sufficiency, row.sufficiency_low, row.sufficiency_high, 3)
        lines.append(f"| {NAMES.get(method, method)} | {comp} | {suff} | {verdict} |")
    first = table.iloc[0]
    prob = float(np.mean([float(p) for p in _original_probs(model, encoded)]))
    lines += ["", f"{len(encoded)} probes; tokens removed by {replacement.describe()}, count "
              f"rule `{first.removal}` ({int(first.degenerate_cells)} of {int(first.cells)} "
              f"(probe, k) cells degenerate; candidates per probe: min "
              f"{int(first.n_candidates_min)}, median {first.n_candidates_median:g}); mean "
              f"probability of the explained prediction {prob:.2f}."]
    return "\n".join(lines)


def _paired(rows: pd.DataFrame, random: pd.DataFrame, method: str) -> str:
    """Comprehensiveness and sufficiency against random's on the same probes: "better" or
    "worse" only when the paired bootstrap interval of the difference excludes 0."""
    mine = rows[rows.method == method].set_index("probe_id")
    parts = []
    for name, sign in (("comprehensiveness", 1.0), ("sufficiency", -1.0)):
        diff = sign * (mine[name] - random.loc[mine.index, name]).to_numpy()  # > 0: better
        low, high = bootstrap_interval(diff)
        word = "better" if low > 0 else "worse" if high < 0 else "not distinguishable"
        parts.append(f"{name[:4]}. {word}")
    return ", ".join(parts)


def _original_probs(model, encoded):
    from normx_callbacks.attribution import normxlogit

    attr = normxlogit(model, encoded.input_ids, encoded.attention_mask,
                      positions=encoded.positions)
    return attr.target_probs.tolist()


# ------------------------------------------------------------------------------ README


def replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- tables:{name}:start -->", f"<!-- tables:{name}:end -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {start} ... {end} markers")
    note = "<!-- generated by docs/make_tables.py: edit the script, not this block -->\n"
    return pattern.sub(lambda _: f"{start}\n{note}\n{body.strip()}\n\n{end}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", type=Path, help="a finished tiny.yaml run (default: train)")
    parser.add_argument("--docs", type=Path, help="a finished docs.yaml run (default: train)")
    parser.add_argument("--skip-docs", action="store_true",
                        help="no docs.yaml run: its table says it was not generated")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="normx-tables-"))
    tiny = version_dir(args.tiny) if args.tiny else train("tiny.yaml", scratch / "tiny")
    text = args.readme.read_text(encoding="utf-8")
    text = replace_block(text, "emergence", emergence(tiny))
    text = replace_block(text, "faithfulness-tiny", faithfulness(tiny, "agreement"))
    if args.skip_docs:
        text = replace_block(text, "faithfulness-docs", "Not generated by the last `make tables` "
                             "run (it was given `--skip-docs`); run `make tables` to fill it.")
    else:
        docs = version_dir(args.docs) if args.docs else train("docs.yaml", scratch / "docs")
        text = replace_block(text, "faithfulness-docs", faithfulness(docs, "docs"))
    args.readme.write_text(text, encoding="utf-8")
    print(f"rewrote the tables in {args.readme} (runs under {scratch})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
