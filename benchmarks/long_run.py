"""Long runs and large vocabularies: memory, file descriptors and threads stay flat.

    python benchmarks/long_run.py --snapshots 500      # part 1, RELIABILITY.md's numbers
    python benchmarks/long_run.py --large-vocab        # part 2, in a fresh process

Part 1 trains a 2-layer, 32-wide GPT-2 on the agreement corpus with
`NormXLogitCallback(schedule="interval", every_n_steps=1)`: one snapshot per training
step, logged to TensorBoard (scalars, histogram, heatmap images, Markdown tables) and
written to the snapshot store, the defaults otherwise (faithfulness every 4th snapshot).
After every snapshot it samples the process: resident memory (VmRSS, taken after
`gc.collect()` and glibc's `malloc_trim(0)` so that memory already freed does not count),
open file descriptors, Python threads and OS threads. At the end it times `load_run`.

Part 2 measures the peak memory of `normxlogit(layers="all", batch_size=16)` on a model
whose full-vocabulary logits for the probe set would not fit in memory: vocabulary
256,000, d=64, 2 layers, 256 probes x 128 tokens (all positions x 3 layers x 256k
float32 logits = 100.7 GB). Peak = VmHWM after a reset of the high-water mark
(/proc/self/clear_refs) and `ru_maxrss` of the fresh process.

tests/test_long_run.py runs shortened versions of both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MB = 1024 * 1024

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import live_rss, proc_status, reset_peak, rss  # noqa: E402


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def long_run(snapshots: int, root: str | os.PathLike, *, cache_dir: str | None = None,
             media_probes: int = 2, faithfulness_every: int | None = 4,
             history_length: int = 64, sample_every: int = 10) -> dict:
    """Train for `snapshots - 1` steps with a snapshot at every step (and step 0).

    Returns `samples` after the 1st and every `sample_every`-th snapshot (snapshot index,
    step, rss, fds, threads, os_threads, seconds since the first snapshot) and the
    `load_run` time of the store.
    """
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import TensorBoardLogger

    from normx_callbacks import NormXLogitCallback, load_run
    from normx_callbacks.demo import LanguageModel, TextDataModule

    root = Path(root)
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    dm = TextDataModule(corpus="agreement", bpe_vocab_size=512, num_train=400, num_probes=8,
                        batch_size=16, cache_dir=cache_dir or str(root / "tokenizer"))
    model = LanguageModel(arch="gpt2", d_model=32, n_layers=2, n_heads=2, dropout=0.0,
                          vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id,
                          tokenizer=dm.tokenizer)
    callback = NormXLogitCallback(dm.probes, schedule="interval", every_n_steps=1,
                                  media_probes=media_probes,
                                  faithfulness_every=faithfulness_every,
                                  history_length=history_length, store_dir=root / "normx")

    class Sampler(Callback):
        """Samples the process after each snapshot (listed after NormXLogitCallback)."""

        def __init__(self):
            self.samples: list[dict] = []
            self.start: float | None = None

        def _sample(self, trainer):
            index = len(callback.snapshot_steps)
            self.start = self.start or time.perf_counter()
            if index != 1 and index % sample_every:
                return
            now = time.perf_counter()
            self.samples.append({"snapshot": index,
                                 "step": trainer.global_step, "rss": live_rss(),
                                 "fds": open_fds(), "threads": threading.active_count(),
                                 "os_threads": proc_status("Threads"),
                                 "seconds": now - self.start})

        def on_train_start(self, trainer, pl_module):
            self._sample(trainer)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self._sample(trainer)

    sampler = Sampler()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=snapshots - 1,
        logger=TensorBoardLogger(str(root), name="tb", default_hp_metric=False),
        callbacks=[callback, sampler], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
        num_sanity_val_steps=0, log_every_n_steps=10, default_root_dir=str(root))
    trainer.fit(model, dm)
    start = time.perf_counter()
    run = load_run(root / "normx")
    load_seconds = time.perf_counter() - start
    return {"snapshots": len(run.steps), "missing": len(run.missing),
            "samples": sampler.samples, "load_run_seconds": load_seconds,
            "store_files": sum(1 for _ in (root / "normx").rglob("*") if _.is_file()),
            "token_rows": len(run["tokens"])}


def summarize(result: dict) -> dict:
    """RSS, fds and threads at the first, a tenth, the middle and the last snapshot;
    growth from a tenth (the warm-up: caches, the heatmap history filling) to the end."""
    samples = result["samples"]
    n = samples[-1]["snapshot"]
    by_index = {s["snapshot"]: s for s in samples}
    tenth = min(by_index, key=lambda i: abs(i - n / 10) if i > 1 else n)
    middle = min(by_index, key=lambda i: abs(i - n / 2))
    at = {m: by_index[m] for m in (1, tenth, middle, n)}
    after_warmup = [s for s in samples if s["snapshot"] >= tenth]
    return {
        "snapshots": result["snapshots"],
        "missing": result["missing"],
        "rss_mb": {m: round(s["rss"] / MB, 1) for m, s in at.items()},
        "rss_growth_after_warmup_mb": round((samples[-1]["rss"] - after_warmup[0]["rss"]) / MB,
                                            1),
        "fds": {m: s["fds"] for m, s in at.items()},
        "fds_range_after_warmup": (min(s["fds"] for s in after_warmup),
                                   max(s["fds"] for s in after_warmup)),
        "threads": {m: s["threads"] for m, s in at.items()},
        "os_threads": {m: s["os_threads"] for m, s in at.items()},
        "seconds_per_snapshot": round(samples[-1]["seconds"] / max(1, n - 1), 3),
        "rss_mb_all": [round(s["rss"] / MB, 1) for s in samples],
        "load_run_seconds": round(result["load_run_seconds"], 2),
        "store_files": result["store_files"],
        "token_rows": result["token_rows"],
    }


# ----------------------------------------------------------------------------- part 2


def large_vocab_peak(vocab: int = 256_000, d_model: int = 64, n_layers: int = 2,
                     probes: int = 256, length: int = 128, batch_size: int = 16) -> dict:
    """Peak memory of `normxlogit(layers="all")` on a large-vocabulary GPT-2.

    `peak_delta_mb`: VmHWM during the call minus RSS just before it (the model already
    built); `full_logits_gb`: what the logits at every position and layer would take.
    """
    import torch
    import transformers

    from normx_callbacks import normxlogit

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = transformers.GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=2,
                                     vocab_size=vocab, n_positions=length)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, vocab, (probes, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    before = rss()
    exact = reset_peak()
    start = time.perf_counter()
    attr = normxlogit(model, ids, mask, layers="all", batch_size=batch_size)
    seconds = time.perf_counter() - start
    peak = proc_status("VmHWM")
    return {
        "vocab": vocab, "d_model": d_model, "n_layers": n_layers, "probes": probes,
        "length": length, "batch_size": batch_size,
        "full_logits_gb": round(probes * length * (n_layers + 1) * vocab * 4 / 1e9, 1),
        "rss_before_mb": round(before / MB, 1),
        "peak_mb": round(peak / MB, 1),
        "peak_delta_mb": round((peak - before) / MB, 1) if exact else None,
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "seconds": round(seconds, 2),
        "finite": bool(torch.isfinite(attr.layer_scores[attr.valid[:, None, :].expand_as(
            attr.layer_scores)]).all()),
    }


# ----------------------------------------------------------------------------- command line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--snapshots", type=int, default=0, help="part 1 with N snapshots")
    parser.add_argument("--large-vocab", action="store_true", help="part 2 (fresh process)")
    parser.add_argument("--large-vocab-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probes", type=int, default=256, help="part 2: probes")
    parser.add_argument("--root", help="part 1: output directory (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.large_vocab_child:
        print(json.dumps(large_vocab_peak(probes=args.probes)))
        return 0
    if not args.snapshots and not args.large_vocab:
        parser.error("give --snapshots N and/or --large-vocab")
    if args.snapshots:
        with tempfile.TemporaryDirectory() as tmp:
            result = long_run(args.snapshots, args.root or tmp)
            print(json.dumps(summarize(result), indent=1))
    if args.large_vocab:
        # A fresh process: its ru_maxrss is this measurement's alone.
        out = subprocess.run([sys.executable, __file__, "--large-vocab-child",
                              "--probes", str(args.probes)], capture_output=True, text=True,
                             check=True)
        print(json.dumps(json.loads(out.stdout.strip().splitlines()[-1]), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
