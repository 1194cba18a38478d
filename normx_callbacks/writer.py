"""The snapshot writer: what a measured snapshot becomes.

`SnapshotWriter` turns a `Snapshot` (what the training thread measured) into metrics with
intervals, the store's tables and the loggers' media, writes the store (a failed write is
kept and retried before the next one; what cannot be written is recorded as missing, and
every step given up on is reported back in `Written`) and, when it holds a copy of the model,
runs the faithfulness forwards and the gradient reference of alignment on it. It runs in the
helper process (`helper.py`) or on the pipeline's thread in the training process
(`pipeline.py`); the engine's execution backend (`execution.py`) decides which.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
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


@dataclass
class Written:
    """What the writer did: one snapshot's results (``process``), or a retry."""

    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    media: list[tuple] = field(default_factory=list)
    failed: str | None = None  # why this snapshot is missing
    # Steps whose write failed and which the writer holds in memory for a retry, and steps
    # it gave up on (with why) during this call: the training process keeps both, so a
    # helper that dies, or a store that can no longer record anything, loses none silently.
    held: list[int] = field(default_factory=list)
    lost: dict[int, str] = field(default_factory=dict)


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
        # Missing records the store refused (a full disk): written at the next chance.
        self.unrecorded: dict[int, str] = {}
        self.faithfulness = faithfulness
        self._adapter = None
        self._lost: dict[int, str] = {}  # given up since the last reply
        self._unrecorded_warned: set[int] = set()

    # ------------------------------------------------------------------ calls

    def use_store(self, root: str, run_meta: dict) -> None:
        self.store = SnapshotStore(root, run_meta=run_meta)
        if self.builder.reference is None:  # a resumed run: its first snapshot's alignment
            self.builder.reference = reference_from_store(self.store)

    def set_state(self, state: dict) -> None:
        self.builder.prev_norms = state["prev_norms"]
        self.builder.prev_scores = state["prev_scores"]

    def process(self, snap: Snapshot) -> Written:
        """Build, write and prepare the media of ``snap`` (whose ``weights``, when given, are
        the model's state at its step, for the faithfulness forwards run here)."""
        start = time.perf_counter()
        if snap.error is not None:
            return self._reply(snap.step, failed=self._failed(snap.step, snap.error))
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
            return self._reply(snap.step, failed=self._failed(
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
        return self._reply(snap.step, built.metrics, media, failed)

    def retry(self, last_chance: bool = False) -> Written:
        """Write the snapshots whose write failed (and the missing records the store
        refused); on the last chance, give up on the rest."""
        if self.store is not None:
            self._record_pending()
            for step in list(self.unwritten):
                try:
                    self.store.write(step, self.unwritten[step])  # clears its missing record
                except OSError as error:
                    if last_chance:
                        del self.unwritten[step]
                        self._give_up(step, error)
                    continue
                del self.unwritten[step]
                self.unrecorded.pop(step, None)
                log.info("%s: snapshot %d written on retry", self.owner, step)
        return self._reply(-1)

    def mark_missing(self, step: int, reason: str) -> Written:
        self._failed(step, reason)
        return self._reply(step)

    def _reply(self, step: int, metrics: dict | None = None, media: list | None = None,
               failed: str | None = None) -> Written:
        lost, self._lost = self._lost, {}
        return Written(step, metrics or {}, media or [], failed, list(self.unwritten), lost)

    # ------------------------------------------------------------------ inside

    def _faithfulness(self, weights: dict) -> list[pd.DataFrame]:
        from .discovery import find_model

        spec = self.faithfulness
        spec.model.load_state_dict(weights)
        if self._adapter is None:
            self._adapter = find_model(spec.model, who=self.owner)
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
            # Recorded now, so a run killed before the retry still says what it lacks; the
            # record is replaced when the step is given up on, and removed when it is written.
            self._mark(step, f"write failed: {error}; kept in memory for a retry at the next "
                             "snapshot and at the end of training (a successful retry removes "
                             "this record)")
            while len(self.unwritten) > MAX_UNWRITTEN:
                oldest = next(iter(self.unwritten))
                del self.unwritten[oldest]
                self._give_up(oldest, error)
        return None

    def _give_up(self, step: int, error: OSError) -> None:
        log.warning("%s: snapshot %d could not be written after retries (%s); recorded as "
                    "missing", self.owner, step, error)
        self._lost[step] = self._mark(step, f"write failed after retries: {error}")

    def _failed(self, step: int, reason: str) -> str:
        log.warning("%s: snapshot at step %d failed (%s); recorded as missing", self.owner,
                    step, reason)
        self._lost[step] = reason
        return self._mark(step, reason)

    def _mark(self, step: int, reason: str) -> str:
        """Record ``step`` as missing in the store, or keep the record for the next chance
        when the store refuses it (a full disk)."""
        self.unrecorded[step] = reason
        self._record_pending()
        return reason

    def _record_pending(self) -> None:
        if self.store is None:
            return
        for step, reason in list(self.unrecorded.items()):
            try:
                self.store.mark_missing(step, reason)
            except OSError as error:
                if step not in self._unrecorded_warned:
                    self._unrecorded_warned.add(step)
                    log.warning("%s: the store at %s cannot record that snapshot %d is "
                                "missing (%s); tried again at the next snapshot, and the end "
                                "of training lists it", self.owner, self.store.root, step,
                                error)
                return
            del self.unrecorded[step]


