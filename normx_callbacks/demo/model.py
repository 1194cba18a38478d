"""A Hugging Face language model built from a config, trained by a LightningModule."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import transformers
from torch import nn

# name -> (config class, objective). Shapes follow GPT-2, Llama, GPT-NeoX, BERT, RoBERTa.
ARCHITECTURES = {
    "gpt2": ("GPT2Config", "causal"),
    "llama": ("LlamaConfig", "causal"),
    "gpt_neox": ("GPTNeoXConfig", "causal"),
    "bert": ("BertConfig", "masked"),
    "roberta": ("RobertaConfig", "masked"),
}


def build_model(
    arch: str,
    *,
    vocab_size: int,
    d_model: int,
    n_layers: int,
    n_heads: int,
    context: int,
    dropout: float,
    pad_token_id: int | None = None,
    ffn_mult: int = 4,
) -> nn.Module:
    """A randomly initialised HF model of shape `arch` (no pretrained weights)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch={arch!r} is not one of {sorted(ARCHITECTURES)}")
    config_name, objective = ARCHITECTURES[arch]
    common = dict(
        vocab_size=vocab_size,
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=ffn_mult * d_model,
        max_position_embeddings=context,
        pad_token_id=pad_token_id,
    )
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_positions=context,
            n_inner=ffn_mult * d_model,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            pad_token_id=pad_token_id,
            bos_token_id=None,
            eos_token_id=None,
        )
    elif arch == "llama":
        config = transformers.LlamaConfig(
            attention_dropout=dropout, tie_word_embeddings=True, **common
        )
    elif arch == "gpt_neox":
        config = transformers.GPTNeoXConfig(
            hidden_dropout=dropout, attention_dropout=dropout, tie_word_embeddings=False, **common
        )
    elif arch == "roberta":
        # RoBERTa offsets positions by padding_idx + 1.
        common["max_position_embeddings"] = context + 2
        config = transformers.RobertaConfig(
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **common
        )
    else:
        config = transformers.BertConfig(
            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **common
        )
    auto = (
        transformers.AutoModelForCausalLM
        if objective == "causal"
        else transformers.AutoModelForMaskedLM
    )
    return auto.from_config(config)


class LanguageModel(pl.LightningModule):
    """Pre-trains a small HF model from scratch: next-token or masked-token loss.

    `vocab_size`, `pad_token_id` and `tokenizer` come from the DataModule (linked by
    train.py), so the model always matches the tokenizer it is trained with.
    """

    def __init__(
        self,
        arch: str = "gpt2",
        d_model: int = 128,  # width: small enough for 2 CPU cores
        n_layers: int = 2,  # depth: the callback watches every layer
        n_heads: int = 4,
        context: int = 64,  # longest sequence (probes must fit)
        dropout: float = 0.1,
        lr: float = 3e-3,  # AdamW peak learning rate
        weight_decay: float = 0.01,
        warmup_steps: int = 20,  # linear warm-up, then cosine decay to 10%
        vocab_size: int = 1024,  # linked from the DataModule's tokenizer
        pad_token_id: int | None = None,
        tokenizer=None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])
        self.tokenizer = tokenizer
        self.objective = ARCHITECTURES[arch][1] if arch in ARCHITECTURES else None
        self.model = build_model(
            arch,
            vocab_size=vocab_size,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            context=context,
            dropout=dropout,
            pad_token_id=pad_token_id,
        )

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def _loss(self, batch) -> torch.Tensor:
        return self(batch["input_ids"], batch.get("attention_mask"), batch["labels"]).loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.named_parameters() if p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": hp.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=hp.lr,
            betas=(0.9, 0.98),
        )
        total = self.trainer.estimated_stepping_batches if self.trainer else 1000
        total = max(int(total), 1) if math.isfinite(total) else 1000

        def schedule(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min((step - hp.warmup_steps) / max(total - hp.warmup_steps, 1), 1.0)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }
