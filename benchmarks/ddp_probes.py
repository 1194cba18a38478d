"""Snapshot time on the training thread with the probes shared across DDP ranks.

    python benchmarks/ddp_probes.py                 # 64 probes, 1 vs 2 CPU processes (gloo)
    python benchmarks/ddp_probes.py --probes 128 --steps 16
    python benchmarks/ddp_probes.py --quick         # 16 probes, 6 steps
    python benchmarks/ddp_probes.py --probes 4 --steps 2   # smallest (tests/test_benchmarks.py)

Two real Lightning runs of the demo model (GPT-2 shape, 4 layers, d=128, BPE vocabulary
2048) with the callback at every step, faithfulness at every snapshot (so it is shared
too) and no heatmaps: one on 1 process, one with `strategy="ddp"` on 2 processes (1
intra-op thread each). Both runs use `writer="thread"` (`--writer` to change it): with the
default helper process, the 1-process run would hand the faithfulness forwards and the
gradient reference to the helper (a copy of a small CPU model), which DDP never does, and the
two would not measure the same work.

Read from each run's store, rank 0's `snapshot/train_seconds` (wall time the training thread
spent on the snapshot: the counts reduced, its share of the probe forward and of the
faithfulness forwards, the embedding norms, the copies to the CPU, the gather, and the
gradient reference of alignment, on rank 0 only) and, beside it, `snapshot/worker_seconds`
(wall time the writer spent building metrics and tables, off the training thread),
snapshot 0 left out (warm-up); printed: the medians per run and the ratio of
`snapshot/train_seconds`, 2 processes / 1 process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import harness as h

KEYS = ("train_seconds", "worker_seconds")  # snapshot/<key> in the store's metrics


def child(args) -> None:
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
                                  faithfulness_probes=args.probes, writer=args.writer,
                                  store_dir=store)
    trainer = pl.Trainer(accelerator="cpu", devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto",
                         max_steps=args.steps, logger=False, callbacks=[callback],
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, limit_val_batches=0,
                         num_sanity_val_steps=0)
    trainer.fit(lm, dm)
    if trainer.is_global_zero:
        m = load_run(store).metrics
        m = m[m.step > 0].sort_values("step")
        print(json.dumps({k: m.loc[m.key == f"snapshot/{k}", "value"].tolist()
                          for k in KEYS}))


def main(argv=None) -> int:
    p = h.parser(__doc__, devices=False)
    p.add_argument("--probes", type=int, help="default 64 (quick 16)")
    p.add_argument("--steps", type=int, help="default 12 (quick 6)")
    p.add_argument("--writer", choices=("thread", "process"), default="thread",
                   help="the callback's writer in both runs (default thread; see above)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.threads = args.threads or 1  # the ranks run 1 thread each; so does this parent
    args.probes = args.probes or (16 if args.quick else 64)
    args.steps = args.steps or (6 if args.quick else 12)
    if args.child:
        child(args)
        return 0
    settings = {"probes": args.probes, "steps": args.steps, "writer": args.writer}
    info = h.start(args, "Snapshot time with probes shared across DDP ranks", settings)
    started = time.perf_counter()
    per: dict = {}
    with tempfile.TemporaryDirectory() as cache:
        for devices in (1, 2):  # the first run also trains the tokenizer both ranks read
            with tempfile.TemporaryDirectory() as root:
                per[devices] = h.run_child(
                    [__file__, "--child", "--devices", devices, "--root", root, "--cache",
                     cache, "--probes", args.probes, "--steps", args.steps, "--writer",
                     args.writer], 1, cwd=root)[0]
    result = {"snapshots": {n: len(per[n]["train_seconds"]) for n in per}}
    for key in KEYS:
        for n, name in ((1, "1_process"), (2, "2_processes")):
            result[f"median_{key}_{name}"] = h.median(per[n][key])
    result["ratio_2_over_1"] = (result["median_train_seconds_2_processes"]
                                / result["median_train_seconds_1_process"])
    print(json.dumps(result, indent=2))
    h.finish(args, started, machine=info, settings=settings, result=result, seconds=per)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
