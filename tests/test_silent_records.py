"""Setups where the callback used to record wrong numbers without a word (issue 11, cases
4-9), each in a real Lightning run:

- token counting for every batch format: tuples (nanoGPT's `(x, y)`, `TensorDataset`),
  masked-LM batches (the uncorrupted text, never `[MASK]`), `count_fn`, and one warning when a
  batch holds nothing the counter can read;
- multi-token targets and foils: the first differing piece is explained, the pieces are stored;
- model choice: a frozen Hugging Face model beside a trainable one is never picked silently;
  a bare body without a head is refused;
- hand-built adapters are checked against the model's own forward, and their context length
  bounds the probes;
- models that take no attention mask: probes run in equal-length groups, so a padded probe
  scores exactly as it does alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normx_callbacks import (
    ModelAdapter,
    NormXLogitCallback,
    ProbeError,
    UnsupportedModelError,
    faithfulness_table,
    load_run,
    normxlogit,
    verify_adapter,
)
from normx_callbacks.demo import LanguageModel, TextDataModule, build_model
from normx_callbacks.embeddings import TokenCounter
from normx_callbacks.encoding import readable_tokens


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


# --------------------------------------------------------------------------- multi-token words


def test_a_multi_token_target_is_never_cut_silently(causal_dm, tmp_path):
    tok = causal_dm.tokenizer
    house = tok(" farmhouse", add_special_tokens=False)["input_ids"]
    land = tok(" farmland", add_special_tokens=False)["input_ids"]
    k = next(i for i, (a, b) in enumerate(zip(house, land, strict=False)) if a != b)
    assert len(tok(" cabinetry", add_special_tokens=False)["input_ids"]) > 1 and k >= 1
    probes = [*causal_dm.probes[:2],
              {"id": "cabinetry", "text": "the key near the", "target": "cabinetry"},
              {"id": "farm", "text": "the key near the", "target": "farmhouse", "foil": "farmland"}]
    model = TupleLM(tok, causal_dm.vocab_size)
    callback = NormXLogitCallback(probes, media_probes=0, faithfulness_every=None,
                                  store_dir=tmp_path / "store")
    loader = DataLoader(TensorDataset(causal_dm._train.input_ids[:48, :-1],
                                      causal_dm._train.input_ids[:48, 1:]), batch_size=16)
    with pytest.warns(UserWarning, match=r"2 probe\(s\) have a target or foil of several tokens: "
                                         r"cabinetry \(target 'cabinetry' -> .*; farm "):
        trainer_for(tmp_path, callback, max_steps=2).fit(model, loader)

    run = load_run(tmp_path / "store")
    rows = run["probes"][run["probes"].step == 2].set_index("probe_id")
    cab = tok(" cabinetry", add_special_tokens=False)["input_ids"]
    assert list(rows.loc["cabinetry", "target_tokens"]) == readable_tokens(tok, cab)
    assert rows.loc["cabinetry", "target_id"] == cab[0]
    assert list(rows.loc["farm", "foil_tokens"]) == readable_tokens(tok, land)
    assert (rows.loc["farm", "target_id"], rows.loc["farm", "foil_id"]) == (house[k], land[k])
    assert list(rows.loc["sv-pp-000", "foil_tokens"]) == [" were"]
    # The shared pieces joined the prefix: the explained position is the last of them.
    prefix = len(tok("the key near the")["input_ids"])
    assert rows.loc["farm", "position"] == prefix + k - 1
    tokens = run["tokens"]
    farm = tokens[(tokens.step == 2) & (tokens.probe_id == "farm") & (tokens.layer == 2)]
    assert farm.sort_values("position")["token_id"].tolist()[prefix:] == house[:k]


# --------------------------------------------------------------------------- model choice


class SmallGPT(nn.Module):
    """A GPT written without Hugging Face: pre-LN blocks, learned positions, `block_size`."""

    def __init__(self, vocab_size: int, d: int = 32, n_layers: int = 2, block_size: int = 64,
                 length_vector: bool = False):
        super().__init__()
        self.block_size = block_size
        self.length_vector = length_vector
        self.tok = nn.Embedding(vocab_size, d)
        self.pos = nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size, bias=False)

    def states(self, ids, mask=None, *, final_norm: bool = True):
        t = ids.shape[1]
        if self.length_vector:
            # Like Lightning's demo Transformer: one positional vector chosen by the
            # (padded) sequence length, added to every token; no attention mask taken.
            x = self.tok(ids) + self.pos.weight[t - 1]
        else:
            x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        out = [x]
        for block in self.blocks:
            x = block(x, src_mask=causal, is_causal=True)
            out.append(x)
        if final_norm:
            out[-1] = self.ln_f(x)
        return out

    def forward(self, ids):
        return self.head(self.states(ids)[-1])


def small_gpt_adapter(model: SmallGPT, **kwargs) -> ModelAdapter:
    options = dict(module=model, embedding=model.tok, hidden_states=model.states,
                   final_norm=model.ln_f, head=model.head, kind="causal",
                   num_layers=len(model.blocks))
    return ModelAdapter(**{**options, **kwargs})


class StudentTeacherLM(pl.LightningModule):
    """A trainable hand-written student distilled from a frozen Hugging Face teacher."""

    def __init__(self, tokenizer, vocab_size: int):
        super().__init__()
        self.tokenizer = tokenizer
        torch.manual_seed(0)
        self.student = SmallGPT(vocab_size)
        self.teacher = build_model("gpt2", vocab_size=vocab_size, d_model=16, n_layers=1,
                                   n_heads=2, context=64, dropout=0.0).requires_grad_(False)

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"]
        with torch.no_grad():
            target = self.teacher(input_ids=ids).logits.softmax(-1)
        logits = self.student(ids)
        return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.student.parameters(), lr=3e-3)


def test_a_frozen_hf_model_beside_a_trainable_one_is_refused_and_the_adapter_path_works(
        causal_dm, tmp_path):
    model = StudentTeacherLM(causal_dm.tokenizer, causal_dm.vocab_size)
    callback = NormXLogitCallback(causal_dm.probes, media_probes=0, faithfulness_every=None,
                                  store_dir=tmp_path / "refused")
    trainer = trainer_for(tmp_path, callback, max_steps=3)
    with pytest.raises(RuntimeError, match=r"the only Hugging Face model, 'teacher' "
                       r"\(GPT2LMHeadModel\), has no trainable parameters, while 'student' "
                       r"\(SmallGPT\) trains.*adapter=ModelAdapter\(module=pl_module\.student"
                       r".*model_attr='teacher'"):
        trainer.fit(model, causal_dm)
    assert trainer.global_step == 0

    # The way out the message names: the student's embeddings are the ones that move.
    callback = NormXLogitCallback(causal_dm.probes, adapter=small_gpt_adapter(model.student),
                                  media_probes=0, faithfulness_every=None,
                                  store_dir=tmp_path / "store")
    trainer_for(tmp_path, callback, max_steps=3).fit(model, causal_dm)
    assert callback.last_metrics["embedding/drift"] > 0


def test_of_two_hf_models_the_trainable_one_is_watched(causal_dm, tmp_path):
    class DistilLM(TupleLM):
        def __init__(self, tokenizer, vocab_size):
            super().__init__(tokenizer, vocab_size)
            self.teacher = build_model("gpt2", vocab_size=vocab_size, d_model=16, n_layers=1,
                                       n_heads=2, context=64, dropout=0.0).requires_grad_(False)

    model = DistilLM(causal_dm.tokenizer, causal_dm.vocab_size)
    callback = NormXLogitCallback(causal_dm.probes, media_probes=0, faithfulness_every=None,
                                  store_dir=tmp_path / "store")
    loader = DataLoader(TensorDataset(causal_dm._train.input_ids[:16, :-1],
                                      causal_dm._train.input_ids[:16, 1:]), batch_size=16)
    trainer_for(tmp_path, callback, max_steps=1).fit(model, loader)
    assert callback.adapter.module is model.model
    assert callback.last_metrics["embedding/drift"] > 0


def test_a_bare_body_without_a_head_is_refused_saying_so(causal_dm, tmp_path):
    from transformers import LlamaConfig, LlamaModel

    class BodyLM(TupleLM):
        def __init__(self, tokenizer, vocab_size):
            super().__init__(tokenizer, vocab_size)
            self.model = LlamaModel(LlamaConfig(vocab_size=vocab_size, hidden_size=16,
                                                intermediate_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, num_key_value_heads=1))

    callback = NormXLogitCallback(causal_dm.probes, media_probes=0, faithfulness_every=None,
                                  store_dir=tmp_path / "store")
    trainer = trainer_for(tmp_path, callback, max_steps=2)
    with pytest.raises(RuntimeError, match=r"LlamaModel is a bare transformer body without a "
                                           r"head.*LlamaForCausalLM"):
        trainer.fit(BodyLM(causal_dm.tokenizer, causal_dm.vocab_size), causal_dm)
    assert trainer.global_step == 0


# --------------------------------------------------------------------------- user adapters


class StudentLM(pl.LightningModule):
    def __init__(self, tokenizer, vocab_size: int, **kwargs):
        super().__init__()
        self.tokenizer = tokenizer
        torch.manual_seed(0)
        self.student = SmallGPT(vocab_size, **kwargs)

    def training_step(self, batch, batch_idx):
        ids = batch["input_ids"][:, : self.student.block_size]
        logits = self.student(ids)[:, :-1]
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def test_an_adapter_that_forgets_the_final_norm_is_refused_with_the_largest_difference(
        causal_dm, tmp_path):
    model = StudentLM(causal_dm.tokenizer, causal_dm.vocab_size)
    gpt = model.student
    wrong = small_gpt_adapter(gpt, hidden_states=lambda ids, mask: gpt.states(ids,
                                                                              final_norm=False))
    callback = NormXLogitCallback(causal_dm.probes, adapter=wrong, media_probes=0,
                                  faithfulness_every=None, store_dir=tmp_path / "store")
    trainer = trainer_for(tmp_path, callback, max_steps=2)
    with pytest.raises(RuntimeError, match=r"adapter disagrees with its model: the head of "
                                           r"SmallGPT could not be reproduced: largest "
                                           r"difference \d"):
        trainer.fit(model, causal_dm)
    assert trainer.global_step == 0
    assert not (tmp_path / "store").exists()


def test_verify_adapter_reads_every_forward_output_and_names_what_is_wrong():
    torch.manual_seed(0)
    gpt = SmallGPT(50)
    verify_adapter(small_gpt_adapter(gpt))  # module(ids) returns the logits tensor
    # nanoGPT's inference path: (logits of the last position only, loss)
    verify_adapter(small_gpt_adapter(gpt, forward=lambda ids: (gpt(ids)[:, -1:], None)))
    with pytest.raises(UnsupportedModelError, match=r"returned dict, not logits"):
        verify_adapter(small_gpt_adapter(gpt, forward=lambda ids: {"logits": gpt(ids)}))
    with pytest.raises(UnsupportedModelError, match=r"have shape \(8, 50\), the model's own "
                                                    r"\(8, 10\)"):
        verify_adapter(small_gpt_adapter(gpt, forward=lambda ids: gpt(ids)[..., :10]))
    assert small_gpt_adapter(gpt, context_length=12).context_length == 12
    with pytest.raises(ValueError, match=r"context_length=0\) must be a positive int"):
        small_gpt_adapter(gpt, context_length=0)


def test_a_probe_longer_than_the_adapter_models_context_fails_in_setup(causal_dm, tmp_path):
    model = StudentLM(causal_dm.tokenizer, causal_dm.vocab_size, block_size=8)
    adapter = small_gpt_adapter(model.student)
    assert adapter.context_length == 8  # read from SmallGPT.block_size
    probes = ["the table near the authors",
              "the farmer near the tables behind the old red houses near the kings"]
    callback = NormXLogitCallback(probes, adapter=adapter, media_probes=0,
                                  faithfulness_every=None, store_dir=tmp_path / "store")
    trainer = trainer_for(tmp_path, callback, max_steps=2)
    with pytest.raises(ProbeError, match=r"probe 'probe-1' \(index 1\): \d+ tokens exceed "
                                         r"max_length=8"):
        trainer.fit(model, causal_dm)
    assert trainer.global_step == 0


# --------------------------------------------------------------------------- no attention mask


def test_a_model_without_mask_support_scores_padded_probes_as_alone(causal_dm, tmp_path):
    model = StudentLM(causal_dm.tokenizer, causal_dm.vocab_size, length_vector=True)
    adapter = small_gpt_adapter(model.student, accepts_mask=False)
    probes = ["the table near the authors", "the farmer near the tables", "the keys",
              "the farmer near the tables behind the old red houses"]
    callback = NormXLogitCallback(probes, adapter=adapter, media_probes=0, layers="all",
                                  faithfulness_every=1, faithfulness_methods=("normxlogit",),
                                  store_dir=tmp_path / "store")
    trainer_for(tmp_path, callback, max_steps=3).fit(model, causal_dm)
    enc = callback.engine.ctx.encoded
    lengths = enc.attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 1  # the batch really is padded
    batched = callback.last_attribution
    for b, n in enumerate(lengths.tolist()):
        alone = normxlogit(adapter, enc.input_ids[b : b + 1, :n], layers="all")
        torch.testing.assert_close(batched.logat[b, :n], alone.logat[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched.layer_scores[b, :, :n], alone.layer_scores[0],
                                   rtol=1e-5, atol=1e-6)
        assert int(batched.positions[b]) == n - 1
        assert torch.isnan(batched.logat[b, n:]).all()
    # Faithfulness too: the mean over probes each evaluated alone.
    alone = [faithfulness_table(adapter, enc.select([b], n), ("normxlogit",),
                                replacement=callback.engine.measurement.replacement,
                                protect=callback.engine.ctx.protect[[b], :n])
             for b, n in enumerate(lengths.tolist())]
    for key in ("comprehensiveness", "sufficiency"):
        expected = sum(float(t[key].iloc[0]) for t in alone) / len(alone)
        assert callback.last_metrics[f"faithfulness/normxlogit/{key}"] == pytest.approx(
            expected, rel=1e-5, abs=1e-7)
    # The same batch through the padded path differs: the case the grouping exists for.
    padded = normxlogit(dataclasses.replace(adapter, accepts_mask=True), enc.input_ids,
                        enc.attention_mask)
    short = int(lengths.argmin())
    assert not torch.allclose(padded.logat[short], batched.logat[short], equal_nan=True)
