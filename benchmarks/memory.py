"""What NormXLogitCallback costs a training run in memory: the whole process tree, fresh and
resumed, against the same run without the callback.

    python benchmarks/memory.py                 # configs/gpt2-small.yaml's model on the CPU
    python benchmarks/memory.py --quick         # configs/tiny.yaml's model (a check, ~1 min)
    python benchmarks/memory.py --smoke         # smallest: the code path only

Each arm is `train.py fit` in a fresh subprocess, sampled from outside every 0.2 s: the
proportional set size (PSS, `/proc/<pid>/smaps_rollup`) of the training process and of every
process below it (the snapshot helper the callback forks, DataLoader workers), added up. PSS
splits each shared page among the processes that map it, so the sum counts every page once:
a helper forked from the training process costs only the pages it does not share (the ones
either side has written since the fork). Reported per arm: the peak of the sum over the
run, the training process and its children at that moment, and the ratio of the peak to the
same run without the callback (goal: <= GOAL, fresh and resumed).

Arms: "without" (`--trainer.callbacks=[]`) and "with" (the config's callback, media and
faithfulness on), each "fresh" (steps 0..STEPS) and "resumed" (from the checkpoint a first
run of the same arm wrote at step STEPS/2, to STEPS). The model is the config's (GPT-2 small:
124M parameters, a 16384-token vocabulary, its 256 probes at every layer) trained on the CPU
in float32 with small batches, so a step takes seconds; what the callback adds to memory does
not depend on the batch. Faithfulness uses 4 probes instead of 16 (on two cores its forwards
over a 124M model take minutes per probe); they run on the training thread either way, since
the helper keeps a weight copy only for models under 5% of the training process.

`--smoke` (tests/test_benchmarks.py) is the smallest run, a check of the code path whose
numbers mean nothing: configs/tiny.yaml for 2 steps (the resumed arms from step 1) on 400
sentences and 4 probes, its tokenizer cached in the temporary directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness as h

GOAL = 1.10  # total PSS with the callback / without, from the issue
SAMPLE_SECONDS = 0.2


def _children(pid: int) -> list[int]:
    """Every process below ``pid`` (by parent pid, read from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                ppid = int(f.read().decode(errors="replace").rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _pss(pid: int) -> int | None:
    """PSS of one process in bytes; None once it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def sampled(cmd: list[str], env: dict, cwd: Path) -> dict:
    """Runs ``cmd`` and samples its process tree's PSS until it exits."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    peak = {"total": 0, "main": 0, "children": 0, "count": 0}
    while proc.poll() is None:
        main = _pss(proc.pid)
        kids = [p for p in (_pss(c) for c in _children(proc.pid)) if p is not None]
        if main is not None and main + sum(kids) > peak["total"]:
            peak = {"total": main + sum(kids), "main": main, "children": sum(kids),
                    "count": len(kids)}
        time.sleep(SAMPLE_SECONDS)
    err = proc.stderr.read()
    if proc.returncode != 0:
        raise h.ChildFailed(f"{' '.join(cmd)} exited {proc.returncode}:\n{err[-3000:]}")
    return peak


def train_cmd(config: str, out: Path, cache: Path, *, callback: bool, steps: int,
              ckpt: Path | None, quick: bool, smoke: bool = False) -> list[str]:
    cmd = [sys.executable, "train.py", "fit", "--config", f"configs/{config}",
           "--trainer.accelerator", "cpu", "--trainer.devices", "1",
           "--trainer.strategy", "auto", "--trainer.precision", "32-true",
           "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
           "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
           "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir",
           str(out), "--data.cache_dir", str(cache), "--data.num_workers", "0"]
    if smoke:
        cmd += ["--data.num_train", "400", "--data.num_probes", "4"]
    elif not quick:  # the gpt2-small model, with batches small enough for a CPU
        cmd += ["--data.batch_size", "2", "--model.context", "128", "--data.num_train", "600"]
        if callback:  # faithfulness of a 124M model on 2 cores: minutes per probe
            cmd += ["--trainer.callbacks.init_args.faithfulness_probes", "4"]
    if not callback:
        cmd += ["--trainer.callbacks=[]"]
    if ckpt is not None:
        cmd += ["--ckpt_path", str(ckpt)]
    return cmd


def main(argv=None) -> int:
    p = h.parser(__doc__, devices=False)
    p.add_argument("--smoke", action="store_true", help="the smallest run (see above)")
    args = p.parse_args(argv)
    small = args.quick or args.smoke
    config = "tiny.yaml" if small else "gpt2-small.yaml"
    steps = 2 if args.smoke else 8 if args.quick else 6
    info = h.start(args, "Memory: training process and its children (PSS)",
                   {"config": config, "steps": steps, "smoke": args.smoke})
    started = time.perf_counter()
    env = h.child_env(args.threads)
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="normx-memory-") as tmp:
        tmp = Path(tmp)
        # The configs' own tokenizer cache; a smoke run's small corpus, in the temporary one.
        cache = tmp / "tokenizer" if args.smoke else h.ROOT / ".normx_cache"
        for arm in ("without", "with"):
            callback = arm == "with"
            first = tmp / f"{arm}-first"
            # The first half writes the checkpoint the resumed arm starts from.
            ckpt_cmd = train_cmd(config, first, cache, callback=callback, steps=steps // 2,
                                 ckpt=None, quick=small, smoke=args.smoke)
            subprocess.run(ckpt_cmd + ["--trainer.enable_checkpointing", "true"], cwd=h.ROOT,
                           env=env, check=True, capture_output=True)
            [ckpt] = sorted(first.rglob("*.ckpt"))
            for start in ("fresh", "resumed"):
                cmd = train_cmd(config, tmp / f"{arm}-{start}", cache, callback=callback,
                                steps=steps, ckpt=ckpt if start == "resumed" else None,
                                quick=small, smoke=args.smoke)
                results[(arm, start)] = sampled(cmd, env, h.ROOT)
                print(f"{arm:8s} {start:8s} peak total {h.gib(results[(arm, start)]['total'])}",
                      flush=True)
    for start in ("fresh", "resumed"):
        base = results[("without", start)]["total"]
        for arm in ("without", "with"):
            r = results[(arm, start)]
            rows.append([start, arm, h.gib(r["total"]), h.gib(r["main"]),
                         f"{h.gib(r['children'])} ({r['count']})",
                         h.ratio(r["total"] / base)])
    print()
    print(h.table(["run", "callback", "peak total PSS", "training process",
                   "children (count)", "total / without"], rows))
    worst = max(results[("with", s)]["total"] / results[("without", s)]["total"]
                for s in ("fresh", "resumed"))
    print(f"\ngoal: total with / without <= {GOAL:.2f} fresh and resumed: "
          f"{'met' if worst <= GOAL else 'NOT met'} (worst {worst:.3f})")
    h.finish(args, started, machine=info, goal=GOAL, worst=worst,
             results={f"{a}/{s}": r for (a, s), r in results.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
