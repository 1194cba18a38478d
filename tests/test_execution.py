"""`execution.Execution`: the writer and the pipeline of one engine, and what comes back.

Checks, with the writer in this process (``writer="thread"``), that the writer starts at
its first use and once, that a resume's restored state reaches it whenever it starts,
that submitted snapshots are written in order behind the pipeline and their results kept
(last metrics, the norms and scores the next snapshot compares with, every missing step
and why, also a job that raised), that the end-of-training warning lists every missing
step, and that close stops everything. Also `missing_summary` and `weights_for_helper`.
(The helper process, its death and a stuck pipeline are tested in test_pipeline.py and
test_faults.py.)
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from normx_callbacks import Settings
from normx_callbacks.execution import Execution, missing_summary, weights_for_helper
from normx_callbacks.loading import load_run
from normx_callbacks.snapshot import Snapshot
from normx_callbacks.store import SnapshotStore
from normx_callbacks.writer import SnapshotWriter


@pytest.fixture(scope="module")
def measured(measurement, dm):
    snap = measurement.take(0, final=False, faith_due=False)
    snap.counts = torch.zeros(len(dm.tokenizer), dtype=torch.long)
    return snap


@pytest.fixture
def execution(measurement):
    execution = Execution(Settings(writer="thread", faithfulness_every=None, media_probes=0),
                          owner="Who")
    execution.start(measurement.ctx, [], measurement.adapter, "single", True, None, (),
                    {"model": "tiny"})
    yield execution
    execution.close()


def test_the_writer_starts_at_its_first_use_once(execution):
    assert execution.writer is None and execution.helper is None  # prepared, not started
    assert execution.pipeline is not None
    execution.ensure()
    writer = execution.writer
    assert isinstance(writer, SnapshotWriter) and writer.owner == "Who"
    execution.ensure()
    assert execution.writer is writer and not execution.offload_faithfulness


def test_a_restored_state_reaches_the_writer_whenever_it_starts(execution, measured):
    latest = {"prev_norms": measured.norms, "prev_scores": measured.attribution.scores}
    execution.set_latest(latest)  # before the writer exists: sent when it starts
    execution.ensure()
    assert execution.writer.builder.prev_norms is measured.norms
    later = {"prev_norms": measured.norms * 2, "prev_scores": None}
    execution.set_latest(later)  # the writer exists: sent at once
    assert torch.equal(execution.writer.builder.prev_norms, measured.norms * 2)
    assert execution.writer.builder.prev_scores is None


def test_submitted_snapshots_are_written_in_order_and_their_results_kept(
        execution, measured, tmp_path, caplog):
    execution.use_store(SnapshotStore(tmp_path))
    for step in (0, 1, 2):
        error = "rank 1: OOM" if step == 1 else None
        snap = (dataclasses.replace(measured, step=step) if error is None
                else Snapshot(step, False, error=error))
        execution.submit(snap)
    execution.flush()
    run = load_run(tmp_path)
    assert run.steps == [0, 2] and run.meta["run_meta"] == {"model": "tiny"}
    assert execution.failed_steps == {1: "rank 1: OOM"}
    assert execution.held == set()
    assert execution.last_metrics == pytest.approx(
        run.metrics[run.metrics.step == 2].set_index("key")["value"].to_dict(), rel=1e-12,
        nan_ok=True)
    assert execution.last_metrics["embedding/drift"] == 0.0  # the second snapshot's: 2, not 0
    assert execution.last_attribution is measured.attribution
    assert execution.latest["prev_norms"] is measured.norms
    with caplog.at_level(logging.WARNING, logger="normx_callbacks"):
        execution.finish([0, 2])
    assert (f"Who: 1 of 3 snapshots are missing: step 1 (rank 1: OOM); {tmp_path}'s missing "
            "table records them") in caplog.text
    execution.close()
    assert execution.pipeline is None and execution.writer is None
    execution.close()  # twice: nothing left to stop


def test_a_job_that_raises_is_recorded_as_missing_and_the_next_one_runs(
        execution, measured, tmp_path, monkeypatch):
    execution.use_store(SnapshotStore(tmp_path))
    process = execution.writer.process

    def fails_at_one(snap):
        if snap.step == 1:
            raise RuntimeError("the writer broke")
        return process(snap)

    monkeypatch.setattr(execution.writer, "process", fails_at_one)
    for step in (1, 2):
        execution.submit(dataclasses.replace(measured, step=step))
    execution.flush()
    assert execution.failed_steps == {1: "RuntimeError: the writer broke"}
    run = load_run(tmp_path)
    assert run.steps == [2]
    assert run.missing[["step", "reason"]].values.tolist() == [
        [1, "RuntimeError: the writer broke"]]


def test_missing_summary_lists_at_most_ten_steps_in_order():
    assert missing_summary({3: "b", 1: "a"}) == "step 1 (a); step 3 (b)"
    text = missing_summary({s: "x" for s in range(12, 0, -1)})
    assert text.startswith("step 1 (x); step 2 (x);") and text.endswith(
        "step 10 (x); and 2 more")
    assert missing_summary({1: "a", 2: "b", 3: "c"}, most=2) == "step 1 (a); step 2 (b); and 1 more"


def test_weights_for_the_helper_are_a_detached_cpu_copy_of_the_model_state(measurement):
    module = measurement.adapter.module
    weights = weights_for_helper(module)
    state = module.state_dict()
    assert list(weights) == list(state)
    for name, tensor in weights.items():
        assert torch.equal(tensor, state[name]) and tensor.device.type == "cpu", name
        assert not tensor.requires_grad
        assert tensor.untyped_storage().data_ptr() != state[name].untyped_storage().data_ptr()
