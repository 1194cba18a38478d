"""Token counting in real Lightning runs, for every batch format: tuples (nanoGPT's `(x, y)`,
`TensorDataset`), masked-LM batches (the uncorrupted text, never `[MASK]`), `count_fn`, and
one warning when a batch holds nothing the counter can read.
"""

from __future__ import annotations

import logging
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normx_callbacks import NormXLogitCallback, load_run
from normx_callbacks.demo import LanguageModel, TextDataModule, build_model
from normx_callbacks.embeddings import TokenCounter


def trainer_for(root, callback, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(root))
    return pl.Trainer(callbacks=[callback], **{**options, **kwargs})


def final_counts(store) -> torch.Tensor:
    emb = load_run(store)["embedding"]
    rows = emb[emb.step == emb.step.max()].sort_values("token_id")
    return torch.tensor(rows["count"].to_numpy(), dtype=torch.long)


def final_metric(store, key: str) -> float:
    metrics = load_run(store)["metrics"]
    rows = metrics[(metrics.key == key)]
    return float(rows[rows.step == rows.step.max()]["value"].iloc[0])


@pytest.fixture(scope="module")
def causal_dm(cache_dir) -> TextDataModule:
    data = TextDataModule(corpus="agreement", bpe_vocab_size=512, num_train=96, num_probes=4,
                          batch_size=16, cache_dir=cache_dir)
    data.setup("fit")
    return data


class TupleLM(pl.LightningModule):
    """nanoGPT-style training step: the batch is `(x, y)`, no dict anywhere."""

    def __init__(self, tokenizer, vocab_size: int):
        super().__init__()
        self.tokenizer = tokenizer
        torch.manual_seed(0)
        self.model = build_model("gpt2", vocab_size=vocab_size, d_model=32, n_layers=2,
                                 n_heads=2, context=64, dropout=0.0)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(input_ids=x).logits
        return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def test_tuple_batches_are_counted_and_give_a_finite_norm_frequency_correlation(
        causal_dm, tmp_path, caplog):
    ids = causal_dm._train.input_ids
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    model = TupleLM(causal_dm.tokenizer, causal_dm.vocab_size)
    callback = NormXLogitCallback(causal_dm.probes, media_probes=0, faithfulness_every=None,
                                  store_dir=tmp_path / "store")
    with caplog.at_level(logging.WARNING, logger="normx_callbacks"):
        trainer_for(tmp_path, callback, max_epochs=1).fit(model, loader)

    # One epoch: every x was counted once (no attention mask in a tuple: every position).
    expected = torch.bincount(x.reshape(-1), minlength=causal_dm.vocab_size)
    assert torch.equal(final_counts(tmp_path / "store"), expected)
    rho = final_metric(tmp_path / "store", "embedding/norm_logfreq_spearman")
    assert math.isfinite(rho)
    assert "no tokens were counted" not in caplog.text


def test_masked_lm_counts_the_uncorrupted_text_never_the_mask_token(cache_dir, tmp_path):
    dm = TextDataModule(corpus="agreement", objective="masked", bpe_vocab_size=512,
                        num_train=64, num_probes=4, batch_size=16, cache_dir=cache_dir)
    dm.setup("fit")
    pl.seed_everything(0, verbose=False)
    model = LanguageModel(arch="bert", d_model=32, n_layers=2, n_heads=2, dropout=0.0,
                          vocab_size=dm.vocab_size, pad_token_id=dm.pad_token_id,
                          tokenizer=dm.tokenizer)
    callback = NormXLogitCallback(dm.probes, media_probes=0, faithfulness_every=None,
                                  store_dir=tmp_path / "store")
    trainer_for(tmp_path, callback, max_epochs=1).fit(model, dm)

    # The exact count of the corpus the epoch went through, before any corruption.
    train = dm._train
    expected = torch.bincount(train.input_ids[train.attention_mask.bool()],
                              minlength=dm.vocab_size)
    counts = final_counts(tmp_path / "store")
    assert torch.equal(counts, expected)
    assert counts[dm.tokenizer.mask_token_id] == 0
    assert int((counts > 0).sum()) == int((expected > 0).sum())


def test_a_batch_without_token_ids_gets_one_warning_and_count_fn_reads_it(
        causal_dm, tmp_path, caplog):
    ids = causal_dm._train.input_ids[:48]

    class TokensLM(TupleLM):
        def training_step(self, batch, batch_idx):
            return super().training_step((batch["tokens"][:, :-1], batch["tokens"][:, 1:]),
                                         batch_idx)

    loader = DataLoader([{"tokens": row} for row in ids], batch_size=16)

    def run(root, **kwargs):
        callback = NormXLogitCallback(causal_dm.probes, media_probes=0, faithfulness_every=None,
                                      store_dir=root / "store", **kwargs)
        model = TokensLM(causal_dm.tokenizer, causal_dm.vocab_size)
        trainer_for(root, callback, max_steps=3).fit(model, loader)
        return final_counts(root / "store")

    with caplog.at_level(logging.WARNING, logger="normx_callbacks"):
        counts = run(tmp_path / "plain")
    warnings = [r.getMessage() for r in caplog.records if "no tokens were counted" in r.getMessage()]
    assert len(warnings) == 1
    assert "batch_key='input_ids'" in warnings[0]
    assert "dict{'tokens': Tensor[16, 64] int64}" in warnings[0]
    assert int(counts.sum()) == 0

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="normx_callbacks"):
        counts = run(tmp_path / "fn", count_fn=lambda batch: batch["tokens"])
    assert torch.equal(counts, torch.bincount(ids.reshape(-1), minlength=causal_dm.vocab_size))
    assert "no tokens were counted" not in caplog.text


def test_counter_reads_every_batch_format():
    ids = torch.tensor([[1, 2, 3], [3, 4, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    expected = torch.tensor([0, 1, 1, 2, 1, 0])
    counter = TokenCounter(6)
    assert torch.equal(counter.batch_counts({"input_ids": ids, "attention_mask": mask}),
                       expected)
    from transformers import BatchEncoding

    batch = BatchEncoding({"input_ids": ids, "attention_mask": mask})
    assert torch.equal(counter.batch_counts(batch), expected)
    everything = torch.bincount(ids.reshape(-1), minlength=6)
    assert torch.equal(counter.batch_counts(ids), everything)
    assert torch.equal(counter.batch_counts([torch.ones(2), ids, ids.float()]), everything)
    assert torch.equal(TokenCounter(6, batch_key=0, mask_key=1).batch_counts((ids, mask)),
                       expected)
    assert counter.batch_counts({"text": ["a"]}) is None
    masked = TokenCounter(6, masked=True, mask_token_id=5)
    corrupt = torch.tensor([[1, 5, 3], [5, 4, 0]])
    labels = torch.tensor([[-100, 2, -100], [-100, -100, -100]])
    # Position (1, 0) is a mask token with no label: never counted.
    got = masked.batch_counts({"input_ids": corrupt, "attention_mask": mask, "labels": labels})
    assert torch.equal(got, torch.tensor([0, 1, 1, 1, 1, 0]))
