"""The pipeline: one background thread that hands snapshots to the writer, in order.

The training thread hands each `Snapshot` to `Pipeline.submit` and goes back to training;
the pipeline's one thread passes them to the writer (`writer.py`: in the helper process,
`helper.py`, by default; on this thread with `writer="thread"`) one at a time, in
submission order, and makes the logger calls each reply carries.

- **Bounded.** At most `max_pending` snapshots wait. When the writer falls behind, `submit`
  blocks until there is room; nothing is ever dropped. Once training has waited more than
  `WARN_AFTER_SECONDS` in all, one warning says so.
- **Flushed** (`flush`) whenever what is written must be complete: before a checkpoint is
  saved (a checkpoint is never ahead of the snapshots before it), at train end, on an
  exception in training and at teardown.
- **Never loses an error.** A job that raises is handed to `on_error` (which records the step
  as missing and warns), and kept in `failures`, which the training thread reads.
- **Never holds training forever.** A job stuck past `STALLED_SECONDS` (a logger call that
  never returns) gets one warning naming where the thread is; flushes stop waiting for it.

A thread, because the loggers (a TensorBoard writer, a W&B run) live in the training
process; while the helper works, this thread only waits on a pipe and holds no interpreter
lock. The building itself is not done on a thread by default: a busy Python thread slows a
PyTorch training thread far beyond the CPU it takes (`helper.py`; BENCHMARKS.md, "Training
overhead").
"""

from __future__ import annotations

import atexit
import logging
import queue
import sys
import sysconfig
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()
# A burst of early snapshots (steps 0, 1, 2, 4 of the log schedule) may fill the queue for a
# moment; only a writer that keeps training waiting is worth a warning.
WARN_AFTER_SECONDS = 1.0
# A job running this long is stuck: far beyond building and writing a snapshot, and beyond
# the helper process's own deadlines (helper.STOPPED_SECONDS, STALLED_SECONDS).
STALLED_SECONDS = 300.0
_SLICE_SECONDS = 0.5


class Pipeline:
    """A bounded queue of jobs ``(name, fn, args)`` run in order.

    Every wait on it has a deadline. A job still running after `STALLED_SECONDS` (a logger
    call that hangs on a dead network: the helper process has its own, shorter deadlines)
    counts as stuck: one warning names it and where the thread is, training stops waiting
    for it (flushes return, `close` does not join), and a snapshot that can then no longer be
    queued is handed to ``on_dropped`` (the caller lists it as missing) instead of blocking.

    Args:
        on_error: called on the pipeline thread as ``on_error(name, error)`` when a job
            raises (the job's snapshot is then recorded as missing by the caller's handler).
        on_dropped: called on the calling thread as ``on_dropped(name, reason)`` for a job
            not queued because the thread is stuck.
        max_pending: how many submitted jobs may wait before `submit` blocks.
        owner: who the messages name.
    """

    def __init__(self, on_error: Callable[[Any, BaseException], None], *,
                 on_dropped: Callable[[Any, str], None] | None = None,
                 max_pending: int = 8, owner: str = "NormXLogitCallback",
                 name: str = "normx-snapshot-pipeline") -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending!r} must be a positive integer")
        self.on_error = on_error
        self.on_dropped = on_dropped
        self.max_pending = max_pending
        self.owner = owner
        self.failures: list[tuple[Any, str]] = []  # (job name, "Type: message")
        self.waited_seconds = 0.0  # training-thread time spent waiting on a full queue
        self.training_waits = False  # while a submit or flush blocks the calling thread
        self.stuck: Any = None  # the job the thread is stuck in, once it counts as stuck
        self._running: tuple[Any, float] | None = None  # (job name, monotonic start)
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._warned_full = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        # A plain loop that ends without `close` still gets its snapshots written.
        atexit.register(_close_at_exit, weakref.ref(self))

    def submit(self, name: Any, fn: Callable[..., None], *args: Any) -> None:
        """Queue ``fn(*args)``; blocks (and warns once) while `max_pending` jobs wait."""
        if not self._thread.is_alive():
            raise RuntimeError("the snapshot pipeline is closed")
        if self._is_stuck():
            self._drop(name)
            return
        try:
            self._queue.put_nowait((name, fn, args))
            return
        except queue.Full:
            pass
        start = time.perf_counter()
        self.training_waits = True
        try:
            while True:
                try:
                    self._queue.put((name, fn, args), timeout=_SLICE_SECONDS)
                    break
                except queue.Full:
                    if self._is_stuck():
                        self._drop(name)
                        return
        finally:
            self.training_waits = False
            self.waited_seconds += time.perf_counter() - start
        if not self._warned_full and self.waited_seconds > WARN_AFTER_SECONDS:
            self._warned_full = True
            log.warning("%s: the snapshot writer is %d snapshots behind; training has waited "
                        "%.2f s for it (it never drops a snapshot). Snapshots cost more than "
                        "the steps between them: take fewer (every_n_steps), draw fewer "
                        "heatmaps (media_probes) or evaluate faithfulness less often",
                        self.owner, self.max_pending, self.waited_seconds)

    def flush(self) -> None:
        """Wait until every submitted job has run (or the thread is stuck in one)."""
        if not self._thread.is_alive():
            return
        start = time.perf_counter()
        self.training_waits = True
        done = self._queue.all_tasks_done
        try:
            with done:
                while self._queue.unfinished_tasks and not self._is_stuck():
                    done.wait(_SLICE_SECONDS)
        finally:
            self.training_waits = False
            self.waited_seconds += time.perf_counter() - start

    def queued(self) -> list[Any]:
        """The names of the jobs waiting, in order (and the one running first, if any)."""
        with self._queue.mutex:
            waiting = [name for name, _, _ in self._queue.queue]
        running = self._running
        return ([running[0]] if running is not None else []) + waiting

    @property
    def thread(self) -> threading.Thread:
        """The pipeline's thread (tests check that `close` stops it)."""
        return self._thread

    def on_pipeline_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def close(self) -> None:
        """Flush, then stop the pipeline thread (a stuck one is left to itself: it is a
        daemon thread, and what it still holds was named when it counted as stuck)."""
        if self._thread.is_alive():
            self.flush()
            if self._is_stuck():
                return
            self._queue.put((None, _STOP, ()))
            self._thread.join()

    def _is_stuck(self) -> bool:
        running = self._running
        if running is None or time.monotonic() - running[1] < STALLED_SECONDS:
            return False
        if self.stuck != running[0]:
            self.stuck = running[0]
            log.warning("%s: the snapshot pipeline thread has spent %.0f s on snapshot %s (%s); "
                        "training no longer waits for it, and snapshots that cannot be queued "
                        "behind it are listed as missing at the end", self.owner,
                        time.monotonic() - running[1], running[0], self._where())
        return True

    def _where(self) -> str:
        """The innermost frames of the pipeline thread: what it is stuck in."""
        frame = sys._current_frames().get(self._thread.ident)  # documented in `sys`
        if frame is None:
            return "its stack is not available"
        stdlib = sysconfig.get_paths()["stdlib"]  # waits inside threading, queue, socket
        frames = [f for f in traceback.extract_stack(frame) if not f.filename.startswith(stdlib)]
        return "in " + " <- ".join(f"{f.name} ({Path(f.filename).name}:{f.lineno})"
                                   for f in reversed(frames[-2:]))

    def _drop(self, name: Any) -> None:
        reason = (f"not written: the snapshot pipeline thread was stuck on snapshot "
                  f"{self.stuck} ({STALLED_SECONDS:.0f} s or more)")
        if self.on_dropped is not None:
            self.on_dropped(name, reason)

    def _run(self) -> None:
        while True:
            name, fn, args = self._queue.get()
            try:
                if fn is _STOP:
                    return
                self._running = (name, time.monotonic())
                try:
                    fn(*args)
                except BaseException as error:  # noqa: BLE001 - handed on, never lost
                    self.failures.append((name, f"{type(error).__name__}: {error}"))
                    try:
                        self.on_error(name, error)
                    except Exception:  # the handler itself failed: still say something
                        log.exception("%s: snapshot %s failed", self.owner, name)
                finally:
                    self._running = None
                    if self.stuck == name:
                        self.stuck = None  # it came back: the queue goes on as before
            finally:
                self._queue.task_done()


def _close_at_exit(ref: weakref.ref) -> None:
    pipeline = ref()
    if pipeline is not None:
        pipeline.close()
