"""Snapshot time on the training thread with the probes shared across DDP ranks.

    python benchmarks/ddp_probes.py                 # 64 probes, 1 vs 2 CPU processes (gloo)
    python benchmarks/ddp_probes.py --probes 128 --steps 16

The script launches two real Lightning runs of the demo model with the callback, one on
1 process and one with `strategy="ddp"` on 2 processes (1 intra-op thread per process),
reads rank 0's `snapshot/seconds` (wall time from the start of the snapshot to its
metrics, on the training thread: the shared measurement, the gather and the metrics) from
each run's store, and prints the median per run and the ratio 2 processes / 1 process.
Snapshot 0 is left out (warm-up). Faithfulness is on at every snapshot, so it is shared too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(args) -> None:
    import lightning.pytorch as pl
    import torch

    from normx_callbacks import NormXLogitCallback
    from normx_callbacks.demo import LanguageModel, TextDataModule

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    dm = TextDataModule(corpus="agreement", bpe_vocab_size=2048, num_train=2048,
                        num_probes=args.probes, batch_size=8, cache_dir=args.cache)
    lm = LanguageModel(arch="gpt2", d_model=128, n_layers=4, n_heads=4, dropout=0.0,
                       vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id,
                       tokenizer=dm.tokenizer)
    callback = NormXLogitCallback(dm.probes, schedule="interval", every_n_steps=1,
                                  media_probes=0, faithfulness_every=1,
                                  faithfulness_probes=args.probes,
                                  store_dir=Path(args.root) / "store")
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto",
                         max_steps=args.steps, logger=False, callbacks=[callback],
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    trainer.fit(lm, dm)


def run(devices: int, args, cache: str) -> list[float]:
    from normx_callbacks import load_run

    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT),
                                                           os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, __file__, "--worker", "--devices", str(devices),
                        "--root", root, "--cache", cache, "--probes", str(args.probes),
                        "--steps", str(args.steps)], check=True, env=env, cwd=root)
        metrics = load_run(Path(root) / "store")["metrics"]
        seconds = metrics[metrics.key == "snapshot/seconds"].sort_values("step")
        return seconds[seconds.step > 0]["value"].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--probes", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as cache:
        one = run(1, args, cache)  # also trains the tokenizer before two ranks need it
        two = run(2, args, cache)
    result = {"probes": args.probes, "snapshots": len(one),
              "median_seconds_1_process": statistics.median(one),
              "median_seconds_2_processes": statistics.median(two)}
    result["ratio_2_over_1"] = result["median_seconds_2_processes"] / result[
        "median_seconds_1_process"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
