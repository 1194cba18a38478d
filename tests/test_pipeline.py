"""The pipeline: bounded, ordered, never dropping, never losing an error, and flushed
whenever what is written must be complete (checkpoint saves, train end, exceptions)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pandas as pd
import pytest
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from training import fit, make_model

from normx_callbacks import NormXLogitCallback, load_run
from normx_callbacks import pipeline as pipeline_module
from normx_callbacks.pipeline import Pipeline


def test_jobs_run_in_order_and_a_full_queue_makes_the_caller_wait(caplog, monkeypatch):
    monkeypatch.setattr(pipeline_module, "WARN_AFTER_SECONDS", 0.05)
    done: list[int] = []
    gate = threading.Event()

    def job(i: int) -> None:
        gate.wait()
        done.append(i)

    pipe = Pipeline(lambda name, error: None, max_pending=2)
    for i in range(3):  # one running (blocked on the gate), two waiting: full
        pipe.submit(i, job, i)
    threading.Timer(0.2, gate.set).start()
    start = time.perf_counter()
    pipe.submit(3, job, 3)  # blocks until the worker takes the next job
    assert time.perf_counter() - start >= 0.15
    pipe.close()
    assert done == [0, 1, 2, 3]  # nothing dropped, in submission order
    assert pipe.waited_seconds >= 0.15
    [warning] = [r.getMessage() for r in caplog.records if "snapshots behind" in r.getMessage()]
    assert "never drops a snapshot" in warning


def test_a_failing_job_reaches_the_handler_and_the_next_jobs_still_run():
    handled: list[tuple[object, str]] = []
    done: list[int] = []

    def job(i: int) -> None:
        if i == 1:
            raise ValueError("a table Parquet cannot hold")
        done.append(i)

    pipe = Pipeline(lambda name, error: handled.append((name, str(error))))
    for i in range(3):
        pipe.submit(i, job, i)
    pipe.flush()
    assert done == [0, 2]
    assert handled == [(1, "a table Parquet cannot hold")]
    assert pipe.failures == [(1, "ValueError: a table Parquet cannot hold")]
    pipe.close()
    with pytest.raises(RuntimeError, match="closed"):
        pipe.submit(4, job, 4)


class SlowLogger(Logger):
    """A real Logger whose every call takes `delay` seconds: the worker falls behind."""

    def __init__(self, delay: float):
        super().__init__()
        self.delay = delay
        self.steps: list[int] = []

    name = property(lambda self: "slow")
    version = property(lambda self: 0)

    def log_metrics(self, metrics, step=None):
        time.sleep(self.delay)
        if any(k.startswith("normx/") for k in metrics):
            self.steps.append(step)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class StoreAtCheckpoint(Callback):
    """Listed after the normx callback: reads the store whenever a checkpoint is saved."""

    def __init__(self, store, normx: NormXLogitCallback):
        self.store, self.normx = store, normx
        self.seen: dict[int, tuple[list[int], list[int]]] = {}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        taken = [s for s in self.normx.snapshot_steps if s <= trainer.global_step]
        self.seen[trainer.global_step] = (taken, load_run(self.store).steps)


def test_a_checkpoint_is_never_ahead_of_the_snapshots_before_it(dm, tmp_path):
    store = tmp_path / "store"
    callback = NormXLogitCallback(dm.probes, schedule="interval", every_n_steps=1,
                                  media_probes=0, faithfulness_every=None, store_dir=store)
    checker = StoreAtCheckpoint(store, callback)
    logger = SlowLogger(0.15)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    fit(make_model(dm), dm, tmp_path, [callback, saver, checker], max_steps=6, logger=logger)
    assert sorted(checker.seen) == [3, 6]
    for step, (taken, stored) in checker.seen.items():
        assert taken == list(range(step + 1)) and stored == taken, step
    assert logger.steps == list(range(7))  # every snapshot logged, in step order


class FailsAt(Callback):
    def __init__(self, step: int, normx: NormXLogitCallback):
        self.step, self.normx = step, normx
        self.worker_thread: threading.Thread | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.worker_thread = self.normx.engine.execution.pipeline.thread
            raise RuntimeError("the training run's own error")


def test_an_exception_in_training_still_writes_every_snapshot_taken(dm, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    store = tmp_path / "store"
    callback = NormXLogitCallback(dm.probes, schedule="interval", every_n_steps=1,
                                  media_probes=0, faithfulness_every=None, store_dir=store)
    logger = SlowLogger(0.1)
    with pytest.raises(RuntimeError, match="the training run's own error"):
        # Listed after the normx callback: the snapshot at step 4 is taken, then training dies.
        fails = FailsAt(4, callback)
        fit(make_model(dm), dm, tmp_path, [callback, fails], max_steps=10, logger=logger)
    run = load_run(store)
    assert run.steps == callback.snapshot_steps == [0, 1, 2, 3, 4] and run.missing.empty
    assert logger.steps == [0, 1, 2, 3, 4]
    assert callback.engine.execution.pipeline is None  # the pipeline was stopped
    assert not fails.worker_thread.is_alive()


class KillsHelper(Callback):
    """SIGKILLs the snapshot helper process right after the snapshot at `step` is handed
    to it (listed after the normx callback)."""

    def __init__(self, step: int, normx: NormXLogitCallback):
        self.step, self.normx = step, normx
        self.killed: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            pid = self.normx.engine.helper_pid
            os.kill(pid, signal.SIGKILL)
            self.killed = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_a_killed_helper_process_loses_nothing_and_numbers_stay_the_same(dm, tmp_path, caplog):
    """The helper dies at step 4 (perhaps mid-snapshot): the worker builds that snapshot and
    the rest in the training process, faithfulness included, with one warning; the store
    equals a run that never had a helper."""
    caplog.set_level(logging.WARNING, logger="normx_callbacks")
    settings = dict(every_n_steps=4, media_probes=0, faithfulness_every=2)
    alone = NormXLogitCallback(dm.probes, store_dir=tmp_path / "thread", writer="thread",
                               **settings)
    fit(make_model(dm), dm, tmp_path, [alone], max_steps=10)

    callback = NormXLogitCallback(dm.probes, store_dir=tmp_path / "helper", **settings)
    killer = KillsHelper(4, callback)
    fit(make_model(dm), dm, tmp_path, [callback, killer], max_steps=10)
    assert killer.killed == -signal.SIGKILL
    run, reference = load_run(tmp_path / "helper"), load_run(tmp_path / "thread")
    assert run.steps == reference.steps == [0, 1, 2, 4, 8, 10] and run.missing.empty
    for table in ("tokens", "probes", "embedding", "faithfulness"):
        pd.testing.assert_frame_equal(run[table].drop(columns=["seconds"], errors="ignore"),
                                      reference[table].drop(columns=["seconds"],
                                                            errors="ignore"), obj=table)
    timed = run.metrics.key.str.contains("seconds")
    pd.testing.assert_frame_equal(run.metrics[~timed].reset_index(drop=True),
                                  reference.metrics[~reference.metrics.key.str.contains(
                                      "seconds")].reset_index(drop=True))
    [warning] = [r.getMessage() for r in caplog.records if "helper process is gone" in
                 r.getMessage()]
    assert "built in this process from now on" in warning


def test_tensors_reach_the_helper_with_their_dtype_shape_and_values():
    """Plain CPU tensors cross the pipe as NumPy arrays; every other kind the usual way."""
    import pickle

    import torch

    from normx_callbacks.helper import dumps

    g = torch.Generator().manual_seed(0)
    grid = torch.randn(4, 6, generator=g)
    grid[1, 2] = float("nan")
    shared = torch.arange(5)
    sent = {
        "grid": grid, "view": grid.t()[1:, ::2], "scalar": torch.tensor(3.5),
        "half": grid.half(), "bf16": grid.bfloat16(), "ids": torch.arange(7),
        "mask": grid > 0, "bytes": torch.arange(4, dtype=torch.uint8),
        "param": torch.nn.Parameter(grid.clone()), "empty": torch.zeros(0, 3),
        "shared": [shared, shared],
    }
    back = pickle.loads(dumps(sent))
    for key in sent:
        if key == "shared":
            continue
        assert type(back[key]) is type(sent[key]), key
        assert back[key].dtype == sent[key].dtype and back[key].shape == sent[key].shape, key
        torch.testing.assert_close(back[key], sent[key], rtol=0, atol=0, equal_nan=True)
    assert back["shared"][0] is back["shared"][1]  # one object stays one object
    assert len(dumps(grid)) < len(pickle.dumps(grid, pickle.HIGHEST_PROTOCOL))
