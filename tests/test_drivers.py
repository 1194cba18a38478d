"""`drivers`: what every driver (the Lightning callback, the Fabric / plain-loop monitor)
does the same way, on top of the engine.

Checks `DriverCore.maybe_snapshot` (once per step whatever calls it, only due steps
unless forced; a due last step, or a forced one, is final), `start_run` (a checkpoint's
run continued once, the snapshots after it re-taken), `read_model` (the model found, or
the user's adapter checked against its model), the resume state round trip through
`state_dict` / `load_state_dict` on a real engine (and a checkpoint written before runs
had an id), and `rank_and_world`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from training import make_model

from normx_callbacks import Settings
from normx_callbacks.drivers import DriverCore, rank_and_world
from normx_callbacks.engine import Engine


class StubEngine:
    """Records what the driver asks of the engine."""

    owner = "Stub"

    def __init__(self, due=()):
        self.due_steps = set(due)
        self.calls: list[tuple] = []

    def due(self, step):
        return step in self.due_steps

    def snapshot(self, step, *, final=False):
        self.calls.append(("snapshot", step, final))

    def open_run(self, root, *, restored, loggers, going_on):
        self.calls.append(("open_run", root, restored, going_on))

    def truncate_after(self, step):
        self.calls.append(("truncate_after", step))

    def load_state_dict(self, state):
        self.calls.append(("load_state_dict", state))


def test_a_step_gets_one_snapshot_when_due_and_the_last_step_is_final():
    engine = StubEngine(due={0, 2, 4})
    core = DriverCore(engine)
    assert core.who == "Stub" and core.last_step is None
    for step in (0, 0, 1, 2, 2, 3):  # gradient accumulation: several calls per step
        core.maybe_snapshot(step, max_steps=4)
    assert engine.calls == [("snapshot", 0, False), ("snapshot", 2, False)]
    core.maybe_snapshot(4, max_steps=4)  # due, and the run's last step: the final one
    core.maybe_snapshot(4, force=True)  # train end at the same step: already taken
    assert engine.calls[2:] == [("snapshot", 4, True)] and core.last_step == 4

    engine = StubEngine(due={0})
    core = DriverCore(engine)
    core.maybe_snapshot(5, max_steps=5)  # the last step, not scheduled: left to train end
    assert engine.calls == []
    core.maybe_snapshot(5, force=True)  # train end (also after an exception, max_epochs)
    assert engine.calls == [("snapshot", 5, True)]


def test_unlimited_max_steps_never_makes_a_snapshot_final():
    engine = StubEngine(due={4})
    core = DriverCore(engine)
    core.maybe_snapshot(4, max_steps=-1)  # Lightning's "no limit"
    core.maybe_snapshot(4, max_steps=None)
    assert engine.calls == [("snapshot", 4, False)]


def test_a_checkpoints_run_is_continued_once_and_the_snapshots_after_it_retaken(tmp_path):
    engine = StubEngine()
    core = DriverCore(engine)
    restored = {"run_id": "ab" * 16, "store": str(tmp_path)}
    core.restored = restored
    core.start_run(tmp_path, step=10, loggers=(), going_on=False)
    assert engine.calls == [("open_run", tmp_path, restored, False),
                            ("truncate_after", 10)]
    assert core.restored is None
    core.start_run(tmp_path, step=20, going_on=True)  # fitting on: nothing to truncate
    assert engine.calls[2:] == [("open_run", tmp_path, None, True)]


def test_read_model_finds_the_model_or_checks_the_users_adapter(dm):
    module = make_model(dm)
    core = DriverCore(StubEngine())
    found = core.read_model(module, None, None)
    assert found.module is module.model and found.num_layers == 2
    assert core.read_model(module, "model", None).module is module.model
    assert core.read_model(module, None, found) is found  # agrees with its model: kept
    torch.manual_seed(0)
    wrong = dataclasses.replace(found, head=nn.Linear(32, len(dm.tokenizer)), unembedding=None)
    with pytest.raises(RuntimeError, match=r"^Stub: the adapter disagrees with its model: the "
                                           r"head of GPT2LMHeadModel could not be reproduced"):
        core.read_model(module, None, wrong)


def test_the_resume_state_round_trips_through_a_checkpoint(dm, tmp_path):
    settings = Settings(every_n_steps=4, writer="thread", faithfulness_every=None,
                        media_probes=0)
    engine = Engine(dm.probes, settings, owner="Who")
    fresh = Engine(dm.probes, settings, owner="Who")
    try:
        core = DriverCore(engine)
        engine.prepare(core.read_model(make_model(dm), None, None), dm.tokenizer)
        core.start_run(tmp_path / "normx", step=0, going_on=False)
        engine.count(next(iter(dm.train_dataloader())))
        for step in (0, 1, 2, 3, 4):
            core.maybe_snapshot(step, max_steps=4)
        state = core.state_dict()
        assert state["last_step"] == 4 and state["snapshot_steps"] == [0, 1, 2, 4]
        assert state["run_id"] == engine.run["run_id"]

        again = DriverCore(fresh)
        again.load_state_dict(state)
        assert again.last_step == 4 and fresh.snapshot_steps == [0, 1, 2, 4]
        assert again.restored == {"run_id": state["run_id"], "store": state["store"]}
        assert torch.equal(fresh.counter.counts, engine.counter.counts)
        assert fresh.counter.counts.sum() > 0
        assert fresh.execution.latest["prev_norms"] is state["prev_norms"]
        again.maybe_snapshot(4, force=True)  # the checkpoint's step is not taken twice
        assert fresh.snapshot_steps == [0, 1, 2, 4]
    finally:
        engine.close()
        fresh.close()

    # A checkpoint written before runs had an id: restored, with no run to continue.
    old = DriverCore(StubEngine())
    old.load_state_dict({"last_step": 8, "snapshot_steps": [0, 8]})
    assert old.last_step == 8 and old.restored == {"run_id": None, "store": None}
    assert old.engine.calls == [("load_state_dict", {"last_step": 8, "snapshot_steps": [0, 8]})]


def test_rank_and_world_read_the_process_group(monkeypatch):
    assert rank_and_world() == (0, 1)  # no process group
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    assert rank_and_world() == (2, 4)
