"""What `normx replay` costs against its floor: loading each checkpoint plus the probe forward.

    python benchmarks/replay.py --threads 1                  # 8 checkpoints, 3 rounds
    python benchmarks/replay.py --threads 1 --checkpoints 4 --rounds 2

The checkpoints are the demo run's: `configs/tiny.yaml`'s model (GPT-2 shape, d=64, 2
layers, 512-token BPE) and probe suite (64 agreement probes), trained here for
`--every * --checkpoints` steps with a `.ckpt` every `--every` steps (a shorter corpus than
tiny.yaml's, so the script takes a minute; the shapes are the same).

Two arms, timed in the same process, each round running both in rotating order:

- floor: for each checkpoint, load it (`torch.load(weights_only=True)`, rebuild the demo
  model, load the tokenizer) and run `normxlogit` over the probes at every layer (probes
  encoded once), what any replay must do at least;
- replay: `replay(checkpoints, probes=..., store_dir=<fresh>)` with the defaults (all
  layers, no faithfulness), which also computes the metrics, builds the tables and writes
  the Parquet store.

Printed: seconds per checkpoint of each arm and the ratio replay / floor per round and
their median.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, print_header, set_threads  # noqa: E402


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
    from normx_callbacks.adapters import resolve_adapter
    from normx_callbacks.attribution import normxlogit
    from normx_callbacks.checkpoints import load_model_and_tokenizer
    from normx_callbacks.probes import ProbeSet

    probe_set, enc = ProbeSet(probes), None
    for path in paths:
        model, tokenizer = load_model_and_tokenizer(path)
        if enc is None:  # one tokenizer for the series: encoded once
            enc = probe_set.encode(tokenizer, objective="causal", max_length=32)
        normxlogit(resolve_adapter(model), enc.input_ids, enc.attention_mask,
                   positions=enc.positions, targets=enc.targets, foils=enc.foils,
                   layers="all", batch_size=32)
        del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--checkpoints", type=int, default=8)
    parser.add_argument("--every", type=int, default=10, help="training steps between them")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    set_threads(args.threads)

    import logging

    from normx_callbacks.replay import replay

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    print_header("normx replay against loading + probe forward", machine("cpu"), vars(args))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths, probes = train_series(root, args.every, args.checkpoints)
        n = len(paths)
        print(f"checkpoints: {n} ({paths[0].name} ... {paths[-1].name}), probes: {len(probes)}")
        arms = {
            "floor": lambda: floor(paths, probes),
            "replay": lambda r: replay(paths, probes=probes, store_dir=root / f"store{r}",
                                       device="cpu", progress=False),
        }
        floor(paths[:1], probes)  # warm-up: imports, allocator, tokenizer cache
        ratios = []
        for r in range(args.rounds):
            times = {}
            for name in (("floor", "replay") if r % 2 == 0 else ("replay", "floor")):
                start = time.perf_counter()
                arms[name](r) if name == "replay" else arms[name]()
                times[name] = time.perf_counter() - start
            ratios.append(times["replay"] / times["floor"])
            print(f"round {r}: floor {times['floor'] / n * 1e3:.1f} ms/ckpt, replay "
                  f"{times['replay'] / n * 1e3:.1f} ms/ckpt, ratio {ratios[-1]:.2f}")
        print(f"median ratio replay / (load + probe forward): {median(ratios):.2f}")


if __name__ == "__main__":
    main()
