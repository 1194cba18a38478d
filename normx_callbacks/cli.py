"""The `normx` command: report, summary, attribute and export for NormXLogit runs.

    normx report RUN_DIR [RUN_DIR ...] -o report.html
    normx summary RUN_DIR
    normx attribute CHECKPOINT --text "the keys near the cabinet" --target are --foil is
    normx export RUN_DIR --format parquet -o OUT_DIR
    normx faithfulness CHECKPOINT [--probes FILE | --suite agreement] [-o table.md]
    normx replay CHECKPOINT [CHECKPOINT ...] --probes blimp:DIR -o STORE

Errors print one line on stderr and exit with status 1 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import textwrap
import time
import traceback
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from .adapters import UnsupportedModelError
from .catalog import empty_store_reason, find_runs, find_store, select_runs
from .loading import RunData, load_store
from .messages import anticipated, one_line, warning_lines
from .probes import ProbeError
from .store import SnapshotStore, StoreError

log = logging.getLogger(__name__)

_FORMATS = ("csv", "parquet", "jsonl")
_POSITIVE = (214, 39, 40)  # red: evidence for the prediction (as the report's colours)
_NEGATIVE = (31, 119, 180)  # blue: evidence against it

# ------------------------------------------------------------------------------ loading runs


def _find(paths: Sequence[str | os.PathLike], selectors: Sequence[str] | None) -> list[Path]:
    """The store directories the ``--run`` selectors pick among all runs at ``paths`` (one per
    path without selectors), by store.py's discovery."""
    if not selectors:
        return [find_store(path) for path in paths]
    runs = [info for path in paths for info in find_runs(path)]
    picked = [info.path for s in selectors for info in select_runs(runs, s)]
    return list(dict.fromkeys(picked))


def _load(paths: Sequence[str | os.PathLike], selectors: Sequence[str] | None = None,
          skip_corrupt: bool = False) -> list[RunData]:
    """The runs at ``paths``; a store without a committed snapshot is an error that says
    why (empty or half-written). ``skip_corrupt``: steps whose files are missing or
    unreadable are left out, one warning line each, instead of stopping the command."""
    runs = []
    for root in _find(paths, selectors):
        run = load_store(root, skip_corrupt=skip_corrupt)
        if not run.steps:
            if skip_corrupt and SnapshotStore(root).steps():
                raise StoreError(f"every snapshot in {run.path} is corrupt and was skipped "
                                 "(--skip-corrupt): nothing to show")
            raise StoreError(empty_store_reason(root) or
                             f"{run.path} holds no committed snapshot yet: nothing to show")
        runs.append(run)
    return runs


def _load_one(path: str | os.PathLike, selector: str | None,
              skip_corrupt: bool = False) -> RunData:
    runs = _load([path], [selector] if selector else None, skip_corrupt)
    if len(runs) != 1:
        raise StoreError(f"--run {selector} selects {len(runs)} runs; this command shows one")
    return runs[0]


# ------------------------------------------------------------------------------ report


def _progress_printer(stream=None):
    stream = stream or sys.stderr
    tty = stream.isatty()
    state = {"last": 0.0}

    def show(done: int, total: int, what: str) -> None:
        if tty:
            stream.write(f"\rnormx report: {done}/{total} {what[:50]:<50}")
            if done == total:
                stream.write("\n")
            stream.flush()
        elif done == total or time.monotonic() - state["last"] > 2.0:
            state["last"] = time.monotonic()
            stream.write(f"normx report: {done}/{total} figures\n")
            stream.flush()

    return show


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    if args.max_probes < 0:
        raise ValueError(f"--max-probes {args.max_probes} must be >= 0")
    start = time.monotonic()
    runs = _load(args.run_dirs, args.run, args.skip_corrupt)
    out = write_report(runs, args.output, step=args.step, max_probes=args.max_probes,
                       probes=args.probe, progress=None if args.quiet else _progress_printer())
    size = out.stat().st_size / 1e6
    print(f"wrote {out} ({size:.1f} MB, {len(runs)} run(s)) in {time.monotonic() - start:.1f} s")
    return 0


# ------------------------------------------------------------------------------ summary


def cmd_summary(args: argparse.Namespace) -> int:
    import pandas as pd

    from .report import headline_table
    from .summary import paired_tests, summary_paragraph

    run = _load_one(args.run_dir, args.run, args.skip_corrupt)
    meta = run.meta.get("run_meta", {}) if isinstance(run.meta, dict) else {}
    probes = run["probes"]["probe_id"].nunique() if "probes" in run else "?"
    print(f"store:     {run.path}")
    if run.run_record:
        continues = run.run_record.get("continues")
        print(f"run:       {run.run_record['run_id']}"
              + (f" (continues run {continues})" if continues else ""))
    print(f"model:     {meta.get('model', '?')} ({meta.get('objective', '?')}, "
          f"{meta.get('num_layers', '?')} layers, vocabulary {meta.get('vocab_size', '?')})")
    print(f"snapshots: {len(run.steps)} (steps {run.steps[0]}..{run.steps[-1]}), "
          f"{probes} probes")
    if not run.missing.empty:
        for step, reason in zip(run.missing["step"], run.missing["reason"], strict=True):
            print(f"missing:   step {step}: {_terminal_safe(reason)}")
    print()
    table = headline_table(run)
    print(table.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3f}"))
    print("\nap, dp_raw (the paper's DP), dp_z (DP of per-probe standardised scores, "
          "scale-free; random: dp_random): evidence alignment of the cue words, NormXLogit at "
          "the last layer over the positions before the explained one (random = expected by "
          "chance); ap_contrast: the same for norm x (target - foil LogAt); "
          "cue_over_attractor: share of probes whose cue outscores every attractor; "
          "ap_input_x_gradient: the gradient reference; prediction_depth: first layer whose "
          "logit lens ranks the target first; stability: Spearman vs the previous snapshot. "
          "95% intervals over probes: load_run(...).metrics low/high.")
    tests = paired_tests(run)
    if tests:
        print("\npaired tests over probes (bootstrap of the per-probe difference, 95% interval):")
        print(pd.DataFrame(tests).to_string(index=False))
    paragraph = summary_paragraph(run)
    if paragraph:
        print()
        print(textwrap.fill(paragraph, width=100))
    return 0


# ------------------------------------------------------------------------------ export


def cmd_export(args: argparse.Namespace) -> int:
    import json

    run = _load_one(args.run_dir, args.run, args.skip_corrupt)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"-o {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    tables = dict(run.tables)
    if not run.missing.empty:
        tables["missing"] = run.missing
    written = []
    for name, frame in sorted(tables.items()):
        path = out / f"{name}.{args.format}"
        if args.format == "csv":
            frame.to_csv(path, index=False)
        elif args.format == "parquet":
            frame.to_parquet(path, index=False)
        else:
            frame.to_json(path, orient="records", lines=True, force_ascii=False)
        written.append(f"{path.name} ({len(frame)} rows)")
    (out / "meta.json").write_text(json.dumps(run.meta, indent=1, default=str) + "\n")
    print(f"wrote {len(written)} tables to {out}: {', '.join(written)}, meta.json")
    return 0


# ------------------------------------------------------------------------------ attribute


def _terminal_safe(text: str) -> str:
    """No control characters (an ANSI escape in a token must not drive the terminal)."""
    text = str(text).replace("\n", "\u21b5").replace("\t", "\u2192")
    return "".join(c if unicodedata.category(c)[0] != "C" else repr(c)[1:-1] for c in text)


def _background(value: float, bound: float) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(background, foreground) RGB for a zero-centred score: white at 0."""
    a = min(abs(value) / bound, 1.0) if bound > 0 else 0.0
    base = _POSITIVE if value >= 0 else _NEGATIVE
    rgb = tuple(round(255 + (c - 255) * a) for c in base)
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return rgb, ((0, 0, 0) if luminance > 140 else (255, 255, 255))


def colour_tokens(tokens: Sequence[str], scores: Sequence[float], bound: float) -> str:
    """Tokens with ANSI 24-bit backgrounds, zero-centred on ``bound``."""
    out = []
    for token, value in zip(tokens, scores, strict=True):
        text = _terminal_safe(token)
        if not math.isfinite(value):
            out.append(f"\x1b[2m{text}\x1b[0m")
            continue
        (r, g, b), (fr, fg, fb) = _background(value, bound)
        out.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;{fr};{fg};{fb}m{text}\x1b[0m")
    return "".join(out)


def _parse_layers(text: str, num_layers: int):
    if text == "all":
        return "all"
    if text == "last":
        return None
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise ValueError(f"--layers {text!r}: use 'last', 'all' or comma-separated indices "
                         f"in 0..{num_layers} (e.g. 0,{num_layers})")
    return layers


def _decode(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


def _quietly(args: argparse.Namespace, fn, *fn_args):
    """Call ``fn`` without transformers' loading bars and chatter (unless --debug): on stderr
    they would bury the one line an error gets."""
    if getattr(args, "debug", False):
        return fn(*fn_args)
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return fn(*fn_args)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def cmd_attribute(args: argparse.Namespace) -> int:
    import torch

    from .attribution import normxlogit
    from .checkpoints import load_model_and_tokenizer
    from .discovery import resolve_adapter
    from .probes import ProbeSet

    if args.foil is not None and args.target is None:
        raise ValueError(f"--foil {args.foil!r} needs --target: the foil is a contrast to it")
    model, tokenizer = _quietly(args, load_model_and_tokenizer, args.checkpoint, args.tokenizer)
    adapter = resolve_adapter(model)
    if adapter.kind not in ("causal", "masked"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is a {adapter.kind} model; `normx attribute` explains "
            "causal and masked LM predictions (use normxlogit() in Python for classifiers)")
    layers = _parse_layers(args.layers, adapter.num_layers)
    probe = {"text": args.text, "target": args.target, "foil": args.foil}
    probe = {k: v for k, v in probe.items() if v is not None}
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions",
                                                                          None)
    try:
        enc = ProbeSet([probe]).encode(tokenizer, objective=adapter.kind, max_length=context)
    except ProbeError as error:  # its "probe 'probe-0' (index 0)" label means --text here
        raise ProbeError(f"--text {args.text!r}: {str(error).split(': ', 1)[-1]}") from error
    with torch.no_grad():
        attr = normxlogit(model, enc.input_ids, enc.attention_mask, positions=enc.positions,
                          targets=enc.targets, foils=enc.foils if args.foil else None,
                          layers=layers, norm=args.norm)
    n = int(enc.attention_mask[0].sum())
    tokens = enc.tokens[0][:n]
    if attr.layer_scores is not None:
        rows = [(f"layer {layer}", attr.layer_scores[0, k, :n].tolist())
                for k, layer in enumerate(attr.layers)]
    else:
        rows = [(f"layer {adapter.num_layers}", attr.scores[0, :n].tolist())]
    rows = [(name + (" (last)" if name == f"layer {adapter.num_layers}" else ""), values)
            for name, values in rows]
    position = int(attr.positions[0])
    facts = (f"explains the prediction at position {position} ({tokens[position]!r}): target "
             f"{_decode(tokenizer, attr.targets[0])!r} p = {float(attr.target_probs[0]):.3f}, "
             f"logit {float(attr.target_logits[0]):.3f}")
    if args.target is None:
        facts += " (the model's top prediction; pass --target WORD to choose)"
    if attr.contrast_logat is not None and args.foil:
        contrast = float(attr.contrast_logat[0, position])
        facts += (f"; foil {_decode(tokenizer, attr.foils[0])!r}: target - foil logit "
                  f"{contrast:+.3f}")
    header = [f"checkpoint: {args.checkpoint} ({type(model).__name__}, {adapter.kind}, "
              f"{adapter.num_layers} layers, norm={args.norm})", facts]

    if args.output:
        _attribute_html(args, header, tokens, rows, attr, n)
        print(f"wrote {args.output}")
        return 0
    finite = [abs(v) for _, values in rows for v in values if math.isfinite(v)]
    bound = max(finite) if finite else 1.0
    colour = (not args.no_color and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    for line in header:
        print(_terminal_safe(line))
    print()
    if colour:
        width = max(len(name) for name, _ in rows)
        for name, values in rows:
            print(f"{name:>{width}}  {colour_tokens(tokens, values, bound)}")
        scale = colour_tokens([f" -{bound:.3g} ", "   ", " 0 ", "   ", f" +{bound:.3g} "],
                              [-bound, -bound / 2, 0.0, bound / 2, bound], bound)
        print(f"\n{'NormXLogit':>{width}}  {scale}  (blue: against the prediction, "
              "red: for it; dim: not scored)")
    else:
        names = [name for name, _ in rows]
        shown = [repr(_terminal_safe(t)) for t in tokens]
        tw = max(5, *(len(t) for t in shown))
        print(f"{'pos':>3}  {'token':<{tw}}  " + "  ".join(f"{n:>14}" for n in names))
        for t, text in enumerate(shown):
            cells = "  ".join(f"{values[t]:>14.4f}" if math.isfinite(values[t]) else f"{'-':>14}"
                              for _, values in rows)
            mark = "  <- explained" if t == position else ""
            print(f"{t:>3}  {text:<{tw}}  {cells}{mark}")
        print("\nscores: NormXLogit (zero-centred: > 0 supports the prediction, < 0 argues "
              "against it; - = not scored)")
    return 0


def _attribute_html(args, header, tokens, rows, attr, n) -> None:
    from . import images, plots
    from .pages import esc, figure_html, page, token_legend, token_strip

    body = ["<h1>normx attribute</h1>"]
    body += [f'<p class="meta">{esc(line)}</p>' for line in header]
    body.append(f'<div class="text">{esc(args.text)}</div>')
    body.append(token_legend())
    for name, values in rows:
        body.append(f'<div class="runlabel">NormXLogit, {esc(name)}</div>'
                    + token_strip(tokens, values))
    if attr.layer_scores is not None and len(attr.layers) > 1:
        labels = [images.display_token(t) for t in tokens]
        fig = plots.layer_figure(attr.layer_scores[0, :, :n].numpy(), labels, attr.layers,
                                 title="NormXLogit per layer")
        body.append(figure_html(fig, "NormXLogit per layer"))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page("normx attribute", "\n".join(body)), encoding="utf-8")


def cmd_faithfulness(args) -> int:
    """AOPC comprehensiveness/sufficiency per method for a checkpoint on a probe set."""
    from .checkpoints import load_model_and_tokenizer
    from .discovery import resolve_adapter
    from .faithfulness import faithfulness_table, resolve_replacement
    from .methods import METHODS
    from .probes import ProbeSet

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods {args.methods!r}: unknown {unknown}; valid names are "
                         f"{', '.join(METHODS)}")
    model, tokenizer = load_model_and_tokenizer(args.checkpoint, tokenizer=args.tokenizer)
    adapter = resolve_adapter(model)
    if args.probes:
        probes = ProbeSet.coerce(args.probes) if Path(args.probes).suffix != ".txt" else \
            ProbeSet([line.strip() for line in Path(args.probes).read_text("utf-8").splitlines()
                      if line.strip()])
    else:
        from .demo.corpora import load_corpus

        corpus = load_corpus(args.suite, seed=args.seed, num_probes=args.num_probes)
        probes = ProbeSet(corpus.probes if adapter.kind == "causal" else corpus.masked_probes())
    config = getattr(model, "config", None)
    max_length = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None)
    encoded = probes.encode(tokenizer, objective=adapter.kind, max_length=max_length)
    print(f"faithfulness of {args.checkpoint} on {len(encoded)} probes: {', '.join(methods)}",
          file=sys.stderr)
    replacement = resolve_replacement(tokenizer, args.replacement)
    table = faithfulness_table(
        model, encoded, methods, replacement=replacement, tokenizer=tokenizer,
        removal=args.removal, n_steps=args.n_steps, batch_size=args.batch_size)
    print(f"removal: {replacement.describe()}, count rule {args.removal!r}; "
          f"{int(table['degenerate_cells'].iloc[0])} of {int(table['cells'].iloc[0])} "
          "(probe, k) cells degenerate; [low, high]: 95% bootstrap interval over probes",
          file=sys.stderr)
    shown = table.drop(columns=["n_instances", "cells", "degenerate_cells"]).round(4)
    print(shown.to_markdown(index=False) if _has_tabulate() else shown.to_string(index=False))
    for out in args.output or []:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".csv":
            table.to_csv(path, index=False)
        elif path.suffix == ".md":
            from .pages import markdown_table

            path.write_text(markdown_table(table.round(4), "{:.4f}") + "\n", encoding="utf-8")
        else:
            raise ValueError(f"--output {out!r}: use a .csv or .md file name")
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _parse_steps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--steps {text!r}: give comma-separated integers, one per "
                         "checkpoint") from None


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay a checkpoint series into a snapshot store."""
    from .replay import ReplayError, replay

    layers = args.layers
    if layers not in ("all", "last"):
        try:
            layers = [int(x) for x in layers.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--layers {args.layers!r}: use 'all', 'last' or comma-separated "
                             "layer indices") from None
    try:
        written = replay(args.checkpoints, probes=args.probes, store_dir=args.output,
                         tokenizer=args.tokenizer, layers=None if layers == "last" else layers,
                         device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                         model_class=args.model_class, steps=_parse_steps(args.steps),
                         faithfulness=args.faithfulness, count_corpus=args.count_corpus,
                         progress=not args.quiet)
    except ReplayError as error:
        if getattr(args, "debug", False):
            raise
        for line in error.lines:
            print(f"normx replay: error: {one_line(line)}", file=sys.stderr)
        return 1
    print(f"replayed {len(written)} checkpoint(s) into {args.output}"
          + (f" (steps {', '.join(map(str, written))})" if written else ""), file=sys.stderr)
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------ parser


def _add_run_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", metavar="RUN", help="which run, when RUN_DIR holds several: a run "
                   "id, a unique prefix of one, or 'latest' (the run written last)")


def _add_skip_corrupt_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-corrupt", action="store_true",
                   help="leave out snapshots whose files are missing or unreadable (one warning "
                   "line each) instead of stopping at the first")


def build_parser() -> argparse.ArgumentParser:
    from .faithfulness import REMOVALS, REPLACEMENTS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks and library warnings")
    parser = argparse.ArgumentParser(
        prog="normx", parents=[common],
        description="Reports and attributions for NormXLogit snapshot stores and checkpoints.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("report", parents=[common], help="one self-contained HTML report",
                       description="Render one self-contained HTML report (no network) from "
                       "one or more runs; several runs are shown side by side.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a snapshot store, or a log directory with a normx/ store below")
    p.add_argument("-o", "--output", default="report.html", help="HTML file (default: %(default)s)")
    p.add_argument("--run", action="append", metavar="RUN",
                   help="run(s) to show, among all runs at the RUN_DIRs: a run id, a unique "
                   "prefix, 'latest' (written last) or 'all'; repeat to compare runs")
    p.add_argument("--step", type=int, default=None,
                   help="snapshot for the layer x token views (default: the last)")
    p.add_argument("--max-probes", type=int, default=12,
                   help="probes shown (default: %(default)s)")
    p.add_argument("--probe", action="append", metavar="ID",
                   help="show this probe (repeatable; overrides --max-probes)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    _add_skip_corrupt_option(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("summary", parents=[common], help="snapshots and headline metrics",
                       description="Print the snapshots of a run and their headline metrics.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    _add_run_option(p)
    _add_skip_corrupt_option(p)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("attribute", parents=[common], help="attribute one text with a checkpoint",
                       description="NormXLogit attribution of one prediction of a checkpoint "
                       "(Lightning .ckpt of normx_callbacks.demo.LanguageModel, or a Hugging "
                       "Face model directory), as coloured tokens or an HTML page.")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--text", required=True,
                   help="the prefix (causal LM) or a sentence with [MASK] (masked LM)")
    p.add_argument("--target", help="word whose prediction is explained (default: top prediction)")
    p.add_argument("--foil", help="contrast word (needs --target)")
    p.add_argument("--layers", default="last",
                   help="'last' (default), 'all', or comma-separated layer indices")
    p.add_argument("--norm", choices=("layer0", "word"), default="layer0",
                   help="norm of the input vectors (default: %(default)s)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer directory (default: found from the checkpoint)")
    p.add_argument("--no-color", action="store_true", help="plain text with scores")
    p.add_argument("-o", "--output", help="write an HTML page instead of printing")
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("faithfulness", parents=[common], help="AOPC table for a checkpoint",
                       description="Comprehensiveness and sufficiency (AOPC) "
                       "of each attribution method on a checkpoint and a probe set, with time "
                       "per instance and peak memory, as in the paper's tables.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="Lightning .ckpt of normx_callbacks.demo.LanguageModel or an HF model dir")
    p.add_argument("--probes", metavar="FILE",
                   help="probe file (.yaml/.jsonl/.json), blimp:PATH, or a .txt file with one "
                   "text per line")
    p.add_argument("--suite", default="agreement",
                   help="built-in held-out probe suite when --probes is not given: agreement "
                   "or docs (default: %(default)s)")
    p.add_argument("--num-probes", type=int, default=64, help="probes from --suite")
    p.add_argument("--seed", type=int, default=0, help="seed of the built-in suite")
    p.add_argument("--methods", default="normxlogit,logat,norm,random,saliency,"
                   "input_x_gradient,integrated_gradients",
                   help="comma-separated methods (default: all; gradient ones need captum)")
    p.add_argument("--n-steps", type=int, default=50, help="Integrated Gradients steps")
    p.add_argument("--batch-size", type=int, default=16, help="rows per attribution pass")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: found)")
    p.add_argument("--replacement", default="auto", choices=REPLACEMENTS,
                   help="how a token is removed (default: %(default)s: the tokenizer's mask "
                   "token, else its eos token, else deletion by attention mask)")
    p.add_argument("--removal", default="nearest", choices=REMOVALS,
                   help="tokens removed at fraction k of n: nearest = round(k*n) within 1..n-1, "
                   "floor = int(k*n) as originally (default: %(default)s)")
    p.add_argument("-o", "--output", action="append", metavar="FILE",
                   help="also write the table as .csv or .md (repeatable)")
    p.set_defaults(func=cmd_faithfulness)

    p = sub.add_parser("replay", parents=[common], help="turn a checkpoint series into a run",
                       description="Measure each checkpoint of a series (HF save_pretrained "
                       "directories, Lightning .ckpt files, or directories/globs of them) in "
                       "step order and write the snapshot store the callback writes; steps "
                       "already in the store are skipped.")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT")
    p.add_argument("-o", "--output", required=True, metavar="STORE",
                   help="snapshot store directory (created, or resumed)")
    p.add_argument("--probes", required=True,
                   help="probe file (.yaml/.jsonl/.json) or blimp:PATH (file, directory, glob)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer directory (default: the first one the checkpoints name, "
                   "looked up before any is measured)")
    p.add_argument("--layers", default="all",
                   help="'all' (default), 'last', or comma-separated layer indices")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--batch-size", type=int, default=32, help="probes per forward pass")
    p.add_argument("--model-class", metavar="PKG.MOD:CLASS",
                   help="LightningModule to rebuild .ckpt files with (default: the demo's)")
    p.add_argument("--steps", help="comma-separated step of each checkpoint, in order")
    p.add_argument("--faithfulness", action="store_true",
                   help="also compute AOPC faithfulness at each step")
    p.add_argument("--count-corpus", metavar="TEXT",
                   help="text file whose token counts fill the count column (same at every step)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("export", parents=[common], help="tables as csv/parquet/jsonl files",
                       description="Write each table of a run (all steps) to one file.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    _add_run_option(p)
    p.add_argument("--format", choices=_FORMATS, default="csv",
                   help="file format (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="output directory")
    _add_skip_corrupt_option(p)
    p.set_defaults(func=cmd_export)
    return parser


class _OneLineFormatter(logging.Formatter):
    """A log record on one line on stderr (a library message may hold a file's newlines)."""

    def format(self, record: logging.LogRecord) -> str:
        return one_line(super().format(record))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `normx` command; returns the exit status.

    Warnings are shown, each distinct one once on one line (``--debug``: Python's own
    format). An anticipated error (`messages.anticipated`: about the input, raised on
    purpose) is one line and exit status 1; anything else is a bug and keeps its traceback,
    exit status 2. ``--debug`` raises every error, with its traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    handler = logging.StreamHandler()
    handler.setFormatter((logging.Formatter if debug else _OneLineFormatter)(
        "normx: %(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if debug else logging.ERROR, handlers=[handler])
    logging.getLogger(__package__).setLevel(logging.INFO if debug else logging.WARNING)
    shown = (contextlib.nullcontext() if debug
             else warning_lines(lambda line: print(f"normx: {line}", file=sys.stderr)))
    try:
        with shown:
            return args.func(args)
    except KeyboardInterrupt:
        print("normx: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            raise
        if not anticipated(error):
            traceback.print_exc()
            print(f"normx {args.command}: internal error ({type(error).__name__}); the traceback "
                  "above is what a bug report needs", file=sys.stderr)
            return 2
        print(f"normx {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
