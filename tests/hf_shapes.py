"""Hugging Face causal LMs trained by a LightningModule that shards them with FSDP2 in
`configure_model`, in the two canonical ways (our own code): `fully_shard` on every block
and then on the whole model ("block"), or on the whole model only ("root")."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import transformers as T

# Both families per block and at the root (the canonical form); the root only once (what it
# changes, one FSDP unit for the whole model, does not depend on the family).
SHARDINGS = ("gpt2-block", "llama-block", "llama-root")


def config(family: str, vocab_size: int):
    if family == "gpt2":  # tied head, learned positions, LayerNorm
        return T.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size,
                            n_positions=64, bos_token_id=None, eos_token_id=None)
    # untied head, rotary positions, RMSNorm, grouped-query attention
    return T.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, vocab_size=vocab_size,
                         max_position_embeddings=64, tie_word_embeddings=False)


class HFModule(pl.LightningModule):
    """Next-token training of an HF causal LM built (seeded) in `configure_model`; ``shard``:
    "block", "root" or None (one process, no sharding)."""

    def __init__(self, family: str, vocab_size: int, tokenizer=None, shard: str | None = None):
        super().__init__()
        self.family, self.vocab_size, self.tokenizer, self.shard = (family, vocab_size,
                                                                     tokenizer, shard)
        self.model = None

    def configure_model(self):
        if self.model is not None:
            return
        torch.manual_seed(0)
        self.model = T.AutoModelForCausalLM.from_config(config(self.family, self.vocab_size))
        if self.shard is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        if self.shard == "block":
            for block in self.model.base_model.layers if self.family == "llama" else \
                    self.model.base_model.h:
                fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        return self.model(input_ids=ids, attention_mask=batch.get("attention_mask"),
                          labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
