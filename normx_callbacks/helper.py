"""The helper process: where snapshots are written without slowing the training thread.

Python threads share one interpreter lock, and a busy Python thread slows a PyTorch training
thread far beyond the CPU it takes (every tensor operation gives the lock up and must wait to
get it back). So by default the snapshot writer (`writer.py`) runs in a helper process: the
pipeline's thread (`pipeline.py`) sends it each snapshot and waits on a pipe, holding no lock,
and then makes the logger calls the reply carries (loggers live in the training process).

- **Forked**, as DataLoader workers are (everything is imported already, the user's script
  is never re-run), once per training process, shared by every engine in it and ended with
  the last one; it never touches CUDA and runs only on CPU time training leaves idle.
- **Memory**: before the fork the training process's objects leave its cyclic garbage
  collector (a collection would copy every page it touches for the helper), freed heap is
  trimmed, and the helper drops its copy of every large tensor it inherits.
- **Deadlines**: every call is awaited in short slices, and between them the helper's
  scheduler state and CPU time are read; a stuck helper is killed, reaped, and the call
  raises `HelperDied`, so the engine goes on in the training process.
- **Protocol**: length-framed plain pickle over two pipes, non-blocking on the training
  side (a stopped helper also stops reading); plain CPU tensors travel as NumPy arrays.

One concept, the helper and its protocol, hence one module past 400 lines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import io
import logging
import mmap
import os
import pickle
import select
import signal
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from .writer import SnapshotWriter

log = logging.getLogger(__name__)

HELPER_NICE = 19  # where SCHED_IDLE is not available




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


def dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


class HelperDied(RuntimeError):
    """The helper process is gone (or was killed for making no progress); the caller goes
    on in this process."""


# When a helper that owes a reply counts as stuck (see `HelperProcess._stuck`). A helper is
# killed only for what a working one never does: being stopped (SIGSTOP, a debugger), or
# making no CPU progress for a minute while asleep (a dead network mount, a lock inherited
# locked at fork) or while training waits for it (another process takes the CPU it needs).
# Runnable without CPU while training runs is normal: it runs on idle CPU time only.
STOPPED_SECONDS = 5.0
STALLED_SECONDS = 60.0
_POLL_SECONDS = 0.25
_STATES = {"T": "stopped", "t": "stopped by a tracer", "D": "in uninterruptible sleep (disk "
           "or network I/O)", "S": "asleep", "R": "runnable but given no CPU time",
           "Z": "exited"}


class HelperProcess:
    """One helper process per training process, shared by every engine: it holds one
    `SnapshotWriter` per engine (by key) and runs their calls, one at a time.

    Every call has a deadline: the reply is awaited in short slices, and between them the
    helper's state and CPU time are read (`/proc` on Linux). A helper that is stuck (see
    `_stuck`) is killed and the call raises `HelperDied`, so the engine goes on in the
    training process; nothing that training waits for can hang on the helper.
    """

    _shared: HelperProcess | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        if not hasattr(os, "fork"):
            raise OSError("this platform cannot fork a helper process")
        parent_read, child_write = os.pipe()
        child_read, parent_write = os.pipe()
        inherited = _tensor_pages()
        # Objects alive now leave the training process's cyclic garbage collection while the
        # helper lives (see `stop`), as Python's documentation advises before a fork: a
        # collection writes to every object it traverses, and each page written would be
        # copied for the helper (measured: 128 MiB for one gc.collect() of a tiny run).
        # Reference counting still frees them.
        gc.collect()
        gc.freeze()
        pid = os.fork()
        if pid == 0:  # the helper: everything is imported already, nothing to start
            # The training process's objects are never used here: keep the garbage
            # collector off them, or it would write to (and so copy) their memory pages.
            gc.freeze()
            code = 0
            try:
                os.close(parent_read)
                os.close(parent_write)
                _drop_pages(inherited)
                _serve(child_read, child_write)
            except BaseException:  # noqa: BLE001 - the parent sees the pipe close
                code = 1
            finally:
                os._exit(code)  # never the parent's atexit handlers or buffers
        os.close(child_read)
        os.close(child_write)
        self.process = _Child(pid)
        self.users: set[int] = set()  # the engines whose writers it holds
        self._stopped = False
        self._write_fd, self._read_fd = parent_write, parent_read
        for fd in (parent_write, parent_read):
            os.set_blocking(fd, False)  # waits are select()s with a deadline, never blocking
        self._call_lock = threading.Lock()

    @classmethod
    def shared(cls) -> HelperProcess:
        with cls._lock:
            if cls._shared is None or cls._shared.process.poll() is not None:
                cls._shared = cls()
            return cls._shared

    @classmethod
    def end_shared(cls) -> None:
        """End the shared helper; the next engine forks a new one (which inherits the
        process as it is then: fault tests use this after patching the file system)."""
        with cls._lock:
            helper, cls._shared = cls._shared, None
        if helper is not None:
            helper.kill()

    def call(self, key: int, method: str, *args: Any,
             training_waits: Callable[[], bool] = lambda: True) -> Any:
        """Run ``method(*args)`` on the writer ``key`` in the helper and return its value.
        ``training_waits`` says whether the training thread is waiting for this call now
        (only then does a helper given no CPU time count as stuck)."""
        with self._call_lock:
            # Plain pickle: multiprocessing's own would hand tensors over as shared-memory
            # file descriptors, which only a process it started itself may open.
            data = dumps((key, method, args))
            watch = _Watch(self, method, training_waits)
            try:
                self._send(data, watch)
                ok, value, records = pickle.loads(self._receive(watch))
            except (EOFError, OSError) as error:
                raise HelperDied(f"the snapshot helper process is gone (pid {self.process.pid}"
                                 f", exit code {self.process.poll()}; {type(error).__name__}: "
                                 f"{error})") from None
        for record in records:  # the helper's warnings, logged here where handlers are
            logging.getLogger(record.name).handle(record)
        if not ok:
            raise value
        if method == "init":
            self.users.add(key)
        elif method == "close":
            self.users.discard(key)
            if not self.users:
                self.stop()
        return value

    def stop(self) -> None:
        """End the helper once no engine uses it (it exits when its pipe closes): it lives
        for the snapshots of a fit, not through what the process does after training, whose
        writes would otherwise be copied for it. The objects frozen for the fork go back to
        the garbage collector."""
        with HelperProcess._lock:
            if self._stopped:
                return
            self._stopped = True
            if HelperProcess._shared is self:
                HelperProcess._shared = None
        for fd in (self._write_fd, self._read_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        threading.Thread(target=self.process.wait, name="normx-helper-reaper",
                         daemon=True).start()
        gc.unfreeze()

    def kill(self) -> None:
        """End the helper now (also a stopped one or one in uninterruptible sleep, which
        exits when its I/O returns); it is reaped without waiting."""
        try:
            os.kill(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.stop()  # reaped when it dies (a D-state one, when its I/O returns)

    # ------------------------------------------------------------------ framed pipe

    def _send(self, data: bytes, watch: _Watch) -> None:
        for chunk in (_HEADER.pack(len(data)), data):
            view = memoryview(chunk)
            while view:
                watch.wait(self._write_fd, writable=True)
                try:
                    view = view[os.write(self._write_fd, view[:_CHUNK]):]
                except BlockingIOError:
                    continue

    def _receive(self, watch: _Watch) -> bytes:
        size = _HEADER.unpack(self._read_exactly(_HEADER.size, watch))[0]
        return self._read_exactly(size, watch)

    def _read_exactly(self, size: int, watch: _Watch) -> bytes:
        parts, left = [], size
        while left:
            watch.wait(self._read_fd, writable=False)
            try:
                part = os.read(self._read_fd, min(left, _CHUNK))
            except BlockingIOError:
                continue
            if not part:
                raise EOFError("the pipe from the helper closed")
            parts.append(part)
            left -= len(part)
        return b"".join(parts)


_HEADER = struct.Struct("<Q")
_CHUNK = 1 << 20


class _Watch:
    """Waits on the helper's pipe in short slices and kills a stuck helper (see
    `HelperProcess`)."""

    def __init__(self, helper: HelperProcess, method: str,
                 training_waits: Callable[[], bool]) -> None:
        self.helper, self.method, self.training_waits = helper, method, training_waits
        self.cpu: int | None = None
        self.progress = time.monotonic()  # the last time the helper used CPU
        self.stopped_since: float | None = None
        self.starved = 0.0  # seconds training waited while the helper got no CPU

    def wait(self, fd: int, *, writable: bool) -> None:
        while True:
            ready = select.select([], [fd], [], _POLL_SECONDS)[1] if writable else \
                select.select([fd], [], [], _POLL_SECONDS)[0]
            if ready:
                return
            pid, code = self.helper.process.pid, self.helper.process.poll()
            if code is not None:
                raise HelperDied(f"the snapshot helper process is gone (pid {pid}, exit code "
                                 f"{code})")
            why = self._stuck()
            if why:  # the caller's one warning says it
                self.helper.kill()
                raise HelperDied(f"the snapshot helper process (pid {pid}) {why} during its "
                                 f"{self.method!r} call and was killed")

    def _stuck(self) -> str | None:
        """Why the running helper counts as stuck now, or None."""
        now = time.monotonic()
        status = self.helper.process.status()
        if status is None:  # no /proc: a plain deadline while training waits
            if self.training_waits():
                self.starved += _POLL_SECONDS
            return (f"gave no reply for {self.starved:.0f} s while training waited"
                    if self.starved > 5 * STALLED_SECONDS else None)
        state, cpu = status
        if cpu != self.cpu:
            self.cpu, self.progress, self.starved = cpu, now, 0.0
        if state in ("T", "t"):
            self.stopped_since = self.stopped_since or now
            if now - self.stopped_since >= STOPPED_SECONDS:
                return f"was {_STATES[state]} for {now - self.stopped_since:.0f} s"
            return None
        self.stopped_since = None
        idle = now - self.progress
        if state == "R":
            if self.training_waits() and idle >= _POLL_SECONDS:
                self.starved += _POLL_SECONDS
            if self.starved >= STALLED_SECONDS:
                return (f"was {_STATES['R']} for {self.starved:.0f} s while training waited "
                        "for it (other processes take the CPU)")
            return None
        if idle >= STALLED_SECONDS:
            return f"made no progress for {idle:.0f} s, {_STATES.get(state, state)}"
        return None


class _Child:
    """The helper's pid, with `subprocess.Popen`'s poll / wait / returncode. One lock: the
    pipeline thread polls a helper that died mid-call while another thread may wait for it,
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

    def status(self) -> tuple[str, int] | None:
        """(scheduler state letter, CPU time in clock ticks) from /proc; None elsewhere."""
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as f:
                fields = f.read().decode(errors="replace").rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return fields[0], int(fields[11]) + int(fields[12])  # state, utime + stime

    def wait(self) -> int:
        # Polls rather than blocking in waitpid under the lock: a killed helper in
        # uninterruptible sleep may take long to die, and no `poll` may wait for that.
        while self.poll() is None:
            time.sleep(0.05)
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
    collect = _Collect()
    package = logging.getLogger("normx_callbacks")
    package.addHandler(collect)
    package.setLevel(logging.INFO)
    package.propagate = False
    writers: dict[int, SnapshotWriter] = {}
    while True:
        try:
            key, method, args = pickle.loads(_read_frame(read_fd))
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
            data = dumps(reply)
        except Exception as error:  # an unpicklable value: say so instead
            data = pickle.dumps((False, RuntimeError(f"{type(error).__name__}: {error}"),
                                 collect.records))
        _write_frame(write_fd, data)


def _read_frame(fd: int) -> bytes:
    def exactly(size: int) -> bytes:
        parts, left = [], size
        while left:
            part = os.read(fd, min(left, _CHUNK))
            if not part:
                raise EOFError("the pipe from the training process closed")
            parts.append(part)
            left -= len(part)
        return b"".join(parts)

    return exactly(_HEADER.unpack(exactly(_HEADER.size))[0])


def _write_frame(fd: int, data: bytes) -> None:
    for chunk in (_HEADER.pack(len(data)), data):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view[:_CHUNK]):]


def _tensor_pages() -> list[tuple[int, int]]:
    """In the training process, just before the fork: the page-aligned address ranges of
    the large CPU tensors it holds (weights, gradients, optimizer state, anything else), for
    the helper to give back (`_drop_pages`). Freed heap memory is returned to the system
    first, so the helper does not inherit the pages of objects already gone either (a
    restored checkpoint)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    page = mmap.PAGESIZE
    seen: dict[int, int] = {}
    for obj in gc.get_objects():  # here, before the fork: the helper touches none of them
        try:
            # type(), not isinstance: isinstance reads obj.__class__, which some objects
            # compute (torch.distributed.reduce_op warns that it is deprecated).
            if not issubclass(type(obj), torch.Tensor):
                continue
            if obj.device.type != "cpu" or obj.is_sparse:
                continue
            storage = obj.untyped_storage()
            if storage.nbytes() >= _RELEASE_BYTES:
                seen[storage.data_ptr()] = storage.nbytes()
        except Exception:  # noqa: BLE001 - subclasses without storage: left alone
            continue
    ranges = []
    for start, size in seen.items():
        first, last = -(-start // page) * page, (start + size) // page * page
        if last > first:
            ranges.append((first, last - first))
    return ranges


def _drop_pages(ranges: list[tuple[int, int]]) -> None:
    """In the helper, right after the fork: drop its copy of the training process's large
    tensors (`madvise(MADV_DONTNEED)`; the helper never reads them). Otherwise every page
    that training writes (each optimizer step writes all weights) or frees would stay
    allocated in the helper: copy-on-write keeps the old page for it. No Python object is
    touched, so no other page is copied."""
    if _LIBC is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    for start, size in ranges:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(size), mmap.MADV_DONTNEED)


try:  # glibc; elsewhere the helper keeps what it inherits
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
    _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError, TypeError):
    _LIBC = None
_RELEASE_BYTES = 1 << 20  # smaller tensors (library constants) are kept, as they cost little


def _picklable(error: Exception) -> Exception:
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")

