"""Long runs and large vocabularies: memory, file descriptors and threads stay flat.

    python benchmarks/long_run.py --snapshots 500      # part 1, RELIABILITY.md's numbers
    python benchmarks/long_run.py --large-vocab        # part 2, in a fresh process
    python benchmarks/long_run.py --quick              # 30 snapshots, part 2 at 32 probes
    python benchmarks/long_run.py --snapshots 3 --sample-every 1 --media-probes 1 \
        --faithfulness-every 2                         # smallest part 1

Part 1 trains a 2-layer, 32-wide GPT-2 on the agreement corpus with
`NormXLogitCallback(schedule="interval", every_n_steps=1)`: one snapshot per training
step, logged to TensorBoard (scalars, histogram, heatmap images, Markdown tables) and
written to the snapshot store, the defaults otherwise (faithfulness every 4th snapshot).
After every `--sample-every`-th snapshot it samples the process: resident memory (VmRSS
after `gc.collect()` and glibc's `malloc_trim(0)`, so memory already freed does not count),
open file descriptors, Python threads and OS threads. At the end it times `load_run`.

Part 2 measures the peak memory of `normxlogit(layers="all", batch_size=16)` on a model
whose full-vocabulary logits for the probe set would not fit in memory: vocabulary
256,000, d=64, 2 layers, 256 probes x 128 tokens (all positions x 3 layers x 256k float32
logits = 100.7 GB). Peak = VmHWM after a reset of the high-water mark, in a fresh process.

tests/test_long_run.py runs shortened versions of both through this command line;
tests/test_benchmarks.py runs the smallest part 1 above (a check of the code path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness as h
import torch

MB = 1024 * 1024


def long_run(snapshots: int, root: Path, *, media_probes: int, faithfulness_every: int | None,
             sample_every: int) -> dict:
    """Trains `snapshots - 1` steps with a snapshot at every step (and step 0)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger

    from normx_callbacks import NormXLogitCallback, load_run
    from normx_callbacks.demo import LanguageModel, TextDataModule

    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0, verbose=False)
    dm = TextDataModule(corpus="agreement", bpe_vocab_size=512, num_train=400, num_probes=8,
                        batch_size=16, cache_dir=str(root / "tokenizer"))
    model = LanguageModel(arch="gpt2", d_model=32, n_layers=2, n_heads=2, dropout=0.0,
                          vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id,
                          tokenizer=dm.tokenizer)
    callback = NormXLogitCallback(dm.probes, schedule="interval", every_n_steps=1,
                                  media_probes=media_probes,
                                  faithfulness_every=faithfulness_every,
                                  history_length=64, store_dir=root / "normx")
    samples: list[dict] = []

    class Sampler(Callback):  # listed after the NormXLogitCallback: sees each snapshot done
        def on_train_start(self, trainer, pl_module):
            self.start = time.perf_counter()
            self.sample(trainer, 1)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.sample(trainer, trainer.global_step + 1)  # snapshots so far: steps 0..now

        def sample(self, trainer, index):
            if index == 1 or index % sample_every == 0:
                samples.append({"snapshot": index, "step": trainer.global_step,
                                "rss": h.live_rss(), "fds": len(os.listdir("/proc/self/fd")),
                                "threads": threading.active_count(),
                                "os_threads": h.proc_status("Threads"),
                                "seconds": time.perf_counter() - self.start})

    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=snapshots - 1,
        logger=TensorBoardLogger(str(root), name="tb", default_hp_metric=False),
        callbacks=[callback, Sampler()], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
        num_sanity_val_steps=0, log_every_n_steps=10, default_root_dir=str(root))
    trainer.fit(model, dm)
    began = time.perf_counter()
    run = load_run(root / "normx")
    return {"snapshots": len(run.steps), "missing": len(run.missing), "samples": samples,
            "load_run_seconds": time.perf_counter() - began,
            "store_files": sum(1 for f in (root / "normx").rglob("*") if f.is_file()),
            "token_rows": len(run["tokens"])}


def summarize(result: dict) -> dict:
    """RSS, fds and threads at the first, a tenth, the middle and the last sample; growth
    from a tenth (the warm-up: caches, the heatmap history filling) to the end."""
    samples = result["samples"]
    n = samples[-1]["snapshot"]
    by = {s["snapshot"]: s for s in samples}
    tenth = min((i for i in by if i > 1), key=lambda i: abs(i - n / 10), default=1)
    at = {m: by[m] for m in (1, tenth, min(by, key=lambda i: abs(i - n / 2)), n)}
    later = [s for s in samples if s["snapshot"] >= tenth]
    return {
        "snapshots": result["snapshots"], "missing": result["missing"],
        "rss_mb": {m: round(s["rss"] / MB, 1) for m, s in at.items()},
        "rss_growth_after_warmup_mb": round((later[-1]["rss"] - later[0]["rss"]) / MB, 1),
        "fds": {m: s["fds"] for m, s in at.items()},
        "fds_range_after_warmup": (min(s["fds"] for s in later), max(s["fds"] for s in later)),
        "threads": {m: s["threads"] for m, s in at.items()},
        "os_threads": {m: s["os_threads"] for m, s in at.items()},
        "seconds_per_snapshot": round(samples[-1]["seconds"] / max(1, n - 1), 3),
        "load_run_seconds": round(result["load_run_seconds"], 2),
        "store_files": result["store_files"], "token_rows": result["token_rows"],
    }


def large_vocab_peak(vocab: int, probes: int, length: int, batch_size: int) -> dict:
    """Peak memory of `normxlogit(layers="all")` on a 2-layer, d=64 GPT-2 (this process)."""
    from normx_callbacks import normxlogit

    torch.set_num_threads(1)
    model = h.build(h.config("gpt2", vocab, layers=2, width=64, heads=2))
    ids = torch.randint(0, vocab, (probes, length), generator=torch.Generator().manual_seed(1))
    before = h.rss()
    exact = h.reset_peak()
    began = time.perf_counter()
    attr = normxlogit(model, ids, torch.ones_like(ids), layers="all", batch_size=batch_size)
    seconds = time.perf_counter() - began
    peak = h.proc_status("VmHWM")
    valid = attr.valid[:, None, :].expand_as(attr.layer_scores)
    return {"vocab": vocab, "probes": probes, "length": length, "batch_size": batch_size,
            "full_logits_gb": round(probes * length * 3 * vocab * 4 / 1e9, 1),
            "rss_before_mb": round(before / MB, 1), "peak_mb": round(peak / MB, 1),
            "peak_delta_mb": round((peak - before) / MB, 1) if exact else None,
            "seconds": round(seconds, 2),
            "finite": bool(torch.isfinite(attr.layer_scores[valid]).all())}


def main(argv=None) -> int:
    p = h.parser(__doc__, devices=False)
    p.add_argument("--snapshots", type=int, default=0, help="part 1 with N snapshots")
    p.add_argument("--media-probes", type=int, default=2, help="part 1: heatmap probes")
    p.add_argument("--faithfulness-every", type=int, default=4, help="part 1; 0: off")
    p.add_argument("--sample-every", type=int, default=10, help="part 1: sample interval")
    p.add_argument("--root", type=Path, help="part 1: output directory (default: temporary)")
    p.add_argument("--large-vocab", action="store_true", help="part 2 (fresh process)")
    p.add_argument("--vocab", type=int, default=256_000, help="part 2")
    p.add_argument("--probes", type=int, help="part 2 (default 256; quick 32)")
    p.add_argument("--length", type=int, default=128, help="part 2")
    p.add_argument("--batch-size", type=int, default=16, help="part 2")
    p.add_argument("--large-vocab-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.snapshots, args.large_vocab = args.snapshots or 30, True
    args.probes = args.probes or (32 if args.quick else 256)
    part2 = [args.vocab, args.probes, args.length, args.batch_size]
    if args.large_vocab_child:
        print(json.dumps(large_vocab_peak(*part2)))
        return 0
    if not args.snapshots and not args.large_vocab:
        p.error("give --snapshots N and/or --large-vocab (or --quick)")
    info = h.start(args, "Long runs and large vocabularies", vars(args))
    started = time.perf_counter()
    out: dict = {"machine": info}
    if args.snapshots:
        with tempfile.TemporaryDirectory() as tmp:
            out["long_run"] = long_run(
                args.snapshots, args.root or Path(tmp), media_probes=args.media_probes,
                faithfulness_every=args.faithfulness_every or None,
                sample_every=args.sample_every)
        out["summary"] = summarize(out["long_run"])
        print(json.dumps(out["summary"], indent=1))
    if args.large_vocab:  # a fresh process: its peak is this measurement's alone
        cmd = [__file__, "--large-vocab-child", *(f"--{k}={v}" for k, v in zip(
            ("vocab", "probes", "length", "batch-size"), part2, strict=True))]
        out["large_vocab"] = h.run_child(cmd, 1)[0]
        print(json.dumps(out["large_vocab"], indent=1))
    h.finish(args, started, **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
