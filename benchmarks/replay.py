"""What `normx replay` costs against its floor: loading each checkpoint plus the probe forward.

    python benchmarks/replay.py --threads 1 --checkpoints 24 --rounds 7
    python benchmarks/replay.py --threads 1 --quick          # 4 checkpoints, 3 rounds
    python benchmarks/replay.py --checkpoints 2 --every 1 --rounds 1 --probes 4   # smallest

The checkpoints are the demo run's: `configs/tiny.yaml`'s model (GPT-2 shape, d=64, 2
layers, 512-token BPE) and probe suite (64 agreement probes), trained here for
`--every * --checkpoints` steps with a `.ckpt` every `--every` steps (a shorter corpus than
tiny.yaml's, so the script takes a minute; the shapes are the same). `--probes N` makes
N probes instead of 64 (the smallest run above, in tests/test_benchmarks.py, checks the
code path; its numbers mean nothing).

Three arms, timed in the same process; each round times `replay` and `reused` between two
runs of `floor`, the order rotating, and a ratio is taken against the mean of the two
`floor` runs around it (`harness.paired_rounds`):

- floor: for each checkpoint, `load_model_and_tokenizer` (`torch.load(weights_only=True)`,
  rebuild the demo model, load the tokenizer), read the model (`resolve_adapter`) and
  `normxlogit` over the probes at every layer (probes encoded once): loading the
  checkpoints as one loads a checkpoint, plus the probe forwards;
- reused: the least any replay could do: the model built and read once, then for each
  checkpoint `torch.load` and `load_state_dict` into it, and the probe forward;
- replay: `replay(checkpoints, probes=..., store_dir=<fresh>)` with the defaults (all
  layers, no faithfulness), which also computes the metrics, builds the tables and writes
  the Parquet store (in its helper process), and waits for the last snapshot's write.

Printed: milliseconds per checkpoint of each arm (medians) and the median ratios replay /
floor and replay / reused.
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from pathlib import Path

import harness as h
import torch

from normx_callbacks import ProbeSet, normxlogit, resolve_adapter
from normx_callbacks.checkpoints import load_model_and_tokenizer
from normx_callbacks.replay import replay


def train_series(root: Path, every: int, count: int, probes: int = 64):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from normx_callbacks.demo import LanguageModel, TextDataModule

    dm = TextDataModule(corpus="agreement", bpe_vocab_size=512, num_train=2000,
                        num_probes=probes, batch_size=32, context=32,
                        cache_dir=str(root / "cache"))
    dm.setup("fit")
    pl.seed_everything(0, verbose=False)
    model = LanguageModel(arch="gpt2", d_model=64, n_layers=2, n_heads=4, context=32,
                          dropout=0.0, vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id,
                          tokenizer=dm.tokenizer)
    ckpt = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_top_k=-1)
    pl.Trainer(accelerator="cpu", max_steps=every * count, logger=False, callbacks=[ckpt],
               enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
               num_sanity_val_steps=0).fit(model, dm)
    return sorted((root / "ckpt").glob("*.ckpt")), dm.probes


def floor(paths, probes) -> None:
    probe_set, enc = ProbeSet(probes), None
    for path in paths:
        model, tokenizer = load_model_and_tokenizer(path)
        if enc is None:  # one tokenizer for the series: encoded once
            enc = probe_set.encode(tokenizer, objective="causal", max_length=32)
        normxlogit(resolve_adapter(model), enc.input_ids, enc.attention_mask,
                   positions=enc.positions, targets=enc.targets, foils=enc.foils,
                   layers="all", batch_size=32)


def reused(paths, probes) -> None:
    model, tokenizer = load_model_and_tokenizer(paths[0])
    adapter = resolve_adapter(model)
    enc = ProbeSet(probes).encode(tokenizer, objective="causal", max_length=32)
    for path in paths:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict({k[len("model."):]: v for k, v in ckpt["state_dict"].items()
                               if k.startswith("model.")})
        normxlogit(adapter, enc.input_ids, enc.attention_mask, positions=enc.positions,
                   targets=enc.targets, foils=enc.foils, layers="all", batch_size=32)


def main(argv=None) -> int:
    p = h.parser(__doc__, devices=False)
    p.add_argument("--checkpoints", type=int, help="default 8 (quick 4)")
    p.add_argument("--every", type=int, default=10, help="training steps between them")
    p.add_argument("--rounds", type=int, help="default 5 (quick 3)")
    p.add_argument("--probes", type=int, default=64, help="probes (default 64)")
    args = p.parse_args(argv)
    args.checkpoints = args.checkpoints or (4 if args.quick else 8)
    args.rounds = args.rounds or (3 if args.quick else 5)
    settings = {k: getattr(args, k) for k in ("checkpoints", "every", "rounds", "probes")}
    info = h.start(args, "normx replay against loading + probe forward", settings)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths, probes = train_series(root, args.every, args.checkpoints, args.probes)
        n = len(paths)
        print(f"checkpoints: {n} ({paths[0].name} ... {paths[-1].name}), probes: {len(probes)}")
        stores = itertools.count()
        arms = {
            "floor": lambda: floor(paths, probes),
            "reused": lambda: reused(paths, probes),
            "replay": lambda: replay(paths, probes=probes, device="cpu", progress=False,
                                     store_dir=root / f"store{next(stores)}"),
        }
        samples, ratios, jitter = h.paired_rounds(arms, "floor", args.rounds, "cpu")
    ms = {arm: 1e3 * h.median(ts) / n for arm, ts in samples.items()}
    result = {"ms_per_checkpoint": ms,
              "replay_over_floor": h.median(ratios["replay"]),
              "replay_over_reused": h.median(r / q for r, q in zip(ratios["replay"],
                                                                   ratios["reused"],
                                                                   strict=True)),
              "reused_over_floor": h.median(ratios["reused"]),
              "ratios": ratios, "floor_jitter": h.median(jitter)}
    for arm, value in ms.items():
        print(f"{arm}: {value:.1f} ms/ckpt")
    print("replay / floor per round: " + ", ".join(f"{r:.2f}" for r in ratios["replay"]))
    print(f"median ratio replay / floor (load + probe forward): {result['replay_over_floor']:.2f}")
    print(f"median ratio replay / reused (torch.load into one model + probe forward): "
          f"{result['replay_over_reused']:.2f}")
    print(f"median ratio reused / floor: {result['reused_over_floor']:.2f}; floor's own "
          f"round-to-round change (median): {100 * result['floor_jitter']:.0f}%")
    h.finish(args, started, machine=info, settings=settings, **result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
