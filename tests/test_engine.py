"""`engine.Engine`: probes in, snapshots out, with no Trainer in it (what every driver runs).

Checks the engine before it is prepared (its schedule, empty results, no probes refused
by name), then the whole composition on the demo GPT-2 with the writer in this process:
`prepare` records what the run measures, `open_run` claims a store with a run record,
`count` / `snapshot` / `flush` write each due step with the tokens counted before it, the
results are read through the engine, and `state_dict` / `load_state_dict` let a second
engine go on in the first one's store with its counts, its steps and the previous
snapshot to compare with. Also `use_model` refusing another model shape.
"""

from __future__ import annotations

import pytest
import torch
from training import counts_at, make_model

from normx_callbacks import Settings
from normx_callbacks.discovery import find_model
from normx_callbacks.engine import Engine
from normx_callbacks.loading import load_run
from normx_callbacks.store import read_run_record

SETTINGS = dict(every_n_steps=4, writer="thread", faithfulness_every=None, media_probes=0)


@pytest.fixture
def engines():
    made = []

    def make(probes, **changes) -> Engine:
        made.append(Engine(probes, Settings(**{**SETTINGS, **changes}), owner="Who"))
        return made[-1]

    yield make
    for engine in made:
        engine.close()


def real_tokens(batch) -> torch.Tensor:
    return batch["input_ids"][batch["attention_mask"].bool()]


def test_an_engine_before_prepare_has_its_schedule_and_no_results(dm, engines):
    engine = engines(dm.probes)
    assert not engine.prepared and engine.ctx is None and engine.store is None
    assert engine.last_metrics == {} and engine.last_attribution is None
    assert engine.failed_steps == {} and engine.held_steps == [] and engine.helper_pid is None
    assert [s for s in range(13) if engine.due(s)] == [0, 1, 2, 4, 8, 12]
    assert len(engine.probes) == len(dm.probes) and engine.owner == "Who"
    assert Engine().settings == Settings()  # every option's default
    with pytest.raises(RuntimeError, match=r"^Who has no probes: pass probes=\[\.\.\.\]"):
        engines(None).prepare(find_model(make_model(dm)), dm.tokenizer)


def test_prepare_snapshot_and_resume_through_the_engine(dm, engines, tmp_path):
    model = make_model(dm)
    engine = engines(dm.probes)
    engine.prepare(find_model(model), dm.tokenizer)
    assert engine.prepared and engine.ctx.num_layers == 2
    assert engine.run_meta == {
        "objective": "causal", "embedding_frozen": False, "norm": "layer0", "layers": "all",
        "model": "GPT2LMHeadModel", "num_layers": 2, "vocab_size": len(dm.tokenizer),
        "tied_embeddings": True, "probes": len(dm.probes)}

    root = tmp_path / "first" / "normx"
    engine.open_run(root, restored=None)
    assert engine.store.root == root and read_run_record(root) == engine.run
    batches = iter(dm.train_dataloader())
    first, second = next(batches), next(batches)
    engine.snapshot(0)  # before any batch, as at train start
    engine.count(first)
    engine.count(second)
    engine.snapshot(1, final=True)
    engine.flush()
    assert engine.snapshot_steps == [0, 1] and engine.helper_pid is None  # writer="thread"
    run = load_run(root)
    assert run.steps == [0, 1] and run.meta["run_meta"]["model"] == "GPT2LMHeadModel"
    expected = torch.bincount(torch.cat([real_tokens(first), real_tokens(second)]),
                              minlength=len(dm.tokenizer))
    assert int(counts_at(run, 0).sum()) == 0
    assert torch.equal(counts_at(run, 1), expected)
    stored = run.metrics[run.metrics.step == 1].set_index("key")["value"]
    assert engine.last_metrics["probe/target_prob"] == pytest.approx(
        stored["probe/target_prob"], rel=1e-12)
    assert engine.last_attribution.scores.shape == engine.ctx.encoded.input_ids.shape

    state = engine.state_dict()
    assert state["snapshot_steps"] == [0, 1]
    assert (state["run_id"], state["store"]) == (engine.run["run_id"], str(root.resolve()))
    assert torch.equal(state["prev_norms"], model.model.get_input_embeddings().weight.norm(dim=1))

    # A second engine (a resumed process) goes on in the first one's store.
    resumed = engines(dm.probes)
    resumed.prepare(find_model(model), dm.tokenizer)
    resumed.load_state_dict(state)
    resumed.open_run(tmp_path / "second" / "normx", restored={"run_id": state["run_id"],
                                                              "store": state["store"]})
    assert resumed.store.root == root and resumed.run["run_id"] == engine.run["run_id"]
    assert not (tmp_path / "second").exists()
    resumed.count(second)
    resumed.snapshot(2)
    resumed.flush()
    assert resumed.snapshot_steps == [0, 1, 2]
    run = load_run(root)
    assert run.steps == [0, 1, 2]
    assert torch.equal(counts_at(run, 2), expected + torch.bincount(
        real_tokens(second), minlength=len(dm.tokenizer)))
    # The restored previous snapshot: the same weights, so nothing moved.
    assert resumed.last_metrics["stability/spearman"] == 1.0
    assert resumed.last_metrics["embedding/drift"] == 0.0


def test_another_model_shape_is_refused_and_a_released_model_is_dropped(dm, engines):
    engine = engines(dm.probes)
    engine.prepare(find_model(make_model(dm)), dm.tokenizer)
    same_shape = find_model(make_model(dm))
    engine.use_model(same_shape)
    assert engine.adapter is same_shape and engine.measurement.adapter is same_shape
    deeper = find_model(make_model(dm, n_layers=3))
    with pytest.raises(ValueError, match=r"another model shape \(kind, layers, vocabulary, tied, "
                                         r"mask, context: \('causal', 3, "):
        engine.use_model(deeper)
    assert engine.adapter is same_shape
    wider = find_model(make_model(dm, d_model=48))
    engine.use_model(wider)  # the width is not part of the shape the probes were encoded for
    assert engine.adapter is wider
    engine.release_model()
    assert engine.adapter is None and engine.measurement.adapter is None
