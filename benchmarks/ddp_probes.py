"""Snapshot time on the training thread with the probes shared across DDP ranks.

    python benchmarks/ddp_probes.py                 # 64 probes, 1 vs 2 CPU processes (gloo)
    python benchmarks/ddp_probes.py --probes 128 --steps 16
    python benchmarks/ddp_probes.py --quick         # 16 probes, 6 steps

Two real Lightning runs of the demo model (GPT-2 shape, 4 layers, d=128, BPE vocabulary
2048) with the callback at every step, faithfulness at every snapshot (so it is shared
too) and no heatmaps: one on 1 process, one with `strategy="ddp"` on 2 processes (1
intra-op thread each). Read from each run's store, rank 0's `snapshot/seconds` (wall time
from the start of the snapshot to its metrics on the training thread: the shared
measurement, the gather and the metrics), snapshot 0 left out (warm-up); printed: the
median per run and the ratio 2 processes / 1 process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import harness as h


def worker(args) -> None:
    import lightning.pytorch as pl
    import torch

    from normx_callbacks import NormXLogitCallback, load_run
    from normx_callbacks.demo import LanguageModel, TextDataModule

    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    dm = TextDataModule(corpus="agreement", bpe_vocab_size=2048, num_train=2048,
                        num_probes=args.probes, batch_size=8, cache_dir=args.cache)
    lm = LanguageModel(arch="gpt2", d_model=128, n_layers=4, n_heads=4, dropout=0.0,
                       vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id,
                       tokenizer=dm.tokenizer)
    store = Path(args.root) / "store"
    callback = NormXLogitCallback(dm.probes, schedule="interval", every_n_steps=1,
                                  media_probes=0, faithfulness_every=1,
                                  faithfulness_probes=args.probes, store_dir=store)
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto",
                         max_steps=args.steps, logger=False, callbacks=[callback],
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    trainer.fit(lm, dm)
    if trainer.is_global_zero:
        m = load_run(store).metrics
        seconds = m[(m.key == "snapshot/seconds") & (m.step > 0)].sort_values("step")
        print(json.dumps(seconds["value"].tolist()))


def main(argv=None) -> int:
    p = h.parser(__doc__, devices=False)
    p.add_argument("--probes", type=int, help="default 64 (quick 16)")
    p.add_argument("--steps", type=int, help="default 12 (quick 6)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.threads = args.threads or 1  # the ranks run 1 thread each; so does this parent
    args.probes = args.probes or (16 if args.quick else 64)
    args.steps = args.steps or (6 if args.quick else 12)
    if args.worker:
        worker(args)
        return 0
    settings = {"probes": args.probes, "steps": args.steps}
    info = h.start(args, "Snapshot time with probes shared across DDP ranks", settings)
    started = time.perf_counter()
    per: dict = {}
    with tempfile.TemporaryDirectory() as cache:
        for devices in (1, 2):  # the first run also trains the tokenizer both ranks read
            with tempfile.TemporaryDirectory() as root:
                per[devices] = h.run_child(
                    [__file__, "--worker", "--devices", devices, "--root", root, "--cache",
                     cache, "--probes", args.probes, "--steps", args.steps], 1, cwd=root)[0]
    result = {"snapshots": len(per[1]), "median_seconds_1_process": h.median(per[1]),
              "median_seconds_2_processes": h.median(per[2])}
    result["ratio_2_over_1"] = (result["median_seconds_2_processes"]
                                / result["median_seconds_1_process"])
    print(json.dumps(result, indent=2))
    h.finish(args, started, machine=info, settings=settings, result=result, seconds=per)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
