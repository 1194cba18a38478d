"""Where a measured snapshot goes: the writer, in the helper process or in this process,
behind the pipeline's thread.

`Execution` owns, for one engine, the `pipeline.Pipeline` (the bounded, ordered queue and
its thread in the training process), the `writer.SnapshotWriter` (in the helper process,
`helper.py`, by default; in this process with ``writer="thread"``, when the helper cannot
start, or after it died) and the results that come back: the last metrics, the last
snapshot's norms and scores (for the next one's drift and stability, and for a resume), and
every step that is missing and why. If the helper dies or is killed for making no progress,
the writer is rebuilt here with one warning and the call runs again; snapshots the helper
held for a retry are recorded as missing. Nothing is dropped silently.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import pickle
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .adapters import ModelAdapter
from .attribution import Attribution
from .helper import HelperDied, HelperProcess
from .loggers import SnapshotLogger
from .methods import GRADIENT_METHODS
from .pipeline import Pipeline
from .settings import Settings
from .snapshot import ProbeContext, Snapshot
from .store import SnapshotStore
from .writer import Faithfulness, SnapshotWriter, Written

log = logging.getLogger(__name__)

# The helper keeps a copy of the weights for the faithfulness forwards only while the copy
# costs at most this share of the training process's memory; above it (a 124M model on the
# CPU) the forwards run on the training thread, which costs time but no second model.
OFFLOAD_MEMORY_SHARE = 0.05


class Execution:
    """The writer and the pipeline of one engine (see the module docstring)."""

    def __init__(self, settings: Settings, owner: str) -> None:
        self.settings, self.owner = settings, owner
        self.pipeline: Pipeline | None = None
        self.writer: SnapshotWriter | None = None  # the writer when it runs in this process
        self.helper: HelperProcess | None = None
        self.store: SnapshotStore | None = None
        self.run_meta: dict = {}
        self.offload_faithfulness = False  # whether the helper runs the faithfulness forwards
        # Results, as plain attributes the drivers and tests read.
        self.last_metrics: dict[str, float] = {}
        self.last_attribution: Attribution | None = None
        self.failed_steps: dict[int, str] = {}  # step -> why its snapshot is missing
        self.held: set[int] = set()  # steps the writer holds for a retry (failed writes)
        # The last built (or restored) snapshot's norms and scores: drift and stability of
        # the next one, a writer rebuilt after the helper died, and the resume state.
        self.latest: dict | None = None
        self._logger: SnapshotLogger | None = None
        self._writer_args: tuple | None = None
        self._pending = False  # prepared, not started yet (see `ensure`)
        self._adapter: ModelAdapter | None = None

    # ------------------------------------------------------------------ the writer

    def start(self, ctx: ProbeContext, loggers: Sequence, adapter: ModelAdapter, mode: str,
              plain_precision: bool, replacement: Any, alignment_methods: tuple[str, ...],
              run_meta: dict) -> None:
        """Prepare the writer of a fit (it starts at its first use, `ensure`) and the
        pipeline. The faithfulness forwards (and the gradient reference) go to the helper
        with a copy of the weights when they can run there exactly: a float32 CPU model on
        one process, small enough to copy, that pickles."""
        self.close_writer()
        s = self.settings
        self._logger = SnapshotLogger(loggers, owner=self.owner)
        self._adapter = adapter
        self.run_meta = run_meta
        faithfulness = None
        self.offload_faithfulness = False
        if (s.writer == "process" and s.faithfulness_every and mode == "single"
                and plain_precision and adapter.embedding.weight.device.type == "cpu"
                and adapter.module is not None
                and not any(m in GRADIENT_METHODS for m in s.faithfulness_methods)
                and _small_copy(adapter.module) and _picklable(adapter.module)):
            faithfulness = Faithfulness(
                model=adapter.module, methods=s.faithfulness_methods, replacement=replacement,
                probes=s.faithfulness_probes, batch_size=s.probe_batch_size,
                accepts_mask=adapter.accepts_mask, alignment_methods=alignment_methods)
        self._writer_args = ((ctx,), dict(
            owner=self.owner, media_probes=s.media_probes, history_length=s.history_length,
            takes_images=self._logger.takes_images, has_loggers=bool(self._logger.sink.loggers),
            faithfulness=faithfulness))
        self._pending = True
        if self.pipeline is None:
            self.pipeline = Pipeline(self._job_failed, on_dropped=self._job_dropped,
                                     max_pending=s.max_pending, owner=self.owner)

    def ensure(self) -> None:
        """Start the writer prepared by `start` at its first use. The drivers first use it
        on the training thread once training starts (the store is opened, or a snapshot is
        taken): by then Lightning has released a restored checkpoint, which a helper forked
        earlier would keep a copy of (see `helper.py` for the rest of what it inherits)."""
        if not self._pending:
            return
        self._pending = False
        faithfulness = self._writer_args[1]["faithfulness"]
        if self.settings.writer == "process":
            try:
                self.helper = HelperProcess.shared()
                self.helper.call(id(self), "init", *self._writer_args)
                self.offload_faithfulness = faithfulness is not None
            except Exception as error:  # noqa: BLE001 - this process writes instead
                log.warning("%s: the snapshot helper process is not available (%s: %s); "
                            "snapshots are built in this process", self.owner,
                            type(error).__name__, error)
                self.helper = None
        if self.helper is None:
            self._local_writer()
        if self.latest is not None:  # a second fit or a resume goes on from the snapshots before
            self.call("set_state", self._state_for(self._adapter))
        if self.store is not None:  # a fit going on in its store, or the model read again
            self.call("use_store", str(self.store.root), self.run_meta)

    def use_store(self, store: SnapshotStore) -> None:
        self.ensure()
        self.store = store
        self.call("use_store", str(store.root), self.run_meta)

    def set_latest(self, latest: dict) -> None:
        """A resume's restored norms and scores (sent to a writer already started)."""
        self.latest = latest
        if self.writer is not None or self.helper is not None:  # else sent at `ensure`
            self.call("set_state", latest)

    def call(self, method: str, *args: Any) -> Any:
        """A call on the writer, in the helper process or here; if the helper dies (or is
        killed for making no progress), the writer is rebuilt here (one warning) and the
        call runs again. Snapshots the helper held for a retry are recorded as missing."""
        self.ensure()
        if self.helper is not None:
            try:
                return self.helper.call(id(self), method, *args,
                                        training_waits=self._training_waits)
            except HelperDied as error:
                log.warning("%s: %s; snapshots are built in this process from now on",
                            self.owner, error)
                self.helper = None
                self._local_writer(taken_for_helper=True)
                if self.latest is not None:
                    self.writer.set_state(self.latest)
                if self.store is not None:
                    self.writer.use_store(str(self.store.root), self.run_meta)
                held, self.held = sorted(self.held), set()
                for step in held:
                    self._note(self.writer.mark_missing(
                        step, f"its write had failed and {error} while holding it for a "
                              "retry"))
        if self.writer is None:
            return None
        return getattr(self.writer, method)(*args)

    def close_writer(self) -> None:
        self._pending = False
        if self.helper is not None:
            try:
                self.helper.call(id(self), "close")
            except HelperDied:
                pass
        self.helper = None
        self.writer = None

    def _state_for(self, adapter: ModelAdapter | None) -> dict:
        """The last snapshot's norms and scores for the next one's drift and stability, or
        None in place of those that no longer fit (a resized vocabulary, other probes)."""
        state = dict(self.latest)
        norms = state.get("prev_norms")
        if (norms is not None and adapter is not None
                and len(norms) != adapter.embedding.num_embeddings):
            log.info("%s: embedding/drift is not measured across the change of vocabulary "
                     "(%d -> %d rows)", self.owner, len(norms), adapter.embedding.num_embeddings)
            state["prev_norms"] = None
        return state

    def _local_writer(self, *, taken_for_helper: bool = False) -> None:
        """The writer in this process. Snapshots already taken for the helper carry weights
        for their faithfulness forwards: it runs them on its own copy of the model (never the
        model being trained); new snapshots measure faithfulness on the training thread."""
        args, kwargs = self._writer_args
        spec = kwargs["faithfulness"] if taken_for_helper else None
        if spec is not None:
            spec = dataclasses.replace(spec, model=copy.deepcopy(spec.model))
        self.writer = SnapshotWriter(*args, **{**kwargs, "faithfulness": spec})
        self.offload_faithfulness = False

    def _training_waits(self) -> bool:
        """Whether the training thread waits for the writer now: always when it calls the
        writer itself, and while it waits on the pipeline (a full queue, a flush)."""
        pipeline = self.pipeline
        return pipeline is None or not pipeline.on_pipeline_thread() or pipeline.training_waits

    # ------------------------------------------------------------------ snapshots

    def submit(self, snap: Snapshot) -> None:
        self.pipeline.submit(snap.step, self._process, snap)

    def _process(self, snap: Snapshot) -> None:
        """On the pipeline's thread: build and write (in the helper process or here), then
        the logger calls, here, where the loggers live."""
        written = self.call("process", snap)
        if written is None:  # closed meanwhile (a stuck pipeline thread that came back late)
            return
        self._note(written)
        if written.metrics:
            self.last_metrics = written.metrics
            self.last_attribution = snap.attribution
            self.latest = {"prev_norms": snap.norms, "prev_scores": snap.attribution.scores}
        try:
            self._logger.send(snap.step, written.media)
        except Exception as error:  # noqa: BLE001 - the store has it
            log.warning("%s: logging the snapshot at step %d failed (%s: %s); it is in the "
                        "snapshot store", self.owner, snap.step, type(error).__name__, error)

    def _note(self, written: Written | None) -> None:
        """Keep what the writer says it lost or holds for a retry (see `Written`)."""
        if written is None:
            return
        self.failed_steps.update(written.lost)
        if written.failed is not None:
            self.failed_steps[written.step] = written.failed
        self.held = set(written.held)

    def _job_dropped(self, step: Any, reason: str) -> None:
        """A snapshot the stuck pipeline thread could not take: kept here only (the writer
        is busy in that thread), and listed by the final warning."""
        if isinstance(step, int):
            self.failed_steps[step] = reason

    def _job_failed(self, step: Any, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"
        if isinstance(step, int):
            self.failed_steps[step] = reason
            try:
                self._note(self.call("mark_missing", step, reason))
            except Exception:  # noqa: BLE001 - the warning below still says it
                log.warning("%s: snapshot at step %d failed (%s)", self.owner, step, reason)
        else:
            log.warning("%s: the snapshot pipeline's %s job failed (%s)", self.owner, step,
                        reason)

    # ------------------------------------------------------------------ flushing

    def flush(self) -> None:
        """Wait until every snapshot submitted so far is written and logged."""
        if self.pipeline is not None:
            self.pipeline.flush()

    def finish(self, taken: Sequence[int]) -> None:
        """End of training: flush, then a last try at writes that failed, then one warning
        listing every snapshot that is missing (also those the store could not record);
        ``taken``: the steps measured."""
        if self.pipeline is None:
            return
        self.pipeline.submit("retry", lambda: self._note(self.call("retry", True)))
        self.pipeline.flush()
        stuck = self.pipeline.stuck
        if stuck is not None:  # training goes on without what the stuck thread still holds
            for step in self.pipeline.queued():
                if isinstance(step, int) and not (self.store is not None
                                                  and self.store.has(step)):
                    self.failed_steps.setdefault(step, (
                        f"not written by the end of training: the snapshot pipeline's thread "
                        f"was stuck on snapshot {stuck}"))
        log.info("%s: training waited %.2f s in all for the snapshot pipeline (a full queue, "
                 "the flushes before checkpoints and at the end)", self.owner,
                 self.pipeline.waited_seconds)
        if self.failed_steps:
            total = set(taken) | set(self.failed_steps)
            where = f"; {self.store.root}'s missing table records them" if self.store else ""
            log.warning("%s: %d of %d snapshots are missing: %s%s (a record the store could "
                        "not take is listed here only)", self.owner, len(self.failed_steps),
                        len(total), missing_summary(self.failed_steps), where)

    def close(self) -> None:
        """Flush and stop the pipeline and the writer (a later `start` starts new ones)."""
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None
        self.close_writer()


def weights_for_helper(module: torch.nn.Module) -> dict[str, Tensor]:
    """A CPU copy of the model's state at this step, for the helper's faithfulness forwards."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def missing_summary(missing: dict[int, str], most: int = 10) -> str:
    """``step N (reason); ...`` for at most ``most`` steps, then how many more."""
    steps = sorted(missing)
    text = "; ".join(f"step {s} ({missing[s]})" for s in steps[:most])
    return text + (f"; and {len(steps) - most} more" if len(steps) > most else "")


def _small_copy(module: torch.nn.Module) -> bool:
    weights = sum(t.numel() * t.element_size() for t in module.state_dict().values()
                  if isinstance(t, Tensor))
    try:
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return weights <= 64 * 2**20  # no /proc: a fixed 64 MiB
    return weights <= OFFLOAD_MEMORY_SHARE * resident


def _picklable(module: Any) -> bool:
    try:
        pickle.dumps(module)
    except Exception:  # noqa: BLE001 - hooks, lambdas, open handles: measured here instead
        return False
    return True
