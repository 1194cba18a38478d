"""Regenerate README's emergence and faithfulness tables, and the account of the demo runs,
from fresh demo runs, so that the README cannot drift from the code.

    python docs/make_tables.py                 # trains tiny.yaml, mlm-tiny.yaml and docs.yaml
    python docs/make_tables.py --tiny RUN_DIR  # reuse a finished tiny.yaml run (--mlm, --docs)
    make tables                                # the same as the first line

Each run's store gives an emergence table; its final checkpoint a faithfulness table (every
method, 64 held-out probes, the default replacement and count rule, each probe's target
explained). The README is rewritten between `<!-- tables:NAME:start -->` and
`<!-- tables:NAME:end -->`.

Every verdict and sentence comes from `normx_callbacks.statistics` (paired bootstraps over the
probes; "first above" at two consecutive snapshots) through `normx_callbacks.summary`, the
same functions the end-of-run message, `normx summary` and the report use.
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
from normx_callbacks.checkpoints import load_model_and_tokenizer
from normx_callbacks.demo.corpora import load_corpus
from normx_callbacks.discovery import resolve_adapter
from normx_callbacks.faithfulness import (
    RANDOM_PERMUTATIONS,
    faithfulness_rows,
    summarise_faithfulness,
)
from normx_callbacks.methods import METHODS
from normx_callbacks.probes import ProbeSet
from normx_callbacks.removal import resolve_replacement
from normx_callbacks.report import read_losses
from normx_callbacks.statistics import change, paired, probe_values
from normx_callbacks.summary import paired_tests, summary_paragraph

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EMERGENCE_STEPS = (0, 8, 32, 100, 300, 600)
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


def _value(metrics: pd.DataFrame, step: int, key: str) -> tuple[float, float, float]:
    row = metrics[(metrics.step == step) & (metrics.key == key)]
    if row.empty:
        return math.nan, math.nan, math.nan
    r = row.iloc[-1]
    return float(r.value), float(r.low), float(r.high)


def _ci(value: float, low: float = math.nan, high: float = math.nan, digits: int = 2) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isnan(low):
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _test(test, digits: int = 2) -> str:
    """A paired difference with its interval and the verdict `statistics` gives it."""
    if test is None or test.verdict is None:
        return "n/a"
    mark = {"above": " ↑", "below": " ↓"}.get(test.verdict, "")
    return f"{test.interval(digits)}{mark}"


def _pair(run, column: str, baseline: str, step: int):
    a, b = probe_values(run, column).get(step), probe_values(run, baseline).get(step)
    if a is None or b is None:
        return None
    common = a.index.intersection(b.index)
    return paired(a.loc[common].to_numpy(), b.loc[common].to_numpy())


def _since_first(run, column: str, step: int):
    values = probe_values(run, column)
    if not values or step not in values:
        return None
    return change(values[min(values)], values[step])


def emergence(version: Path) -> str:
    run = load_run(version)
    metrics = run.metrics
    steps = [min(run.steps, key=lambda s, want=want: abs(s - want)) for want in EMERGENCE_STEPS]
    steps = list(dict.fromkeys(steps))
    losses, _ = read_losses(run)
    train_loss = next((v for k, v in losses.items() if "train" in k), None)
    lines = ["| step | train loss | probe accuracy | cue AP | AP random | AP − random | "
             "AP − step 0 | target−foil AP − random | cue > attractor (random) | "
             "InputXGradient AP − random | NormXLogit − InputXGradient AP | prediction depth "
             "(probes) | Spearman(norm, info gain) | Spearman(norm, log freq) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for step in steps:
        loss = ""
        if train_loss is not None:
            s, v = train_loss
            i = int(np.argmin([abs(x - step) for x in s]))
            loss = f"{v[i]:.2f}" + (f" (step {s[i]})" if s[i] != step else "")
        accuracy = _ci(*_value(metrics, step, "probe/accuracy"))
        depth = _value(metrics, step, "probe/prediction_depth")[0]
        never = _value(metrics, step, "probe/prediction_depth_never")[0]
        total = _value(metrics, step, "probe/probes")[0]
        reached = "" if math.isnan(never) else f" ({int(total - never)}/{int(total)})"
        attractor = _value(metrics, step, "alignment/cue_over_attractor")
        attractor_random = _value(metrics, step, "alignment/cue_over_attractor_random")[0]
        rho_ig = _value(metrics, step, "embedding/norm_infogain_spearman")
        rho_f = _value(metrics, step, "embedding/norm_logfreq_spearman")
        lines.append(" | ".join([
            f"| {step}", loss, accuracy, _ci(*_value(metrics, step, "alignment/ap")),
            _ci(_value(metrics, step, "alignment/ap_random")[0]),
            _test(_pair(run, "ap", "ap_random", step)), _test(_since_first(run, "ap", step)),
            _test(_pair(run, "ap_contrast", "ap_contrast_random", step)),
            (f"{_ci(*attractor)} ({attractor_random:.2f})" if not math.isnan(attractor[0])
             else "n/a"),
            _test(_pair(run, "ap_input_x_gradient", "ap_random", step)),
            _test(_pair(run, "ap", "ap_input_x_gradient", step)),
            ("none" if math.isnan(depth) else f"{depth:.2f}") + reached,
            _ci(*rho_ig) if not math.isnan(rho_ig[0]) else "n/a",
            _ci(*rho_f) if not math.isnan(rho_f[0]) else "n/a (no tokens seen)"]) + " |")
    return "\n".join(lines) + "\n\n" + account(run, steps)


def account(run, steps: list[int]) -> str:
    """What the table supports: how it was computed, then the run's paired tests and the
    summary paragraph, both from `statistics` (through `summary`)."""
    metrics = run.metrics
    last = steps[-1]
    n = int(_value(metrics, last, "probe/probes")[0])
    entered = int(_value(metrics, last, "alignment/probes")[0])
    at_target = _value(metrics, last, "alignment/probes_cue_at_target")[0]
    contrast = _value(metrics, last, "alignment/ap_contrast_probes")[0]
    attractor = _value(metrics, last, "alignment/cue_over_attractor_probes")[0]
    masked = run.meta.get("run_meta", {}).get("objective") == "masked"
    ranked = ("every real token but the explained mask slot" if masked else
              "every real token before the explained position (never the explained one)")
    text = [
        f"Brackets: 95% bootstrap intervals over probes (2000 resamples, seeded). Alignment "
        f"ranks {ranked}, so {entered} of {n} probes enter it"
        + (f"; {int(at_target)} whose only cue sits at the explained position cannot"
           if at_target == at_target and at_target else "")
        + (f". The target−foil column: {int(contrast)} probes with a foil" if contrast == contrast
           else "")
        + (f"; cue > attractor: {int(attractor)} probes with a cue and an attractor among the "
           "candidates (1: the cue scores above every attractor, 0: below, ties 0.5; random "
           "r/(r+a))" if attractor == attractor else "")
        + ". Columns with − are paired differences over the same probes (bootstrap of the "
        "per-probe difference, 95% interval; ↑/↓: the interval excludes 0). InputXGradient "
        "is measured at the faithfulness steps only (n/a elsewhere). Prediction depth: the "
        "mean first layer whose logit lens ranks the target first, over the probes where some "
        "layer does (their count in brackets). Spearman correlations are over token types "
        "(information gain: types with at least 20 counted next-token pairs; log frequency: "
        "types seen), with bootstrap intervals over types."]
    tests = paired_tests(run)
    text.append(reading(tests))
    if tests:
        text.append("Paired tests at the last snapshot: " + "; ".join(
            f"{t['comparison']} {t['difference']} ({t['verdict']}, {t['probes']} probes)"
            for t in tests) + ".")
    text.append(summary_paragraph(run))
    return " ".join(text)


def reading(tests: list[dict]) -> str:
    """What the paired tests support, in words that follow their verdicts (so a rerun with
    other numbers rewrites them): the cue against chance, then its controls."""
    verdict = {t["comparison"]: t["verdict"] for t in tests}
    ap = verdict.get("cue AP - random")
    if ap is None:
        return ""
    out = []
    if ap == "above":
        out.append("**Reading.** NormXLogit ranks the cue above chance at the end of the run")
        if verdict.get("target-minus-foil AP - random") != "above":
            out.append("but its target-minus-foil form does not: what puts the cue first is "
                       "not detectably evidence for the right number over the wrong one, and a "
                       "word-class effect (a subject predicts a verb, whatever its number) "
                       "would give the same picture")
    elif ap == "below":
        out.append("**Reading.** NormXLogit ranks the cue below chance at the end of the run")
    else:
        out.append("**Reading.** NormXLogit's cue ranking is not distinguishable from chance "
                   "at the end of the run")
    text = ", ".join(out) + "."
    attractor = verdict.get("cue over attractor - random")
    if attractor is not None:
        text += (" The cue outscores the wrong-number attractor more often than chance."
                 if attractor == "above" else
                 " The cue does not outscore the wrong-number attractor more often than "
                 "chance" + (" (less often)." if attractor == "below" else "."))
    reference = verdict.get("input x gradient AP - random")
    follows = verdict.get("NormXLogit AP - input x gradient AP")
    if reference is not None:
        where = {"above": "above", "below": "below"}.get(reference, "not distinguishable from")
        text += f" By the gradient reference (input × gradient) the cue ranks {where} chance"
        text += {"below": ", and NormXLogit ranks it lower than that reference.",
                 "above": ", and NormXLogit ranks it higher than that reference."}.get(
            follows, ", and NormXLogit is not distinguishable from that reference.")
    return text


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
    explained = rows[rows.method == rows.method.iloc[0]]["explained"]
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
    agree = float(np.mean(rows[rows.method == rows.method.iloc[0]]["correct"] == 1))
    given = int((explained == "target").sum())
    others = "" if given == len(explained) else "; the model's argmax for the others"
    lines += ["", f"{len(encoded)} probes; explained: each probe's target "
              f"({given} of {len(explained)}{others}), which is also the model's argmax in "
              f"{agree:.0%} of the probes; tokens "
              f"removed by {replacement.describe()} (the default, fixed by a rule stated "
              f"before any result: docs/method.md), count rule `{first.removal}` "
              f"({int(first.degenerate_cells)} of {int(first.cells)} (probe, k) cells "
              f"degenerate; candidates per probe: min {int(first.n_candidates_min)}, median "
              f"{first.n_candidates_median:g}); random: the mean over {RANDOM_PERMUTATIONS} "
              f"seeded rankings; mean probability of the explained prediction {prob:.2f}."]
    return "\n".join(lines)


def _paired(rows: pd.DataFrame, random: pd.DataFrame, method: str) -> str:
    """Comprehensiveness and sufficiency against random's on the same probes: "better" or
    "worse" only when the paired bootstrap interval of the difference excludes 0."""
    mine = rows[rows.method == method].set_index("probe_id")
    parts = []
    for name, sign in (("comprehensiveness", 1.0), ("sufficiency", -1.0)):
        test = paired(sign * mine[name].to_numpy(),
                      sign * random.loc[mine.index, name].to_numpy())  # > 0: better
        word = {"above": "better", "below": "worse"}.get(test.verdict, "not distinguishable")
        parts.append(f"{name[:4]}. {word}")
    return ", ".join(parts)


def _original_probs(model, encoded):
    from normx_callbacks.attribution import normxlogit

    attr = normxlogit(model, encoded.input_ids, encoded.attention_mask,
                      positions=encoded.positions, targets=encoded.targets)
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
    parser.add_argument("--mlm", type=Path, help="a finished mlm-tiny.yaml run (default: train)")
    parser.add_argument("--docs", type=Path, help="a finished docs.yaml run (default: train)")
    parser.add_argument("--skip-docs", action="store_true",
                        help="no docs.yaml run: its table says it was not generated")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="normx-tables-"))
    tiny = version_dir(args.tiny) if args.tiny else train("tiny.yaml", scratch / "tiny")
    mlm = version_dir(args.mlm) if args.mlm else train("mlm-tiny.yaml", scratch / "mlm")
    text = args.readme.read_text(encoding="utf-8")
    text = replace_block(text, "emergence", emergence(tiny))
    text = replace_block(text, "emergence-mlm", emergence(mlm))
    text = replace_block(text, "faithfulness-tiny", faithfulness(tiny, "agreement"))
    text = replace_block(text, "faithfulness-mlm", faithfulness(mlm, "agreement"))
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
