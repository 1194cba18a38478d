"""The `normx` command: report, summary, attribute and export for NormXLogit runs.

    normx report RUN_DIR [RUN_DIR ...] -o report.html
    normx summary RUN_DIR
    normx attribute CHECKPOINT --text "the keys near the cabinet" --target are --foil is
    normx export RUN_DIR --format parquet -o OUT_DIR
    normx faithfulness CHECKPOINT [--probes FILE | --suite agreement] [-o table.md]
    normx replay CHECKPOINT [CHECKPOINT ...] --probes blimp:DIR -o STORE

An error about the input prints one line on stderr and exits with status 1; anything else
keeps its traceback and exits 2 (`--debug` raises every error). The commands that load a
model (attribute, faithfulness, replay) are in `model_commands.py`; this module holds the
parser, `main` and the commands that read runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import textwrap
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from .catalog import empty_store_reason, find_runs, find_store, select_runs
from .loading import RunData, load_store
from .messages import anticipated, one_line, terminal_safe, warning_lines
from .model_commands import cmd_attribute, cmd_faithfulness, cmd_replay
from .store import SnapshotStore, StoreError

log = logging.getLogger(__name__)

_FORMATS = ("csv", "parquet", "jsonl")

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
            print(f"missing:   step {step}: {terminal_safe(reason)}")
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


# ------------------------------------------------------------------------------ parser


def _add_run_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", metavar="RUN", help="which run, when RUN_DIR holds several: a run "
                   "id, a unique prefix of one, or 'latest' (the run written last)")


def _add_skip_corrupt_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-corrupt", action="store_true",
                   help="leave out snapshots whose files are missing or unreadable (one warning "
                   "line each) instead of stopping at the first")


def build_parser() -> argparse.ArgumentParser:
    from .removal import REMOVALS, REPLACEMENTS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="raise every error with its full traceback; INFO logs; warnings in Python's own format")
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
