"""The `normx` commands that load a model: ``attribute`` (one text's scores in the terminal
or as HTML), ``faithfulness`` (the AOPC table of every method on a checkpoint) and
``replay`` (a checkpoint series into a store). `cli.py` parses their arguments; the heavy
imports (torch, transformers, captum) happen inside each command, so `normx --help` and the
run commands start without them.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .adapters import UnsupportedModelError
from .messages import one_line, terminal_safe
from .probes import ProbeError

_POSITIVE = (214, 39, 40)  # red: evidence for the prediction (as the report's colours)
_NEGATIVE = (31, 119, 180)  # blue: evidence against it


# ------------------------------------------------------------------------------ attribute


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
        text = terminal_safe(token)
        if not math.isfinite(value):
            out.append(f"\x1b[2m{text}\x1b[0m")
            continue
        (r, g, b), (fr, fg, fb) = _background(value, bound)
        out.append(f"\x1b[48;2;{r};{g};{b}m\x1b[38;2;{fr};{fg};{fb}m{text}\x1b[0m")
    return "".join(out)


def _parse_layers(text: str, num_layers: int | None = None):
    """``--layers``: "all", "last" (None) or comma-separated layer indices; the valid range is
    named when the model is known."""
    if text == "all":
        return "all"
    if text == "last":
        return None
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers:
        valid = (f" in 0..{num_layers} (e.g. 0,{num_layers})" if num_layers is not None
                 else " (e.g. 0,2)")
        raise ValueError(f"--layers {text!r}: use 'last', 'all' or comma-separated layer "
                         f"indices{valid}")
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
        print(terminal_safe(line))
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
        shown = [repr(terminal_safe(t)) for t in tokens]
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
    from .faithfulness import faithfulness_table
    from .methods import METHODS
    from .probes import ProbeSet
    from .removal import resolve_replacement

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

    layers = _parse_layers(args.layers)
    try:
        written = replay(args.checkpoints, probes=args.probes, store_dir=args.output,
                         tokenizer=args.tokenizer, layers=layers,
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
