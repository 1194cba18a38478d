"""The snapshot worker: everything after the measurement, off the training thread.

The training thread hands each `Snapshot` to `Pipeline.submit` and goes back to training;
one background thread builds the metrics and tables, writes the store and calls the
loggers, one snapshot at a time, in submission order.

- **Bounded.** At most `max_pending` snapshots wait. When the worker falls behind, `submit`
  blocks until there is room; nothing is ever dropped. Once training has waited more than
  `WARN_AFTER_SECONDS` in all, one warning says so.
- **Flushed** (`flush`) whenever what is written must be complete: before a checkpoint is
  saved (a checkpoint is never ahead of the snapshots before it), at train end, on an
  exception in training and at teardown.
- **Never loses an error.** A job that raises is handed to `on_error` (which records the step
  as missing and warns), and kept in `failures`, which the training thread reads.

A thread, not a process: the loggers (a TensorBoard writer, a W&B run) live in this
process, and the heavy parts (Parquet, fsync, numpy) release the GIL. See BENCHMARKS.md,
"Training overhead", for what it costs the training thread.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()
# A burst of early snapshots (steps 0, 1, 2, 4 of the log schedule) may fill the queue for a
# moment; only a worker that keeps training waiting is worth a warning.
WARN_AFTER_SECONDS = 1.0


class Pipeline:
    """A bounded single-worker queue of jobs ``(name, fn, args)`` run in order.

    Args:
        on_error: called on the worker thread as ``on_error(name, error)`` when a job
            raises (the job's snapshot is then recorded as missing by the caller's handler).
        max_pending: how many submitted jobs may wait before `submit` blocks.
    """

    def __init__(self, on_error: Callable[[Any, BaseException], None], *,
                 max_pending: int = 8, name: str = "normx-snapshot-worker") -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending!r} must be a positive integer")
        self.on_error = on_error
        self.max_pending = max_pending
        self.failures: list[tuple[Any, str]] = []  # (job name, "Type: message")
        self.waited_seconds = 0.0  # training-thread time spent waiting on a full queue
        self.worker_seconds = 0.0  # worker time over all jobs
        self.training_waits = False  # while a submit or flush blocks the calling thread
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._warned_full = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        # A plain loop that ends without `close` still gets its snapshots written.
        atexit.register(_close_at_exit, weakref.ref(self))

    def submit(self, name: Any, fn: Callable[..., None], *args: Any) -> None:
        """Queue ``fn(*args)``; blocks (and warns once) while `max_pending` jobs wait."""
        if not self._thread.is_alive():
            raise RuntimeError("the snapshot worker is closed")
        try:
            self._queue.put_nowait((name, fn, args))
            return
        except queue.Full:
            pass
        start = time.perf_counter()
        self.training_waits = True
        try:
            self._queue.put((name, fn, args))
        finally:
            self.training_waits = False
        self.waited_seconds += time.perf_counter() - start
        if not self._warned_full and self.waited_seconds > WARN_AFTER_SECONDS:
            self._warned_full = True
            log.warning("NormXLogitCallback: the snapshot worker is %d snapshots behind; "
                        "training has waited %.2f s for it (it never drops a snapshot). Snapshots "
                        "cost more than the steps between them: take fewer (every_n_steps), "
                        "draw fewer heatmaps (media_probes) or evaluate faithfulness less often",
                        self.max_pending, self.waited_seconds)

    def flush(self) -> None:
        """Wait until every submitted job has run."""
        if self._thread.is_alive():
            start = time.perf_counter()
            self.training_waits = True
            try:
                self._queue.join()
            finally:
                self.training_waits = False
            self.waited_seconds += time.perf_counter() - start

    def on_worker_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def close(self) -> None:
        """Flush, then stop the worker thread."""
        if self._thread.is_alive():
            self.flush()
            self._queue.put((None, _STOP, ()))
            self._thread.join()

    def _run(self) -> None:
        while True:
            name, fn, args = self._queue.get()
            try:
                if fn is _STOP:
                    return
                start = time.perf_counter()
                try:
                    fn(*args)
                except BaseException as error:  # noqa: BLE001 - handed on, never lost
                    self.failures.append((name, f"{type(error).__name__}: {error}"))
                    try:
                        self.on_error(name, error)
                    except Exception:  # the handler itself failed: still say something
                        log.exception("NormXLogitCallback: snapshot %s failed", name)
                finally:
                    self.worker_seconds += time.perf_counter() - start
            finally:
                self._queue.task_done()


def _close_at_exit(ref: weakref.ref) -> None:
    pipeline = ref()
    if pipeline is not None:
        pipeline.close()
