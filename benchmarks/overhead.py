"""What NormXLogitCallback costs a training run: the tiny.yaml job with and without it.

    python benchmarks/overhead.py --threads 1                 # 1 pair of full 600-step runs
    python benchmarks/overhead.py --threads 1 --pairs 2 --max-steps 300
    python benchmarks/overhead.py --threads 1 --arms without with with-nomedia
    python benchmarks/overhead.py --quick                     # 1 pair of 100-step runs

Each arm is `train.py fit --config configs/tiny.yaml` in a fresh subprocess, the same
seed (`seed_everything: 0`; the callback restores every RNG it touches, so both arms
train on the same batches to the same weights). The "without" arm drops the callback
with `--trainer.callbacks=[]`; the optional "with-nomedia" arm keeps the callback with
`media_probes=0` (no heatmap figures; everything else alike). All log to a temporary
directory (TensorBoard, the checkpoint, and the snapshot store). Each round runs every arm
once, the order rotating from round to round, and ratios are taken within a round, so
drift of a shared machine hits the arms alike.

Inside every subprocess the script wraps (in that process only; the package is not
changed) the callback's hooks and the pieces of a snapshot with timers:
probe forward (`_measure`: normxlogit over the probes + embedding statistics),
`_metrics`, `_faithfulness` (AOPC, every 4th snapshot), `_tables` (the long-format
pandas tables), `_write` (Parquet store), `_log` (TensorBoard scalars, histogram,
Markdown tables and the matplotlib heatmaps), and the per-batch token counting in
`on_train_batch_start`. It also reports the callback's own `snapshot/seconds` metric,
summed over the run from the store (`load_run(...).metrics`), which covers probe forward,
metrics and faithfulness, but not tables, store write or logging.

On a machine other jobs share, pass `--threads 1` (one OpenMP thread per process; see
BENCHMARKS.md, "Floor ratio").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, median, print_header  # noqa: E402

GOAL = 0.03  # overhead share, from the issue

# Callback hooks: together, everything the callback does in the training loop.
HOOKS = ("setup", "on_train_start", "on_train_batch_start", "on_train_batch_end",
         "on_train_end", "on_save_checkpoint")
# Pieces of one snapshot (nested inside the hooks above).
PARTS = ("_snapshot", "_measure", "_metrics", "_faithfulness", "_tables", "_write", "_log")
SINK = ("scalars", "histogram", "figure", "table", "html")
EACH = ("part:_snapshot", "part:_log", "sink:figure", "part:_measure")  # per-call times kept
ARMS = ("without", "with", "with-nomedia")


# --------------------------------------------------------------------------- child


def _wrap(cls, name: str, key: str, totals: dict, counts: dict, each: dict) -> None:
    original = getattr(cls, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent = time.perf_counter() - start
            totals[key] = totals.get(key, 0.0) + spent
            counts[key] = counts.get(key, 0) + 1
            if key in EACH:
                each.setdefault(key, []).append(spent)

    setattr(cls, name, timed)


def child(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import lightning.pytorch as pl

    import train
    from normx_callbacks import NormXLogitCallback, load_run
    from normx_callbacks.loggers import LoggerSink

    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    each: dict[str, list[float]] = {}
    for name in HOOKS:
        _wrap(NormXLogitCallback, name, f"hook:{name}", totals, counts, each)
    for name in PARTS:
        _wrap(NormXLogitCallback, name, f"part:{name}", totals, counts, each)
    for name in SINK:
        _wrap(LoggerSink, name, f"sink:{name}", totals, counts, each)
    _wrap(pl.Trainer, "fit", "fit", totals, counts, each)

    root = Path(args.root)
    argv = ["fit", "--config", str(args.config),
            "--trainer.default_root_dir", str(root),
            "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.enable_progress_bar", "false"]
    if args.max_steps:
        argv += ["--trainer.max_steps", str(args.max_steps)]
    if args.arm == "without":
        argv += ["--trainer.callbacks=[]"]
    elif args.arm == "with-nomedia":  # no heatmap figures (media_probes=0), all else alike
        argv += ["--trainer.callbacks.init_args.media_probes", "0"]
    start = time.perf_counter()
    train.main(args=argv)
    total = time.perf_counter() - start

    report = {"arm": args.arm, "total_s": total, "fit_s": totals.pop("fit"),
              "timers": totals, "calls": counts, "each": each,
              "threads": torch.get_num_threads()}
    if args.arm != "without":
        run = load_run(root)
        metrics = run.metrics
        seconds = metrics[metrics["key"] == "snapshot/seconds"]
        report["snapshots"] = len(run.steps)
        report["snapshot_steps"] = list(run.steps)
        report["snapshot_seconds_sum"] = float(seconds["value"].sum())
        per = metrics[metrics["key"].str.endswith("/seconds_per_instance")]
        report["faithfulness_snapshots"] = int(per["step"].nunique())
    Path(args.report).write_text(json.dumps(report, indent=2))
    return 0


# --------------------------------------------------------------------------- parent


def run_arm(arm: str, args, workdir: Path, index: int) -> dict:
    root = workdir / f"{index:02d}-{arm}"
    report = workdir / f"{index:02d}-{arm}.json"
    cmd = [sys.executable, __file__, "--child", arm, "--root", str(root),
           "--report", str(report), "--config", str(args.config)]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ)
    if args.threads:  # also bounds the threads of libraries torch does not configure
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"{arm} run failed (exit {done.returncode})")
    out = json.loads(report.read_text())
    out["process_s"] = wall
    out["load_before"] = load
    out["load_after"] = os.getloadavg()[0]
    return out


def describe(runs: list[dict]) -> str:
    lines = []
    for r in runs:
        extra = ""
        if r["arm"] != "without":
            hooks = sum(v for k, v in r["timers"].items() if k.startswith("hook:"))
            extra = (f"  in callback {hooks:6.1f} s, snapshot/seconds sum "
                     f"{r['snapshot_seconds_sum']:5.1f} s over {r['snapshots']} snapshots")
        lines.append(f"  {r['arm']:12s} process {r['process_s']:6.1f} s  fit {r['fit_s']:6.1f} s "
                     f"(load {r['load_before']:.1f} -> {r['load_after']:.1f}){extra}")
    return "\n".join(lines)


def in_callback(r: dict) -> float:
    return sum(v for k, v in r["timers"].items() if k.startswith("hook:"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one round of 100-step runs")
    p.add_argument("--pairs", type=int, default=1,
                   help="rounds; each runs every arm once, the order rotating")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=["without", "with"],
                   help="'with-nomedia': the callback with media_probes=0 (no heatmap figures)")
    p.add_argument("--max-steps", type=int, help="override trainer.max_steps (config: 600)")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml")
    p.add_argument("--threads", type=int, help="torch threads per training process")
    p.add_argument("--out", type=Path, help="write all numbers as JSON here")
    p.add_argument("--keep", type=Path, help="keep the runs' logs and stores in this directory")
    p.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--report", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.arm = args.child
        return child(args)
    if args.quick and not args.max_steps:
        args.max_steps = 100
    if "without" not in args.arms:
        p.error("--arms must include 'without' (the baseline)")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine("cpu")
    print_header("NormXLogitCallback overhead on the tiny.yaml training run", info,
                 {"rounds": args.pairs, "arms": args.arms,
                  "max_steps": args.max_steps or "config (600)",
                  "config": str(args.config), "threads": args.threads})
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="normx-overhead-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # A short untimed run first: tokenizer cache, imports and disk caches are warm for all.
    warm = argparse.Namespace(**{**vars(args), "max_steps": 2})
    run_arm("with", warm, workdir, 0)

    rounds = []
    index = 1
    for i in range(args.pairs):
        k = i % len(args.arms)
        order = args.arms[k:] + args.arms[:k]
        got = {}
        for arm in order:
            got[arm] = run_arm(arm, args, workdir, index)
            index += 1
        rounds.append(got)
        print(describe([got[a] for a in order]), flush=True)
    elapsed = time.perf_counter() - started

    summary = {}
    base = [r["without"] for r in rounds]
    print("\nOverhead (median over rounds; ratios paired within a round):")
    for arm in (a for a in args.arms if a != "without"):
        w = [r[arm] for r in rounds]
        s = {
            "ratio_fit": median([a["fit_s"] / b["fit_s"] for a, b in zip(w, base, strict=True)]),
            "ratio_process": median([a["process_s"] / b["process_s"]
                                     for a, b in zip(w, base, strict=True)]),
            "share_in_callback": median([in_callback(r) / r["fit_s"] for r in w]),
            "share_in_callback_vs_without": median(
                [in_callback(a) / b["fit_s"] for a, b in zip(w, base, strict=True)]),
            "share_snapshot_seconds": median([r["snapshot_seconds_sum"] / r["fit_s"] for r in w]),
            "in_callback_s": median([in_callback(r) for r in w]),
        }
        summary[arm] = s
        print(f"  [{arm}]")
        print(f"    fit time {arm} / without:             {s['ratio_fit']:.3f}  "
              f"({100 * (s['ratio_fit'] - 1):+.1f}%)")
        print(f"    process time {arm} / without:         {s['ratio_process']:.3f}  "
              f"({100 * (s['ratio_process'] - 1):+.1f}%)")
        print(f"    time in callback hooks / its fit:     {100 * s['share_in_callback']:.1f}%  "
              f"({s['in_callback_s']:.1f} s)")
        print(f"    time in callback hooks / fit without: "
              f"{100 * s['share_in_callback_vs_without']:.1f}%")
        print(f"    sum of snapshot/seconds / fit:        {100 * s['share_snapshot_seconds']:.1f}%"
              f"  (goal < {100 * GOAL:.0f}%)")
        fit = median([r["fit_s"] for r in w])
        print(f"    where the callback's time goes (seconds summed over the run, median over "
              f"rounds; share of fit {fit:.1f} s):")
        keys = sorted({k for r in w for k in r["timers"]})
        for key in keys:
            vals = [r["timers"].get(key, 0.0) for r in w]
            calls = w[0]["calls"].get(key, 0)
            line = (f"      {key:28s} {median(vals):7.2f} s  {100 * median(vals) / fit:5.1f}%"
                    f"  ({calls} calls)")
            each = w[0]["each"].get(key)
            if each and len(each) > 1:
                line += (f"  first {1e3 * each[0]:.0f} ms, median of the rest "
                         f"{1e3 * median(each[1:]):.0f} ms")
            print(line)
    print(f"\nrun took {elapsed:.0f} s; load average at the end "
          f"{tuple(round(x, 2) for x in os.getloadavg())}")

    if args.out:
        args.out.write_text(json.dumps(
            {"machine": info, "goal": GOAL, "max_steps": args.max_steps, "arms": args.arms,
             "rounds": rounds, "summary": summary, "elapsed_s": elapsed}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
