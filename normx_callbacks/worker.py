"""Where a snapshot is built and written: in this process, or in a helper process.

`SnapshotWriter` turns a `Snapshot` into metrics, tables and logger media, writes the store
(a failed write is kept and retried before the next one; what cannot be written is recorded
as missing) and, when it holds a copy of the model, runs the faithfulness forwards. It runs
on the snapshot worker thread (`pipeline.py`).

Python threads share one interpreter lock, and a busy Python thread slows a PyTorch training
thread far beyond the CPU it takes (every tensor operation gives the lock up and must wait to
get it back). So by default the writer runs in a helper process (`HelperProcess`): the
worker thread sends it each snapshot and waits on a pipe, holding no lock, and then makes the
logger calls the reply carries (loggers live in the training process). The helper is forked
from the training process (as DataLoader workers are: everything is imported already, and the
user's script is never re-run), once per training process and shared by every engine in it,
and runs only on CPU time training leaves idle. It never touches CUDA. If it cannot start
or dies, the writer runs in this process instead, with one warning; nothing is lost.
"""

from __future__ import annotations

import gc
import io
import logging
import os
import pickle
import threading
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import pandas as pd
import torch

from .faithfulness import faithfulness_rows
from .loggers import SnapshotMedia
from .methods import probe_attributions
from .snapshot import (
    ProbeContext,
    Snapshot,
    SnapshotBuilder,
    metrics_table,
    reference_from_store,
)
from .store import SnapshotStore

log = logging.getLogger(__name__)

# Snapshots whose write failed (disk full, store unreachable) are kept in memory and written
# before the next one; a few at most, so a disk that stays full cannot grow memory.
MAX_UNWRITTEN = 3
HELPER_NICE = 19  # where SCHED_IDLE is not available


@dataclass
class Written:
    """What the writer did with one snapshot."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    media: list[tuple] = field(default_factory=list)
    failed: str | None = None  # why the snapshot is missing
    seconds: float = 0.0  # writer time for the snapshot (build, write, media)


@dataclass
class Faithfulness:
    """How the writer runs the faithfulness forwards on its own copy of the model."""

    model: torch.nn.Module  # a CPU copy of the module the adapter reads
    methods: tuple[str, ...]
    replacement: Any
    probes: int  # the first n probes
    batch_size: int
    accepts_mask: bool
    alignment_methods: tuple[str, ...] = ()  # gradient reference of alignment, same cadence


class SnapshotWriter:
    """Builds, writes and prepares the media of snapshots, in step order (see module doc)."""

    def __init__(self, ctx: ProbeContext, *, owner: str, media_probes: int,
                 history_length: int, takes_images: bool, has_loggers: bool = True,
                 faithfulness: Faithfulness | None = None) -> None:
        self.ctx = ctx
        self.owner = owner
        self.builder = SnapshotBuilder(ctx)
        self.has_loggers = has_loggers  # without loggers (a replay) there is nothing to send
        self.media = SnapshotMedia(ctx, media_probes=media_probes,
                                   history_length=history_length, takes_images=takes_images)
        self.store: SnapshotStore | None = None
        self.unwritten: dict[int, dict[str, pd.DataFrame]] = {}  # step -> tables, oldest first
        self.faithfulness = faithfulness
        self._adapter = None

    # ------------------------------------------------------------------ calls

    def use_store(self, root: str, run_meta: dict) -> None:
        self.store = SnapshotStore(root, run_meta=run_meta)
        if self.builder.reference is None:  # a resumed run: its first snapshot's alignment
            self.builder.reference = reference_from_store(self.store)

    def state(self) -> dict:
        return {"prev_norms": self.builder.prev_norms, "prev_scores": self.builder.prev_scores}

    def set_state(self, state: dict) -> None:
        self.builder.prev_norms = state["prev_norms"]
        self.builder.prev_scores = state["prev_scores"]

    def process(self, snap: Snapshot) -> Written:
        """Build, write and prepare the media of ``snap`` (whose ``weights``, when given, are
        the model's state at its step, for the faithfulness forwards run here)."""
        import time

        start = time.perf_counter()
        if snap.error is not None:
            return Written(snap.step, failed=self._failed(snap.step, snap.error))
        weights, snap.weights = snap.weights, None
        try:
            if weights is not None:
                snap.faithfulness = self._faithfulness(weights)
                if self.faithfulness.alignment_methods:  # on the copy _faithfulness loaded
                    snap.gradient = probe_attributions(
                        self._adapter, self.ctx.encoded, self.faithfulness.alignment_methods,
                        batch_size=self.faithfulness.batch_size)
            built = self.builder.build(snap)
            built.metrics["snapshot/worker_seconds"] = time.perf_counter() - start
            built.tables["metrics"] = metrics_table(built.metrics, built.intervals)
        except Exception as error:  # the training run must never die for a probe
            return Written(snap.step, failed=self._failed(
                snap.step, f"{type(error).__name__}: {error}"))
        failed = self._write(snap.step, built.tables)
        try:
            media = (self.media.payload(snap.step, built, snap.attribution, snap.counts)
                     if self.has_loggers else [])
        except Exception as error:  # e.g. a figure that cannot be drawn: the store has it
            log.warning("%s: the media of the snapshot at step %d failed (%s: %s); it is in "
                        "the snapshot store", self.owner, snap.step, type(error).__name__,
                        error)
            media = [("scalars", None, {f"normx/{k}": v for k, v in built.metrics.items()})]
        return Written(snap.step, built.metrics, media, failed,
                       time.perf_counter() - start)

    def retry(self, last_chance: bool = False) -> None:
        """Write the snapshots whose write failed; on the last chance, give up on the rest."""
        if self.store is None:
            return
        for step in list(self.unwritten):
            try:
                self.store.write(step, self.unwritten[step])  # clears its missing record
            except OSError as error:
                if last_chance:
                    del self.unwritten[step]
                    self._give_up(step, error)
                continue
            del self.unwritten[step]
            log.info("%s: snapshot %d written on retry", self.owner, step)

    def mark_missing(self, step: int, reason: str) -> str:
        return self._failed(step, reason)

    # ------------------------------------------------------------------ inside

    def _faithfulness(self, weights: dict) -> list[pd.DataFrame]:
        from .adapters import resolve_adapter
        from .discovery import find_model

        spec = self.faithfulness
        spec.model.load_state_dict(weights)
        if self._adapter is None:
            self._adapter = (resolve_adapter(spec.model) if _is_hf(spec.model)
                             else find_model(spec.model, who=self.owner))
        subset_rows = list(range(min(spec.probes, len(self.ctx.encoded))))
        subset = self.ctx.encoded.select(subset_rows)
        protect = self.ctx.protect[subset_rows]
        groups = ([(list(range(len(subset))), subset)] if spec.accepts_mask
                  else subset.equal_length_groups())
        parts = []
        with torch.no_grad():
            for group_rows, group in groups:
                parts.append(faithfulness_rows(
                    self._adapter, group, spec.methods, replacement=spec.replacement,
                    protect=protect[group_rows][:, : group.input_ids.shape[1]],
                    batch_size=spec.batch_size))
        return parts

    def _write(self, step: int, tables: dict[str, pd.DataFrame]) -> str | None:
        if self.store is None:
            return None
        self.retry()
        try:
            self.store.write(step, tables)
        except ValueError as error:  # a table Parquet cannot hold: a retry would fail alike
            log.warning("%s: snapshot %d cannot be stored (%s); recorded as missing",
                        self.owner, step, error)
            return self._mark(step, f"cannot be stored: {error}")
        except OSError as error:
            log.warning("%s: could not write snapshot %d to %s (%s); kept in memory and "
                        "retried at the next snapshot, training continues", self.owner, step,
                        self.store.root, error)
            self.unwritten[step] = tables
            # Recorded now, so a run killed before the retry still says what it lacks.
            self._mark(step, f"write failed: {error} (will retry)")
            while len(self.unwritten) > MAX_UNWRITTEN:
                oldest = next(iter(self.unwritten))
                del self.unwritten[oldest]
                self._give_up(oldest, error)
        return None

    def _give_up(self, step: int, error: OSError) -> None:
        log.warning("%s: snapshot %d could not be written after retries (%s); recorded as "
                    "missing", self.owner, step, error)
        self._mark(step, f"write failed after retries: {error}")

    def _failed(self, step: int, reason: str) -> str:
        log.warning("%s: snapshot at step %d failed (%s); recorded as missing", self.owner,
                    step, reason)
        return self._mark(step, reason)

    def _mark(self, step: int, reason: str) -> str:
        if self.store is not None:
            try:
                self.store.mark_missing(step, reason)
            except OSError:
                log.warning("%s: the store at %s is not writable at all", self.owner,
                            self.store.root)
        return reason


def _is_hf(model: torch.nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


# --------------------------------------------------------------------------- helper process


class _Pickler(pickle.Pickler):
    """Plain pickle, but a plain CPU tensor goes as its NumPy array: torch's own reduction
    saves each storage through `torch.save`, ten times slower for a snapshot's small
    tensors. The tensor comes back with the same dtype, shape and values (not its strides
    or storage sharing, which no snapshot relies on); others (bfloat16, subclasses such as
    Parameter, sparse, conjugate views, tensors needing grad) go the usual way."""

    def reducer_override(self, obj: Any) -> Any:
        if (type(obj) is torch.Tensor and obj.device.type == "cpu"
                and obj.layout == torch.strided and not obj.requires_grad
                and obj.dtype in _NUMPY_DTYPES and not obj.is_conj() and not obj.is_neg()):
            return torch.from_numpy, (obj.numpy(),)
        return NotImplemented


_NUMPY_DTYPES = {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32,
                 torch.int16, torch.int8, torch.uint8, torch.bool}


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


class HelperDied(RuntimeError):
    """The helper process is gone; the caller goes on in this process."""


class HelperProcess:
    """One helper process per training process, shared by every engine: it holds one
    `SnapshotWriter` per engine (by key) and runs their calls, one at a time."""

    _shared: HelperProcess | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        if not hasattr(os, "fork"):
            raise OSError("this platform cannot fork a helper process")
        parent_read, child_write = os.pipe()
        child_read, parent_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the helper: everything is imported already, nothing to start
            # The training process's objects are never used here: keep the garbage
            # collector off them, or it would write to (and so copy) their memory pages.
            gc.freeze()
            code = 0
            try:
                os.close(parent_read)
                os.close(parent_write)
                _serve(child_read, child_write)
            except BaseException:  # noqa: BLE001 - the parent sees the pipe close
                code = 1
            finally:
                os._exit(code)  # never the parent's atexit handlers or buffers
        os.close(child_read)
        os.close(child_write)
        self.process = _Child(pid)
        self._send = Connection(parent_write, readable=False)
        self._recv = Connection(parent_read, writable=False)
        self._call_lock = threading.Lock()

    @classmethod
    def shared(cls) -> HelperProcess:
        with cls._lock:
            if cls._shared is None or cls._shared.process.poll() is not None:
                cls._shared = cls()
            return cls._shared

    def call(self, key: int, method: str, *args: Any) -> Any:
        with self._call_lock:
            try:
                # Plain pickle: multiprocessing's own would hand tensors over as shared-memory
                # file descriptors, which only a process it started itself may open.
                self._send.send_bytes(_dumps((key, method, args)))
                ok, value, records = pickle.loads(self._recv.recv_bytes())
            except (EOFError, OSError, BrokenPipeError) as error:
                raise HelperDied(f"the helper process is gone ({type(error).__name__}: "
                                 f"{error}; exit code {self.process.poll()})") from None
        for record in records:  # the helper's warnings, logged here where handlers are
            logging.getLogger(record.name).handle(record)
        if not ok:
            raise value
        return value


class _Child:
    """The helper's pid, with `subprocess.Popen`'s poll / wait / returncode. One lock: the
    worker thread polls a helper that died mid-call while another thread may wait for it,
    and only the thread that reaps the pid learns its exit code."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:
                    self.returncode = -1
                    return self.returncode
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self) -> int:
        with self._lock:
            if self.returncode is None:
                try:
                    _, status = os.waitpid(self.pid, 0)
                    self.returncode = os.waitstatus_to_exitcode(status)
                except ChildProcessError:
                    self.returncode = -1
            return self.returncode


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None
        record.exc_info = record.exc_text = None
        self.records.append(record)


def _yield_cpu() -> None:
    """Run only on CPU time training leaves idle (Linux SCHED_IDLE), else at low priority.
    Training's OpenMP threads spin on every core between parallel regions; a helper that
    preempts one of them stalls the region it belongs to."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.nice(HELPER_NICE)
        except OSError:
            pass


def _serve(read_fd: int, write_fd: int) -> None:
    """The helper's loop: run each call on its writer, reply (ok, value, log records)."""
    _yield_cpu()
    torch.set_num_threads(1)
    recv = Connection(read_fd, writable=False)
    send = Connection(write_fd, readable=False)
    collect = _Collect()
    package = logging.getLogger("normx_callbacks")
    package.addHandler(collect)
    package.setLevel(logging.INFO)
    package.propagate = False
    writers: dict[int, SnapshotWriter] = {}
    while True:
        try:
            key, method, args = pickle.loads(recv.recv_bytes())
        except (EOFError, OSError):
            return  # the training process is gone
        collect.records = []
        try:
            if method == "init":
                writers[key] = SnapshotWriter(*args[0], **args[1])
                value = None
            elif method == "close":
                writers.pop(key, None)
                value = None
            else:
                value = getattr(writers[key], method)(*args)
            reply = (True, value, collect.records)
        except Exception as error:  # handed back: the caller records it
            reply = (False, _picklable(error), collect.records)
        try:
            data = _dumps(reply)
        except Exception as error:  # an unpicklable value: say so instead
            data = pickle.dumps((False, RuntimeError(f"{type(error).__name__}: {error}"),
                                 collect.records))
        send.send_bytes(data)


def _picklable(error: Exception) -> Exception:
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")

