"""The demo LanguageModel and a quiet CPU Trainer, as the tests train them (our own code).

`make_model`: a 2-layer, 32-wide GPT-2 sized from a DataModule, seeded (0 unless told);
`make_trainer`: a CPU Trainer without progress bars, validation or (unless a ModelCheckpoint
is given) checkpoints; `fit`: both together; `counts_at`: a store's token counts at a step.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from normx_callbacks.demo import LanguageModel, TextDataModule

MAX_STEPS = 10
TABLES = ("embedding", "metrics", "probes", "tokens")  # every snapshot writes these


def make_model(dm: TextDataModule, *, dropout: float = 0.0, seed: int = 0,
               **kwargs) -> LanguageModel:
    pl.seed_everything(seed, verbose=False)
    options = dict(arch="gpt2", d_model=32, n_layers=2, n_heads=2, dropout=dropout,
                   vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id, tokenizer=dm.tokenizer)
    return LanguageModel(**{**options, **kwargs})


def make_trainer(root, callbacks, *, max_steps=MAX_STEPS, logger=False, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=logger, callbacks=callbacks,
        default_root_dir=str(root), enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        limit_val_batches=0, num_sanity_val_steps=0, **kwargs,
    )


def fit(model, dm, root, callbacks, *, ckpt_path=None, **kwargs) -> pl.Trainer:
    trainer = make_trainer(root, callbacks, **kwargs)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer


def counts_at(run, step: int) -> torch.Tensor:
    """The token counts a store recorded at ``step``, in token id order."""
    emb = run["embedding"]
    rows = emb[emb.step == step].sort_values("token_id")
    return torch.tensor(rows["count"].to_numpy(), dtype=torch.long)
