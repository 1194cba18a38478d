"""What NormXLogitCallback costs a training run: configs/tiny.yaml with and without it.

    python benchmarks/overhead.py                        # 3 rounds of full 600-step runs
    python benchmarks/overhead.py --threads 1 --rounds 5 --arms without with with-nomedia
    python benchmarks/overhead.py --threads 1 --quick    # 1 round of 30-step runs (a check)
    python benchmarks/overhead.py --smoke --keep /tmp/o  # smallest: the code path only

Arms, each `train.py fit --config configs/tiny.yaml` in a fresh subprocess with the same
seed (the callback restores every RNG it touches, so all arms train on the same batches):
"without" adds `--trainer.callbacks=[]`; "with" is tiny.yaml as it is (media on,
faithfulness on, every scheduled snapshot stored); "with-nomedia" adds
`--trainer.callbacks.init_args.media_probes 0` (no heatmap figures). Each round runs every
arm once, the order alternating from round to round; a short untimed run first warms the
tokenizer cache and the disk. Logs, checkpoints and stores go to a temporary directory.

Fit time is the number that counts: the wall time of `trainer.fit` in the child, taken in
`before_fit` / `after_fit` of a subclass of train.py's own `NormXCLI` (setup, training,
validation, the checkpoint, teardown; not interpreter start, imports, argument parsing or
the end-of-run summary). The process's wall time is printed beside it. The ratio reported
is the median over rounds of fit(with) / fit(without) within a round, against GOAL.

Where the callback's time goes comes from the store it wrote, read with `load_run`: the sums
over the run of `snapshot/train_seconds` (training thread: counts, probe forward, embedding
norms, copies to the CPU; the faithfulness forwards where they run there, else the weights
copy for the helper) and `snapshot/worker_seconds` (the writer, in the helper process by
default: faithfulness forwards and gradient reference on its copy of a small model, metrics
and tables, before the store write); "-" where the package does not record them.
`--threads N` sets torch's threads in each child; without it they are torch's default
(tiny.yaml as is).

`--smoke` (tests/test_benchmarks.py) is the smallest run, a check of the code path whose
numbers mean nothing: 1 round of 2-step runs, no warm-up run, tiny.yaml on 400 sentences and
4 probes with its tokenizer cached in the run directory (`--keep`, else a temporary one).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import harness as h

GOAL = 1.05  # fit time with the callback / without, from the issue
ARMS = ("without", "with", "with-nomedia")
COSTS = ("snapshot/train_seconds", "snapshot/worker_seconds")


def child(args) -> None:
    """One training run (this process); prints its fit time as the last line, JSON."""
    import torch

    h.set_threads(args.threads)
    import train
    from normx_callbacks.demo import LanguageModel, TextDataModule
    from normx_callbacks.demo.cli_errors import OneLineParser

    times: dict = {}

    class TimedCLI(train.NormXCLI):
        def before_fit(self):
            super().before_fit()
            times["start"] = time.perf_counter()

        def after_fit(self):
            times["fit_s"] = time.perf_counter() - times.pop("start")
            super().after_fit()

    argv = ["fit", "--config", str(args.config), "--trainer.default_root_dir", args.root,
            "--trainer.logger.init_args.save_dir", args.root,
            "--trainer.enable_progress_bar", "false"]
    argv += ["--trainer.max_steps", str(args.max_steps)] if args.max_steps else []
    if args.smoke:  # a small corpus; the tokenizer cached beside the runs, not in the checkout
        argv += ["--data.num_train", "400", "--data.num_probes", "4",
                 "--data.cache_dir", str(Path(args.root).parent / "tokenizer")]
    argv += {"without": ["--trainer.callbacks=[]"], "with": [],
             "with-nomedia": ["--trainer.callbacks.init_args.media_probes", "0"]}[args.child]
    TimedCLI(LanguageModel, TextDataModule, save_config_kwargs={"overwrite": True},
             parser_class=OneLineParser, args=argv)
    print(json.dumps({**times, "threads": torch.get_num_threads()}))


def run_arm(arm: str, args, workdir: Path, index: int, max_steps: int | None) -> dict:
    root = workdir / f"{index:02d}-{arm}"
    cmd = [__file__, "--child", arm, "--root", root, "--config", args.config]
    cmd += ["--max-steps", max_steps] if max_steps else []
    cmd += ["--threads", args.threads] if args.threads else []
    cmd += ["--smoke"] if args.smoke else []
    try:
        child_report, wall = h.run_child(cmd, args.threads, cwd=h.ROOT)
    except h.ChildFailed as error:
        raise SystemExit(f"the {arm!r} run failed: {error}") from None
    out = {"arm": arm, **child_report, "process_s": wall}
    if arm != "without":
        out.update(store_costs(root))
    return out


def store_costs(root: Path) -> dict:
    """The number of snapshots in the store under ``root`` and the sum of each of COSTS
    over them (None where the store has no such key)."""
    from normx_callbacks import load_run

    run = load_run(root)
    m = run.metrics
    return {"snapshots": len(run.steps),
            **{k: float(m.loc[m["key"] == k, "value"].sum()) if (m["key"] == k).any()
               else None for k in COSTS}}


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    p = h.parser(__doc__, devices=False)
    p.add_argument("--rounds", type=int, help="default 3 (quick 1)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=["without", "with"])
    p.add_argument("--max-steps", type=int, help="trainer.max_steps (default: the config's)")
    p.add_argument("--config", type=Path, default=h.ROOT / "configs" / "tiny.yaml")
    p.add_argument("--keep", type=Path, help="keep the runs' logs and stores here")
    p.add_argument("--smoke", action="store_true", help="the smallest run (see above)")
    p.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if "without" not in args.arms or len(args.arms) < 2:
        p.error("--arms needs 'without' (the baseline) and at least one arm with the callback")
    args.rounds = args.rounds or (1 if args.quick or args.smoke else 3)
    args.max_steps = args.max_steps or (2 if args.smoke else 30 if args.quick else None)
    settings = {"rounds": args.rounds, "arms": args.arms, "config": str(args.config),
                "max_steps": args.max_steps or "the config's", "threads": args.threads,
                "smoke": args.smoke}
    info = h.start(args, "NormXLogitCallback overhead on the tiny.yaml training run", settings)
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="normx-overhead-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not args.smoke:
        run_arm("with", args, workdir, 0, 2)  # warm-up, untimed

    rounds, index = [], 1
    print("\n| round | arm | fit s | process s | snapshots | train_seconds sum "
          "| worker_seconds sum |\n|---|---|---|---|---|---|---|", flush=True)
    for i in range(args.rounds):
        k = i % len(args.arms)
        got = {}
        for arm in args.arms[k:] + args.arms[:k]:
            got[arm] = r = run_arm(arm, args, workdir, index, args.max_steps)
            index += 1
            print(f"| {i + 1} | {arm} | {r['fit_s']:.2f} | {r['process_s']:.2f} "
                  f"| {r.get('snapshots', '-')} | {fmt(r.get(COSTS[0]))} "
                  f"| {fmt(r.get(COSTS[1]))} |", flush=True)
        rounds.append(got)

    summary = {}
    print(f"\nPaired within each round, median over {args.rounds} rounds:")
    for arm in args.arms:
        if arm == "without":
            continue
        fit = [r[arm]["fit_s"] / r["without"]["fit_s"] for r in rounds]
        proc = [r[arm]["process_s"] / r["without"]["process_s"] for r in rounds]
        costs = {k: [r[arm][k] for r in rounds if r[arm][k] is not None] for k in COSTS}
        s = summary[arm] = {
            "fit_ratios": fit, "ratio_fit": h.median(fit), "ratio_process": h.median(proc),
            "fit_s": h.median(r[arm]["fit_s"] for r in rounds),
            "fit_without_s": h.median(r["without"]["fit_s"] for r in rounds),
            **{k: h.median(v) if v else None for k, v in costs.items()}}
        print(f"  [{arm}] fit time {arm} / without: {s['ratio_fit']:.3f} "
              f"({100 * (s['ratio_fit'] - 1):+.1f}%; per round "
              f"{', '.join(f'{x:.3f}' for x in fit)}), goal <= {GOAL:.2f}: "
              f"{'met' if s['ratio_fit'] <= GOAL else 'not met'}")
        print(f"    process time {arm} / without: {s['ratio_process']:.3f}; fit "
              f"{s['fit_s']:.2f} s against {s['fit_without_s']:.2f} s")
        for k in COSTS:
            share = "" if s[k] is None else f" ({100 * s[k] / s['fit_without_s']:.1f}% of fit " \
                                             "without)"
            print(f"    sum of {k}: {fmt(s[k])} s{share}")
    h.finish(args, started, machine=info, settings=settings, goal=GOAL, rounds=rounds,
             summary=summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
