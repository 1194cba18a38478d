"""Faults a long training job meets, with the default snapshot helper process: a helper that
is stopped (SIGSTOP) or otherwise stuck, two runs started together with one `store_dir`, and a
disk that fills up. Training is never disturbed and no snapshot is lost without a record."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from launch import ROOT
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from training import fit, make_model

from normx_callbacks import NormXLogitCallback, load_run
from normx_callbacks.helper import STOPPED_SECONDS, HelperProcess
from normx_callbacks.loading import load_store


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


class StopHelper(Callback):
    """SIGSTOPs the snapshot helper after optimizer step ``step`` (a debugger, a job
    scheduler or a user's `kill -STOP` would)."""

    def __init__(self, step: int, callback: NormXLogitCallback):
        self.step, self.callback = step, callback
        self.stopped: int | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            self.stopped = self.callback.engine.helper_pid
            os.kill(self.stopped, signal.SIGSTOP)


def test_a_stopped_helper_never_freezes_training(dm, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="normx_callbacks")
    callback = NormXLogitCallback(dm.probes, every_n_steps=4, media_probes=0,
                                  faithfulness_every=2, store_dir=tmp_path / "store")
    stop = StopHelper(3, callback)
    start = time.monotonic()
    try:
        trainer = fit(make_model(dm), dm, tmp_path, [stop, callback], max_steps=10)
    finally:
        if stop.stopped is not None:  # never leave a stopped process behind a failed test
            try:
                os.kill(stop.stopped, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert trainer.global_step == 10
    assert time.monotonic() - start < 60  # one STOPPED_SECONDS wait, not forever
    # The helper was killed (and reaped); the snapshots it owed and the later ones were
    # built here.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{stop.stopped}").exists():
        time.sleep(0.05)
    assert not Path(f"/proc/{stop.stopped}").exists()
    assert callback.engine.helper_pid is None
    [warning] = [m for m in warnings_of(caplog) if "helper process" in m]
    assert f"(pid {stop.stopped}) was stopped for {STOPPED_SECONDS:.0f} s" in warning
    assert "was killed" in warning and "built in this process from now on" in warning
    run = load_run(tmp_path / "store")
    assert run.steps == callback.snapshot_steps == [0, 1, 2, 4, 8, 10]
    assert "missing" not in run and not callback.missing_steps
    assert sorted(run.faithfulness.step.unique()) == [0, 2, 8, 10]


RUN = """
import json, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from training import fit, make_model
from normx_callbacks import NormXLogitCallback
from normx_callbacks.demo import TextDataModule

seed, out, go = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
dm = TextDataModule(corpus="agreement", bpe_vocab_size=512, num_train=400, num_probes=4,
                    batch_size=16, cache_dir={cache!r})
dm.setup("fit")
model = make_model(dm, d_model=16 + 16 * seed)  # two different models
callback = NormXLogitCallback(dm.probes, every_n_steps=100, media_probes=0,
                              faithfulness_every=None, store_dir={store!r})
while not go.exists():  # both runs start their fit at the same moment
    pass
fit(model, dm, out.parent, [callback], max_steps=3)
out.write_text(json.dumps({{"store": str(callback.store.root), "run": callback.engine.run,
                           "mean": callback.last_metrics["embedding/mean"]}}))
"""


def test_two_runs_started_together_with_one_store_dir_get_two_stores(dm, cache_dir, tmp_path):
    store = tmp_path / "shared-store"
    script = tmp_path / "run.py"
    script.write_text(RUN.format(tests=str(Path(__file__).parent), cache=cache_dir,
                                 store=str(store)))
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, str(script), str(seed), str(tmp_path / f"{seed}"
                                                                          ".json"), str(go)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for seed in (0, 1)]
    time.sleep(0.5)
    go.touch()
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a run started beside another one hung")
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads((tmp_path / f"{seed}.json").read_text()) for seed in (0, 1)]
    roots = {r["store"] for r in results}
    assert len(roots) == 2 and str(store) in roots  # one took it, the other went beside
    for result in results:
        run = load_store(result["store"])
        assert run.run_record["run_id"] == result["run"]["run_id"]
        assert run.steps == [0, 1, 2, 3] and "missing" not in run
        last = run.metrics.query("step == 3 and key == 'embedding/mean'")["value"].item()
        assert last == pytest.approx(result["mean"], rel=1e-6)  # its own model's numbers
    assert results[0]["mean"] != pytest.approx(results[1]["mean"], rel=1e-3)


class FlagDisk:
    """`os.replace` that fails with a real ENOSPC OSError for files under ``root`` while the
    file ``flag`` exists: a full disk as every process sees it (the helper too)."""

    def __init__(self, root: Path, flag: Path):
        self.root, self.flag = str(root), flag
        self._replace = os.replace

    def __call__(self, src, dst, **kwargs):
        if self.flag.exists() and str(dst).startswith(self.root):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return self._replace(src, dst, **kwargs)


class FillDisk(Callback):
    """The disk is full for the snapshots at ``full_steps`` (listed before the callback; the
    engine is flushed first so each snapshot meets the disk as set)."""

    def __init__(self, flag: Path, full_steps, callback: NormXLogitCallback):
        self.flag, self.full_steps, self.callback = flag, set(full_steps), callback

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.callback.engine.flush()
        if trainer.global_step in self.full_steps:
            self.flag.touch()
        else:
            self.flag.unlink(missing_ok=True)


def _full_disk_run(dm, tmp_path, monkeypatch, full_steps):
    store, flag = tmp_path / "store", tmp_path / "disk-full"
    monkeypatch.setattr(os, "replace", FlagDisk(store, flag))
    HelperProcess.end_shared()  # the helper forked for this run inherits the full disk
    callback = NormXLogitCallback(dm.probes, every_n_steps=4, media_probes=0,
                                  faithfulness_every=None, store_dir=store)
    # Snapshots at 0, 1, 2, 4, 8, 12 and the final 13.
    trainer = fit(make_model(dm), dm, tmp_path, [FillDisk(flag, full_steps, callback), callback],
                  max_steps=13)
    HelperProcess.end_shared()  # later tests get a helper without the patch
    assert callback.engine.helper_pid is None or trainer.global_step == 13
    return trainer, callback, store


def test_a_full_disk_records_every_lost_step_once_it_has_room(dm, tmp_path, monkeypatch,
                                                              caplog):
    """Full from step 2 to 12: the 4th unwritten snapshot pushes step 2 out, whose record
    cannot be written then; at step 13 the disk has room: the held ones are written and the
    lost one is recorded, with its final reason."""
    caplog.set_level(logging.WARNING, logger="normx_callbacks")
    _, callback, store = _full_disk_run(dm, tmp_path, monkeypatch, full_steps=range(2, 13))
    run = load_run(store)
    assert run.steps == [0, 1, 4, 8, 12, 13]
    assert "missing" in run and run["missing"].step.tolist() == [2]
    assert "write failed after retries" in run.missing.reason.item()
    assert list(callback.missing_steps) == [2]
    [summary] = [m for m in warnings_of(caplog) if "snapshots are missing" in m]
    assert "1 of 7 snapshots are missing: step 2 (write failed after retries" in summary


def test_a_disk_that_stays_full_lists_every_lost_step_at_the_end(dm, tmp_path, monkeypatch,
                                                                 caplog):
    """Full from step 2 to the end: the store can record nothing; the callback, the final
    warning and the end-of-run message list every lost snapshot."""
    import train

    caplog.set_level(logging.WARNING, logger="normx_callbacks")
    trainer, callback, store = _full_disk_run(dm, tmp_path, monkeypatch, full_steps=range(2, 14))
    run = load_run(store)
    assert run.steps == [0, 1] and "missing" not in run
    assert sorted(callback.missing_steps) == [2, 4, 8, 12, 13]
    assert all("No space left on device" in r for r in callback.missing_steps.values())
    [summary] = [m for m in warnings_of(caplog) if "snapshots are missing" in m]
    assert "5 of 7 snapshots are missing: step 2 (write failed after retries" in summary
    message = train.end_of_run_message(trainer, str(tmp_path), [store],
                                       [callback.missing_steps])
    assert "MISSING: 5 of 7 snapshots: step 2 (write failed after retries" in message


class HangingLogger(CSVLogger):
    """A logger whose calls with our metrics never return (an upload on a dead network)."""

    def __init__(self, save_dir, release: threading.Event):
        super().__init__(save_dir)
        self.release = release

    def log_metrics(self, metrics, step=None):
        if any(k.startswith("normx/") for k in metrics):
            self.release.wait()
        super().log_metrics(metrics, step)


def test_a_logger_that_never_returns_does_not_hold_training(dm, tmp_path, caplog, monkeypatch):
    """The pipeline thread is stuck in a logger call: training stops waiting for it after the
    deadline (one warning naming where it is), finishes, and the snapshots it never wrote
    are listed as missing; the store has the first one (written before the logger call)."""
    from normx_callbacks import pipeline

    monkeypatch.setattr(pipeline, "STALLED_SECONDS", 2.0)  # the module's deadline, shortened
    caplog.set_level(logging.WARNING, logger="normx_callbacks")
    release = threading.Event()
    # writer="thread": the snapshot is built on the pipeline thread at normal priority, so
    # the only long wait is the logger's (a helper on idle CPU time can take seconds on a
    # loaded machine, and that wait would be the one the deadline names).
    callback = NormXLogitCallback(dm.probes, every_n_steps=4, media_probes=0,
                                  faithfulness_every=None, store_dir=tmp_path / "store",
                                  writer="thread")
    start = time.monotonic()
    try:
        trainer = fit(make_model(dm), dm, tmp_path, [callback], max_steps=10,
                      logger=HangingLogger(tmp_path / "csv", release))
        assert trainer.global_step == 10 and time.monotonic() - start < 60
        [warning] = [m for m in warnings_of(caplog) if "pipeline thread has spent" in m]
        assert "snapshot 0" in warning and "log_metrics" in warning
        assert load_run(tmp_path / "store").steps[0] == 0
        assert sorted(callback.missing_steps) == [1, 2, 4, 8, 10]
        assert all("stuck on snapshot 0" in r for r in callback.missing_steps.values()), \
            callback.missing_steps
    finally:
        release.set()  # let the thread go at the end of the test
