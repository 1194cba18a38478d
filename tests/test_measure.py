"""`measure`: preparing a model and tokenizer for the probes, and taking a snapshot.

Checks what `prepare_measurement` refuses before any training step (a tokenizer larger than
the embedding, a classifier, an adapter without its layer count, a layer out of range, a
distribution mode that cannot run the methods asked for) and what it fixes (the probe
context, tracked token ids, the gradient reference of alignment per mode); that a
snapshot's probe forward leaves every random stream as it was, also when it fails (the
failure becomes the snapshot's error); and that distributed shares cover every probe once
and merge back, in probe order, into the single-process attribution.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from models import build
from torch import nn
from training import make_model

from normx_callbacks import ModelAdapter, ProbeSet, Settings
from normx_callbacks.discovery import find_model, resolve_adapter
from normx_callbacks.measure import (
    check_mode,
    merge_shares,
    prepare_measurement,
    preserved_rng,
    share,
)


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


@pytest.fixture(scope="module")
def adapter(dm):
    return find_model(make_model(dm))


def prepare(adapter, dm, probes=None, mode="single", **settings):
    return prepare_measurement(adapter, dm.tokenizer, ProbeSet.coerce(probes or dm.probes),
                               Settings(**settings), owner="Who", mode=mode)


# --------------------------------------------------------------------------- refusals


def test_a_tokenizer_larger_than_the_embedding_is_refused(dm):
    small = resolve_adapter(build("gpt2"))  # 97 rows
    with pytest.raises(RuntimeError, match=rf"the tokenizer has {len(dm.tokenizer)} tokens but "
                                           r"the model's embedding has 97 rows: pass the "
                                           r"tokenizer the model was built for"):
        prepare(small, dm)


def test_a_classifier_is_refused(dm):
    classifier = resolve_adapter(build("bert_cls"))
    with pytest.raises(RuntimeError, match=r"Who instruments language-model pre-training, but "
                                           r"the model is a classifier model; use normxlogit\(\)"):
        prepare(classifier, dm)


def test_an_adapter_without_its_layer_count_or_a_layer_out_of_range_is_refused(adapter, dm):
    bare = ModelAdapter(module=adapter.module, embedding=adapter.embedding,
                        hidden_states=adapter.hidden_states, head=adapter.head)
    with pytest.raises(RuntimeError, match=r"Who: the ModelAdapter's num_layers is not set"):
        prepare(bare, dm)
    with pytest.raises(ValueError, match=r"^Who: layers contains 3: valid indices are 0\.\.2"):
        prepare(adapter, dm, layers=[0, 3])


def test_check_mode_refuses_an_unknown_mode_and_gradients_under_fsdp2():
    with pytest.raises(ValueError, match=r"mode='ddp' is not one of \('single', 'shared', "
                                         r"'collective'\)"):
        check_mode(Settings(), "ddp", "Who")
    gradient = Settings(faithfulness_methods=["normxlogit", "saliency"])
    check_mode(gradient, "shared", "Who")  # DDP: a backward pass is fine
    with pytest.raises(RuntimeError, match=r"Who: faithfulness_methods \['saliency'\] need a "
                                           r"backward pass"):
        check_mode(gradient, "collective", "Who")
    # Faithfulness off: the methods are never run, so nothing to refuse.
    check_mode(Settings(faithfulness_methods=["saliency"], faithfulness_every=None),
               "collective", "Who")


# --------------------------------------------------------------------------- what it fixes


def test_the_probe_context_holds_the_encoded_probes_and_the_tracked_ids(adapter, dm):
    measurement = prepare(adapter, dm, track_tokens=["is", "are"], top_k=7)
    ctx = measurement.ctx
    encoded = ProbeSet.coerce(dm.probes).encode(dm.tokenizer, objective="causal")
    assert ctx.encoded.ids == encoded.ids and torch.equal(ctx.encoded.input_ids,
                                                          encoded.input_ids)
    assert (ctx.objective, ctx.num_layers, ctx.top_k, ctx.owner) == ("causal", 2, 7, "Who")
    assert ctx.tied is adapter.tied is True
    assert ctx.protect.shape == encoded.input_ids.shape and ctx.protect.dtype == torch.bool
    assert len(ctx.token_strings) == len(dm.tokenizer)
    for word, token_id in ctx.track_ids.items():
        assert dm.tokenizer.decode([token_id]).strip() == word
    assert sorted(ctx.track_ids) == ["are", "is"]
    assert (measurement.mode, measurement.rank, measurement.world) == ("single", 0, 1)


def test_the_gradient_reference_of_alignment_runs_only_where_it_can(adapter, dm):
    assert prepare(adapter, dm, faithfulness_every=2).alignment_methods == (
        "input_x_gradient", "saliency")
    assert prepare(adapter, dm, faithfulness_every=None).alignment_methods == ()
    assert prepare(adapter, dm, alignment_methods=None).alignment_methods == ()
    assert prepare(adapter, dm, mode="collective").alignment_methods == ()  # under FSDP2
    no_cues = [{"text": p.text, "target": p.target, "id": p.id} for p in dm.probes]
    assert prepare(adapter, dm, probes=no_cues).alignment_methods == ()
    assert prepare(adapter, dm, faithfulness_every=None).replacement is None


# --------------------------------------------------------------------------- snapshots


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_preserved_rng_restores_every_stream_also_after_an_error():
    seed_all(1)
    expected = draws()
    seed_all(1)
    with preserved_rng():
        draws()
        draws()
    assert draws() == expected
    seed_all(2)
    expected = draws()
    seed_all(2)
    with pytest.raises(ZeroDivisionError), preserved_rng():
        draws()
        1 / 0  # noqa: B018
    assert draws() == expected


def test_a_snapshot_measures_every_probe_and_a_failure_becomes_its_error(measurement, dm):
    torch.manual_seed(3)
    expected = torch.rand(2)
    torch.manual_seed(3)
    snap = measurement.take(7, final=True, faith_due=False)
    assert torch.equal(torch.rand(2), expected)  # the training run's stream is untouched
    assert (snap.step, snap.final, snap.error, snap.faithfulness) == (7, True, None, None)
    assert snap.attribution.scores.shape == measurement.ctx.encoded.input_ids.shape
    assert snap.attribution.layers == (0, 1, 2)
    assert snap.norms.shape == (len(dm.tokenizer),)
    torch.testing.assert_close(snap.norms, measurement.adapter.embedding.weight.norm(dim=1))

    class Failing:
        def __enter__(self):
            raise RuntimeError("autocast broke")

        def __exit__(self, *exc):
            return False

    broken = measurement.with_model(measurement.adapter)
    broken.forward_context = Failing
    torch.manual_seed(3)
    failed = broken.take(8, final=False, faith_due=False)
    assert failed.error == "RuntimeError: autocast broke" and failed.attribution is None
    assert torch.equal(torch.rand(2), expected)
    assert measurement.forward_context is not Failing  # with_model copied, not shared


@pytest.mark.parametrize("n", [0, 1, 4, 7])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shares_are_contiguous_cover_every_item_once_and_differ_by_at_most_one(n, world):
    parts = [share(n, rank, world) for rank in range(world)]
    assert [i for part in parts for i in part] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(part == list(range(part[0], part[0] + len(part))) for part in parts if part)


def test_shares_measured_apart_merge_into_the_single_process_attribution(measurement):
    n = len(measurement.ctx.encoded)
    whole = measurement.attribute(range(n))
    world = 3
    sent = []
    for rank in range(world):
        rows = share(n, rank, world)
        table = [f"faithfulness of rank {rank}"]
        sent.append((rows, measurement.attribute(rows) if rows else None, table))
    sent.append(([], None, None))  # a rank with no probe (more ranks than probes)
    merged, tables = merge_shares(sent[::-1], due=True)  # ranks in any order: probe order back
    for name in ("scores", "logat", "norms", "positions", "targets", "layer_scores",
                 "prediction_depth"):
        torch.testing.assert_close(getattr(merged, name), getattr(whole, name), equal_nan=True,
                                   msg=name)
    assert merged.layers == whole.layers and merged.kind == whole.kind
    assert sorted(tables) == [f"faithfulness of rank {r}" for r in range(world)]
    assert merge_shares(sent, due=False)[1] is None
    failed = RuntimeError("rank 2: OSError: disk")
    with pytest.raises(RuntimeError, match="rank 2: OSError: disk"):
        merge_shares([sent[0], failed], due=False)


def test_a_model_is_measured_in_eval_mode_and_left_in_its_own(adapter, dm):
    module: nn.Module = adapter.module
    module.train()
    prepare(adapter, dm).take(0, final=False, faith_due=False)
    assert module.training and all(m.training for m in module.modules())
