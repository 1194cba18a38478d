"""The model changes under the callback: a vocabulary resized between two fits or during a
fit (`resize_token_embeddings` puts in new embedding and head modules). The adapter is read
again and verified, so the scores after the change equal those of a freshly read model."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import numpy as np
import torch
from hf_shapes import HFModule
from training import make_trainer

from normx_callbacks import NormXLogitCallback, ProbeSet, load_run, normxlogit

EXTRA = 64  # rows added, as `resize_token_embeddings(pad_to_multiple_of=64)` would


def fresh_scores(model: torch.nn.Module, dm) -> np.ndarray:
    """Last-layer NormXLogit of the probes from a copy of ``model`` read from scratch."""
    enc = ProbeSet.coerce(dm.probes).encode(dm.tokenizer, objective="causal")
    attr = normxlogit(copy.deepcopy(model), enc.input_ids, enc.attention_mask,
                      positions=enc.positions, targets=enc.targets)
    return attr.scores.numpy()


def stored_scores(run, step: int, enc_shape: tuple[int, int], probe_ids: list[str]) -> np.ndarray:
    tokens = run["tokens"]
    last = tokens[(tokens.step == step) & (tokens.layer == tokens.layer.max())]
    out = np.full(enc_shape, np.nan)
    for row in last.itertuples(index=False):
        out[probe_ids.index(row.probe_id), row.position] = row.score
    return out


def compare(run, step: int, module: HFModule, dm) -> None:
    want = fresh_scores(module.model, dm)
    ids = ProbeSet.coerce(dm.probes).encode(dm.tokenizer, objective="causal").ids
    got = stored_scores(run, step, want.shape, ids)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_a_vocabulary_resized_between_two_fits_is_read_again(dm, tmp_path):
    pl.seed_everything(0, verbose=False)
    module = HFModule("llama", dm.vocab_size, dm.tokenizer)  # untied head
    callback = NormXLogitCallback(dm.probes, every_n_steps=100, media_probes=0,
                                  faithfulness_every=None, store_dir=tmp_path / "store")
    trainer = make_trainer(tmp_path, [callback], max_steps=3)
    trainer.fit(module, dm)
    old_head = module.model.get_output_embeddings()
    module.model.resize_token_embeddings(dm.vocab_size + EXTRA)
    assert module.model.get_output_embeddings() is not old_head  # a new head module
    trainer.fit_loop.epoch_loop.max_steps = 6  # the same run goes on, new vocabulary
    trainer.fit(module, dm)
    assert callback.adapter.module is module.model
    assert callback.adapter.embedding.num_embeddings == dm.vocab_size + EXTRA
    run = load_run(tmp_path / "store")
    assert not len(run.missing), run.missing
    compare(run, run.steps[-1], module, dm)
    emb = run["embedding"]
    assert (emb.step == run.steps[0]).sum() == dm.vocab_size
    assert (emb.step == run.steps[-1]).sum() == dm.vocab_size + EXTRA


class ResizeAt(pl.Callback):
    """Resizes the model's vocabulary after optimizer step ``step`` (the user's own code)."""

    def __init__(self, step: int, rows: int):
        self.step, self.rows = step, rows

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            pl_module.model.resize_token_embeddings(self.rows)


def test_a_vocabulary_resized_during_a_fit_is_read_again_at_the_next_snapshot(dm, tmp_path,
                                                                              caplog):
    pl.seed_everything(0, verbose=False)
    module = HFModule("llama", dm.vocab_size, dm.tokenizer)
    callback = NormXLogitCallback(dm.probes, every_n_steps=100, media_probes=0,
                                  faithfulness_every=None, store_dir=tmp_path / "store")
    with caplog.at_level("WARNING"):
        make_trainer(tmp_path, [ResizeAt(3, dm.vocab_size + EXTRA), callback],
                     max_steps=6).fit(module, dm)
    run = load_run(tmp_path / "store")
    assert run.steps == [0, 1, 2, 4, 6] and not len(run.missing), run.missing
    assert "the model changed since it was read" in caplog.text
    assert f"{dm.vocab_size} -> {dm.vocab_size + EXTRA} rows" in caplog.text
    compare(run, 6, module, dm)
    emb = run["embedding"]
    before = emb[emb.step == 2].sort_values("token_id")["count"].to_numpy()
    after = emb[emb.step == 6].sort_values("token_id")["count"].to_numpy()
    assert len(after) == dm.vocab_size + EXTRA
    assert (after[: dm.vocab_size] >= before).all() and after.sum() > before.sum()  # carried


def test_a_model_that_changed_beyond_reading_records_each_snapshot_as_missing(dm, tmp_path):
    """A hand-built adapter cannot be read again: after the resize its check fails, and the
    steps are recorded as missing with a reason that names the change."""
    from normx_callbacks.discovery import resolve_adapter

    pl.seed_everything(0, verbose=False)
    module = HFModule("llama", dm.vocab_size, dm.tokenizer)
    module.configure_model()
    adapter = copy.copy(resolve_adapter(module.model))
    adapter.resolved = False  # as a ModelAdapter(...) written by hand
    callback = NormXLogitCallback(dm.probes, adapter=adapter, every_n_steps=100,
                                  media_probes=0, faithfulness_every=None,
                                  store_dir=tmp_path / "store")
    make_trainer(tmp_path, [ResizeAt(3, dm.vocab_size + EXTRA), callback],
                 max_steps=6).fit(module, dm)
    run = load_run(tmp_path / "store")
    assert run.steps == [0, 1, 2]
    missing = run.missing.set_index("step")["reason"]
    assert list(missing.index) == [4, 6]
    assert all("the model changed since it was read" in r and "resize_token_embeddings" in r
               for r in missing)


def test_a_frozen_embedding_is_said_once_and_recorded(dm, tmp_path, caplog):
    """PEFT/LoRA-style training leaves the embedding frozen: its norms never move, which the
    run says instead of showing flat curves without a word."""
    pl.seed_everything(0, verbose=False)
    module = HFModule("gpt2", dm.vocab_size, dm.tokenizer)
    module.configure_model()
    module.model.get_input_embeddings().weight.requires_grad_(False)
    callback = NormXLogitCallback(dm.probes, every_n_steps=100, media_probes=0,
                                  faithfulness_every=None, store_dir=tmp_path / "store")
    with caplog.at_level("WARNING", logger="normx_callbacks"):
        make_trainer(tmp_path, [callback], max_steps=2).fit(module, dm)
    notices = [r.getMessage() for r in caplog.records if "is frozen" in r.getMessage()]
    assert len(notices) == 1 and "GPT2LMHeadModel" in notices[0]
    run = load_run(tmp_path / "store")
    assert run.meta["run_meta"]["embedding_frozen"] is True
    drift = run.metrics.query("key == 'embedding/drift'")["value"]
    assert (drift == 0).all() and len(drift) == 2  # steps 1 and 2: the rows never moved
