"""What `normx replay` costs against its floor: loading each checkpoint plus the probe forward.

    python benchmarks/replay.py --threads 1                  # 8 checkpoints, 3 rounds
    python benchmarks/replay.py --threads 1 --quick          # 4 checkpoints, 2 rounds

The checkpoints are the demo run's: `configs/tiny.yaml`'s model (GPT-2 shape, d=64, 2
layers, 512-token BPE) and probe suite (64 agreement probes), trained here for
`--every * --checkpoints` steps with a `.ckpt` every `--every` steps (a shorter corpus than
tiny.yaml's, so the script takes a minute; the shapes are the same).

Two arms, timed in the same process, each round running both, the order alternating:

- floor: for each checkpoint, `load_model_and_tokenizer` (`torch.load(weights_only=True)`,
  rebuild the demo model, load the tokenizer) and `normxlogit` over the probes at every
  layer (probes encoded once): what any replay must do at least;
- replay: `replay(checkpoints, probes=..., store_dir=<fresh>)` with the defaults (all
  layers, no faithfulness), which also computes the metrics, builds the tables and writes
  the Parquet store.

Printed: milliseconds per checkpoint of each arm, the ratio replay / floor per round and
their median.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import harness as h

from normx_callbacks import ProbeSet, normxlogit, resolve_adapter
from normx_callbacks.checkpoints import load_model_and_tokenizer
from normx_callbacks.replay import replay


def train_series(root: Path, every: int, count: int):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from normx_callbacks.demo import LanguageModel, TextDataModule

    dm = TextDataModule(corpus="agreement", bpe_vocab_size=512, num_train=2000, num_probes=64,
                        batch_size=32, context=32, cache_dir=str(root / "cache"))
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


def main(argv=None) -> int:
    p = h.parser(__doc__, devices=False)
    p.add_argument("--checkpoints", type=int, help="default 8 (quick 4)")
    p.add_argument("--every", type=int, default=10, help="training steps between them")
    p.add_argument("--rounds", type=int, help="default 3 (quick 2)")
    args = p.parse_args(argv)
    args.checkpoints = args.checkpoints or (4 if args.quick else 8)
    args.rounds = args.rounds or (2 if args.quick else 3)
    settings = {k: getattr(args, k) for k in ("checkpoints", "every", "rounds")}
    info = h.start(args, "normx replay against loading + probe forward", settings)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths, probes = train_series(root, args.every, args.checkpoints)
        n = len(paths)
        print(f"checkpoints: {n} ({paths[0].name} ... {paths[-1].name}), probes: {len(probes)}")
        floor(paths[:1], probes)  # warm-up: imports, allocator, tokenizer cache
        rounds = []
        for r in range(args.rounds):
            times = {}
            for arm in ("floor", "replay") if r % 2 == 0 else ("replay", "floor"):
                began = time.perf_counter()
                if arm == "floor":
                    floor(paths, probes)
                else:
                    replay(paths, probes=probes, store_dir=root / f"store{r}", device="cpu",
                           progress=False)
                times[arm] = 1e3 * (time.perf_counter() - began) / n
            rounds.append({**times, "ratio": times["replay"] / times["floor"]})
            print(f"round {r}: floor {times['floor']:.1f} ms/ckpt, replay "
                  f"{times['replay']:.1f} ms/ckpt, ratio {rounds[-1]['ratio']:.2f}", flush=True)
    ratio = h.median(r["ratio"] for r in rounds)
    print(f"median ratio replay / (load + probe forward): {ratio:.2f}")
    h.finish(args, started, machine=info, settings=settings, rounds=rounds, ratio=ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
