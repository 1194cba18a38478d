"""`writer.SnapshotWriter`: what a measured snapshot becomes (metrics, the store's tables,
the loggers' media), and what happens when the store refuses a write.

Checks that a snapshot is built and written as one committed step whose metrics are the
ones it reports, with media only when loggers take them; that a snapshot measured with an
error, or whose tables Parquet cannot hold, is recorded as missing; that a write refused
with an OSError is held in memory, recorded as missing meanwhile and written before the
next snapshot (its record removed), that at most `MAX_UNWRITTEN` are held and the last
chance gives up on the rest, each step given up on reported in `Written.lost`; that a
missing record the store refuses is written at the next chance; and that a figure that
cannot be drawn costs the media, not the snapshot. Runs in this process (the helper
process runs the same object, see test_pipeline.py).
"""

from __future__ import annotations

import dataclasses
import errno
import logging

import pandas as pd
import pytest
import torch

from normx_callbacks.loading import load_run
from normx_callbacks.snapshot import Snapshot
from normx_callbacks.writer import MAX_UNWRITTEN, SnapshotWriter, Written


@pytest.fixture(scope="module")
def measured(measurement, dm):
    """One measured snapshot; each test gives copies of it the steps it needs."""
    snap = measurement.take(0, final=False, faith_due=False)
    snap.counts = torch.arange(len(dm.tokenizer), dtype=torch.long)
    return snap


def at(snap, step: int, **changes):
    return dataclasses.replace(snap, step=step, **changes)


def new_writer(measurement, root=None, *, has_loggers=False, media_probes=1) -> SnapshotWriter:
    writer = SnapshotWriter(measurement.ctx, owner="Who", media_probes=media_probes,
                            history_length=4, takes_images=False, has_loggers=has_loggers)
    if root is not None:
        writer.use_store(str(root), {"model": "tiny"})
    return writer


class Disk:
    """Makes a store's write (or mark_missing) raise ENOSPC while ``full``."""

    def __init__(self, store, method="write"):
        self.full, self.calls = True, []
        self.original = getattr(store, method)
        setattr(store, method, self)

    def __call__(self, step, *args):
        self.calls.append(step)
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.original(step, *args)


def test_a_snapshot_is_written_as_one_step_with_the_metrics_it_reports(measurement, measured,
                                                                      tmp_path):
    writer = new_writer(measurement, tmp_path, has_loggers=True)
    written = writer.process(at(measured, 3))
    assert isinstance(written, Written)
    assert (written.step, written.failed, written.held, written.lost) == (3, None, [], {})
    assert written.metrics["snapshot/worker_seconds"] >= 0
    run = load_run(tmp_path)
    assert run.steps == [3] and run.meta["run_meta"] == {"model": "tiny"}
    assert {"metrics", "tokens", "probes", "embedding"} <= set(run.tables)
    stored = run.metrics.set_index("key")["value"]
    for key in ("probe/target_prob", "embedding/mean", "alignment/ap"):
        assert stored[key] == pytest.approx(written.metrics[key], rel=1e-12), key
    kinds = {(kind, tag) for kind, tag, _ in written.media}
    assert ("scalars", None) in kinds and ("histogram", "normx/embedding/norms") in kinds
    probe = measurement.ctx.encoded.ids[0]
    assert ("table", f"normx/tokens/{probe}") in kinds  # media_probes=1: the first probe only
    assert not any(measurement.ctx.encoded.ids[1] in str(tag) for _, tag in kinds)
    scalars = next(data for kind, _, data in written.media if kind == "scalars")
    assert scalars["normx/probe/target_prob"] == written.metrics["probe/target_prob"]
    # Without loggers (a replay) nothing is prepared for them.
    assert new_writer(measurement, tmp_path / "quiet").process(at(measured, 0)).media == []


def test_the_state_before_gives_the_first_snapshot_its_drift_and_stability(measurement,
                                                                          measured):
    fresh = new_writer(measurement).process(at(measured, 0)).metrics
    assert "embedding/drift" not in fresh and "stability/spearman" not in fresh
    resumed = new_writer(measurement)
    resumed.set_state({"prev_norms": measured.norms, "prev_scores": measured.attribution.scores})
    metrics = resumed.process(at(measured, 8)).metrics
    assert metrics["embedding/drift"] == 0.0 and metrics["stability/spearman"] == 1.0


def test_a_snapshot_measured_with_an_error_is_recorded_as_missing(measurement, tmp_path,
                                                                  caplog):
    writer = new_writer(measurement, tmp_path)
    with caplog.at_level(logging.WARNING, logger="normx_callbacks"):
        written = writer.process(Snapshot(5, False, error="rank 1: OOM"))
    assert (written.failed, written.lost, written.metrics) == ("rank 1: OOM", {5: "rank 1: OOM"},
                                                               {})
    run = load_run(tmp_path)
    assert run.steps == [] and run.missing[["step", "reason"]].values.tolist() == [
        [5, "rank 1: OOM"]]
    assert "Who: snapshot at step 5 failed (rank 1: OOM); recorded as missing" in caplog.text


def test_tables_parquet_cannot_hold_are_recorded_missing_not_retried(measurement, measured,
                                                                     tmp_path, monkeypatch):
    writer = new_writer(measurement, tmp_path)
    original = writer.builder.build

    def with_bad_table(snap):
        built = original(snap)
        built.tables["odd"] = pd.DataFrame({"x": [object()]})
        return built

    monkeypatch.setattr(writer.builder, "build", with_bad_table)
    written = writer.process(at(measured, 2))
    assert written.held == [] and writer.unwritten == {}  # a retry would fail alike
    assert written.failed.startswith("cannot be stored: table 'odd' cannot be stored as Parquet")
    run = load_run(tmp_path)
    assert run.steps == [] and run.missing.set_index("step")["reason"][2] == written.failed


def test_a_refused_write_is_held_recorded_and_written_before_the_next_snapshot(
        measurement, measured, tmp_path, caplog):
    writer = new_writer(measurement, tmp_path)
    disk = Disk(writer.store)
    with caplog.at_level(logging.WARNING, logger="normx_callbacks"):
        held = writer.process(at(measured, 1))
    assert (held.failed, held.held, held.lost) == (None, [1], {})
    assert held.metrics  # built, just not written yet
    run = load_run(tmp_path)
    assert run.steps == []
    assert run.missing.set_index("step")["reason"][1].startswith(
        "write failed: [Errno 28] No space left on device; kept in memory for a retry")
    assert "could not write snapshot 1" in caplog.text and "training continues" in caplog.text

    disk.full = False
    after = writer.process(at(measured, 2))
    assert (after.held, after.lost, disk.calls) == ([], {}, [1, 1, 2])
    run = load_run(tmp_path)
    assert run.steps == [1, 2] and run.missing.empty  # the record went with the write


def test_at_most_a_few_writes_are_held_and_the_last_chance_gives_up_on_the_rest(
        measurement, measured, tmp_path):
    writer = new_writer(measurement, tmp_path)
    Disk(writer.store)
    lost: dict[int, str] = {}
    for step in range(MAX_UNWRITTEN + 2):
        written = writer.process(at(measured, step))
        lost.update(written.lost)
        assert written.held == list(range(max(0, step + 1 - MAX_UNWRITTEN), step + 1))
    assert sorted(lost) == [0, 1]  # the oldest, given up on to bound memory
    final = writer.retry(last_chance=True)
    assert final.step == -1 and final.held == [] and sorted(final.lost) == [2, 3, 4]
    lost.update(final.lost)
    reasons = load_run(tmp_path).missing.set_index("step")["reason"]
    assert sorted(reasons.index) == list(range(MAX_UNWRITTEN + 2))
    assert all(r.startswith("write failed after retries: [Errno 28]") for r in reasons)
    assert all(lost[s] == reasons[s] for s in lost)


def test_a_missing_record_the_store_refuses_is_written_at_the_next_chance(
        measurement, measured, tmp_path, caplog):
    writer = new_writer(measurement, tmp_path)
    writer.process(at(measured, 0))  # the store exists
    disk = Disk(writer.store, "mark_missing")
    with caplog.at_level(logging.WARNING, logger="normx_callbacks"):
        writer.process(Snapshot(1, False, error="probe failed"))
        writer.process(Snapshot(2, False, error="probe failed again"))
    assert load_run(tmp_path).missing.empty
    assert writer.unrecorded == {1: "probe failed", 2: "probe failed again"}
    assert caplog.text.count("cannot record that snapshot 1 is missing") == 1  # warned once
    disk.full = False
    writer.process(at(measured, 3))
    assert writer.unrecorded == {}
    missing = load_run(tmp_path).missing
    assert missing[["step", "reason"]].values.tolist() == [[1, "probe failed"],
                                                           [2, "probe failed again"]]


def test_a_figure_that_cannot_be_drawn_costs_the_media_not_the_snapshot(
        measurement, measured, tmp_path, monkeypatch, caplog):
    writer = new_writer(measurement, tmp_path, has_loggers=True)

    def broken(*args, **kwargs):
        raise ValueError("cannot draw")

    monkeypatch.setattr(writer.media, "payload", broken)
    with caplog.at_level(logging.WARNING, logger="normx_callbacks"):
        written = writer.process(at(measured, 4))
    assert written.failed is None and load_run(tmp_path).steps == [4]
    [(kind, tag, data)] = written.media
    assert kind == "scalars" and tag is None
    assert data == {f"normx/{k}": v for k, v in written.metrics.items()}
    assert "the media of the snapshot at step 4 failed (ValueError: cannot draw)" in caplog.text
