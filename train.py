"""Pre-train a small language model from scratch and watch token importance emerge.

    python train.py fit --config configs/tiny.yaml
    python train.py fit --config configs/tiny.yaml --trainer.max_steps 50
    python train.py fit --help

The LightningModule (`LanguageModel`) and DataModule (`TextDataModule`) live in
`normx_callbacks.demo`; the callback comes from the config's `trainer.callbacks`.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningCLI

from normx_callbacks import NormXLogitCallback
from normx_callbacks.demo import ARCHITECTURES, LanguageModel, TextDataModule


class NormXCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The model is sized by the tokenizer the DataModule trains, and probes and
        # training examples share the model's context length.
        parser.link_arguments("model.context", "data.context")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.pad_token_id", "model.pad_token_id", apply_on="instantiate")
        parser.link_arguments("data.tokenizer", "model.tokenizer", apply_on="instantiate")

    def before_fit(self) -> None:
        expected = ARCHITECTURES[self.model.hparams.arch][1]
        if self.datamodule.hparams.objective != expected:
            raise SystemExit(
                f"error: model.arch={self.model.hparams.arch!r} trains a {expected} LM but "
                f"data.objective={self.datamodule.hparams.objective!r}; set "
                f"--data.objective {expected}"
            )

    def after_fit(self) -> None:
        trainer = self.trainer
        # trainer.log_dir broadcasts under DDP: every rank must ask, not rank 0 alone.
        log_dir = trainer.log_dir or trainer.default_root_dir
        if not trainer.is_global_zero:
            return
        stores = [cb.store.root for cb in trainer.callbacks
                  if isinstance(cb, NormXLogitCallback) and cb.store is not None]
        lines = ["", "Run finished."]
        if trainer.logger is not None:
            lines.append(f"  logs:      {log_dir}")
            lines.append(f"  dashboard: tensorboard --logdir {os.path.dirname(log_dir)} "
                         "--samples_per_plugin images=200,text=200")
        for root in stores:
            lines.append(f"  snapshots: {root}")
            lines.append(f"  analyse:   python -c \"from normx_callbacks import load_run; "
                         f"run = load_run('{root}'); print(run.metrics)\"")
        print("\n".join(lines), file=sys.stderr)


def main(args=None) -> None:
    NormXCLI(LanguageModel, TextDataModule, save_config_kwargs={"overwrite": True},
             args=args)


if __name__ == "__main__":
    main()
