"""The engine: probes in, snapshots out to the store and the loggers, with no Trainer in it.

Every driver runs the same engine: the Lightning callback (`callback.py`), the Fabric /
plain-loop monitor (`monitor.py`) and `normx replay` (`replay.py`). A driver

1. builds an `Engine` from the probes and one `settings.Settings` (checked at once: bad
   input fails before any training step);
2. calls `prepare(adapter, tokenizer, ...)` once the model exists, which encodes the probes
   for it and fixes what a snapshot measures (`measure.prepare_measurement`);
3. on rank 0, calls `open_run(...)` to choose the store and record the run
   (`catalog.choose_store`);
4. feeds every training batch to `count(batch)` and calls `snapshot(step)` at the steps
   `due(step)` names (every rank together in a distributed run);
5. calls `flush()` before a checkpoint is saved and `finish()` / `close()` when training
   ends.

The engine composes three parts, one concept each: `measure.Measurement` takes a snapshot
on the training thread (what needs the weights at that step), `execution.Execution` hands it
to the writer (in the helper process or this one, behind the pipeline's thread) and keeps
what comes back, and `embeddings.TokenCounter` counts the tokens training sees. The engine
itself holds the run's identity, notices a model that changed under it, and keeps the
resume state.

Past 400 lines as one module: the composition of the parts above; most of its length is the
contracts (run record, resume state, flush) in docstrings.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .adapters import ModelAdapter, UnsupportedModelError, model_signature, verify_adapter
from .attribution import Attribution
from .catalog import choose_store, new_run_record
from .discovery import resolve_adapter
from .embeddings import PairCounts, TokenCounter
from .execution import Execution, weights_for_helper
from .measure import Measurement, check_mode, prepare_measurement
from .probes import ProbeSet
from .settings import Settings
from .sharding import class_name
from .snapshot import ProbeContext, Snapshot
from .store import SnapshotStore, read_run_record, write_run_record

log = logging.getLogger(__name__)


class Engine:
    """The measurement and everything after it, for one run (see the module docstring).

    Args:
        probes: what `ProbeSet.coerce` takes (None: set `probes` before `prepare`).
        settings: every option (`settings.Settings`; default its defaults).
        owner: who the messages name (the driver).
    """

    def __init__(self, probes: ProbeSet | Sequence | str | os.PathLike | None = None,
                 settings: Settings | None = None, *,
                 owner: str = "NormXLogitCallback") -> None:
        self.owner = owner
        self.settings = settings if settings is not None else Settings()
        self.probes = None if probes is None else ProbeSet.coerce(probes)
        self.schedule = self.settings.snapshot_schedule()
        self.execution = Execution(self.settings, owner)
        self.measurement: Measurement | None = None
        self.adapter: ModelAdapter | None = None
        self.counter: TokenCounter | None = None
        self.snapshot_steps: list[int] = []  # measured, in order (the writer may still fail)
        self.run: dict | None = None  # run.json of the store being written (rank zero)
        self.run_meta: dict = {}
        self.is_writer = True
        self._count_checked = False
        # What `prepare` was given, to read the model again when it changes during a fit.
        self._prepared_with: dict[str, Any] = {}
        self._encoded_for: tuple | None = None
        self._signature: tuple = ()
        self._unreadable: str | None = None  # why the changed model cannot be read, if so

    # Results, read through the parts that hold them.
    ctx: ProbeContext | None = property(
        lambda self: self.measurement.ctx if self.measurement is not None else None)
    store: SnapshotStore | None = property(lambda self: self.execution.store)
    last_metrics: dict[str, float] = property(lambda self: self.execution.last_metrics)
    last_attribution: Attribution | None = property(
        lambda self: self.execution.last_attribution)
    # Every snapshot that is missing, with why (a record the store could not take too).
    failed_steps: dict[int, str] = property(lambda self: self.execution.failed_steps)

    @property
    def prepared(self) -> bool:
        return self.measurement is not None

    @property
    def helper_pid(self) -> int | None:
        """The pid of the snapshot helper process this engine writes through, or None (not
        started, or the work runs in this process): for monitoring, and for fault tests."""
        helper = self.execution.helper
        return helper.process.pid if helper is not None else None

    @property
    def held_steps(self) -> list[int]:
        """Steps whose write failed and that the writer holds for a retry."""
        return sorted(self.execution.held)

    # ------------------------------------------------------------------ setup

    def check_mode(self, mode: str) -> None:
        """Refuse, before any training step, what a distribution mode cannot do."""
        check_mode(self.settings, mode, self.owner)

    def prepare(self, adapter: ModelAdapter, tokenizer: Any, *, loggers: Sequence = (),
                mode: str = "single", is_writer: bool = True,
                forward_context: Callable[[], AbstractContextManager] | None = None,
                plain_precision: bool | None = None) -> None:
        """Encode the probes for the model and fix what a snapshot needs.

        Args:
            adapter: the model, read (`resolve_adapter`, `discover_adapter`) or hand-built.
            tokenizer: the run's tokenizer (fast HF tokenizer).
            loggers: Lightning or Fabric loggers the snapshots go to.
            mode: "single" (one process writes), "shared" (DDP: every rank measures a share
                of the probes, rank 0 gathers and writes) or "collective" (FSDP2: every rank
                runs every probe so the sharded all-gathers match; rank 0 writes).
            is_writer: whether this process writes the store and the loggers (rank 0).
            forward_context: the run's precision context (autocast) for the probe forwards.
            plain_precision: whether the forwards run in the model's own dtype (no autocast);
                only then may the faithfulness forwards run on a copy of the model in the
                helper process. Default: when no ``forward_context`` is given.
        """
        self.flush()  # the writer's state is read below
        self._prepared_with = dict(tokenizer=tokenizer, loggers=loggers, mode=mode,
                                   is_writer=is_writer, forward_context=forward_context,
                                   plain_precision=plain_precision)
        if self.probes is None:
            raise RuntimeError(f"{self.owner} has no probes: pass probes=[...] (texts, dicts, a "
                               "ProbeSet, a YAML/JSONL path or 'blimp:PATH')")
        measurement = prepare_measurement(adapter, tokenizer, self.probes, self.settings,
                                          owner=self.owner, mode=mode,
                                          forward_context=forward_context)
        self.measurement, self.adapter, self.is_writer = measurement, adapter, is_writer
        self._encoded_for = _encoding_key(adapter)
        self._signature = model_signature(adapter.module)
        self._unreadable = None
        self._new_counter(adapter, tokenizer, measurement.ctx.objective)
        frozen = not adapter.embedding.weight.requires_grad
        name = class_name(adapter.module) if adapter.module is not None else None
        if frozen and is_writer:
            log.warning("%s: the input embedding of %s is frozen (requires_grad=False, as with "
                        "PEFT/LoRA or a frozen base): its norms, embedding/drift and the "
                        "norm-frequency correlations stay as they are during this run; "
                        "NormXLogit still moves with the layers that train", self.owner,
                        name or "the model")
        s = self.settings
        self.run_meta = {
            "objective": measurement.ctx.objective,
            "embedding_frozen": frozen,
            "norm": s.norm,
            "layers": s.layer_list,
            "model": name,
            "num_layers": adapter.num_layers,
            "vocab_size": adapter.embedding.num_embeddings,
            "tied_embeddings": adapter.tied,
            "probes": len(self.probes),
        }
        if is_writer:
            if plain_precision is None:
                plain_precision = forward_context is None
            self.execution.start(measurement.ctx, loggers, adapter, mode, plain_precision,
                                 measurement.replacement, measurement.alignment_methods,
                                 self.run_meta)

    def _new_counter(self, adapter: ModelAdapter, tokenizer: Any, objective: str) -> None:
        s, vocab = self.settings, adapter.embedding.num_embeddings
        counter = TokenCounter(vocab, batch_key=s.batch_key, mask_key=s.mask_key,
                               masked=objective == "masked",
                               mask_token_id=getattr(tokenizer, "mask_token_id", None),
                               count_fn=s.count_fn)
        counter.device = adapter.embedding.weight.device
        if self.counter is not None:  # loaded from a checkpoint, or counted in an earlier fit
            if self.counter.vocab_size != vocab:
                log.warning("%s: the vocabulary has %d rows now, %d before (a resized "
                            "embedding): token and next-token counts go on for ids below %d",
                            self.owner, vocab, self.counter.vocab_size,
                            min(vocab, self.counter.vocab_size))
            counter.carry_from(self.counter)
        self.counter = counter
        self._count_checked = False

    def use_model(self, adapter: ModelAdapter) -> None:
        """Measure another model of the same shape with the probes as encoded (a replayed
        checkpoint): no flush, the writer goes on with the snapshots before."""
        if _encoding_key(adapter) != self._encoded_for:
            raise ValueError(f"another model shape (kind, layers, vocabulary, tied, mask, "
                             f"context: {_encoding_key(adapter)}) than the one the probes were "
                             f"encoded for ({self._encoded_for})")
        self.adapter = adapter
        self.measurement = self.measurement.with_model(adapter)
        self._signature = model_signature(adapter.module)
        self.counter.device = adapter.embedding.weight.device

    def release_model(self) -> None:
        """Drop the references to the model (the writer needs none)."""
        self.adapter = None
        self.measurement = self.measurement.with_model(None)

    # ------------------------------------------------------------------ run identity

    def open_run(self, root: Path, *, restored: dict | None, loggers: Sequence = (),
                 going_on: bool = False) -> None:
        """Choose the store of this run and record the run (``run.json``); writer only.
        See `catalog.choose_store`: a resume writes into the store it came from, a driver
        fitting on keeps its store, a fresh run claims one."""
        self.flush()
        choice = choose_store(root, restored=restored, current=self.run, going_on=going_on,
                              loggers=loggers, owner=self.owner)
        if choice is not None:
            self._use_store(*choice)

    def append_to(self, root: Path) -> None:
        """Write into the store at ``root``, going on with the run recorded there (a new run
        when there is none): a replay that resumes, or adds steps, appends to its store."""
        self._use_store(root, read_run_record(root) or new_run_record(), False)

    def _use_store(self, root: Path, run: dict, claimed: bool) -> None:
        store = SnapshotStore(root, run_meta=self.run_meta)
        if not claimed:
            write_run_record(root, run)
        self.run = run
        self.execution.use_store(store)

    def truncate_after(self, step: int) -> None:
        """Drop snapshots a killed run wrote after its last checkpoint (they are re-taken)."""
        self.flush()
        if self.store is not None:
            self.store.truncate_after(step)

    # ------------------------------------------------------------------ counting

    def count(self, batch: Any) -> None:
        """Count one training batch's tokens (on its device, no host sync)."""
        self.counter.update(batch)

    def check_counted(self, batch: Any) -> None:
        """Once per fit, after the first batch: one host sync, so a batch format the counter
        cannot read (or ids outside the vocabulary) do not leave counts wrong without a
        word."""
        if self._count_checked:
            return
        self._count_checked = True
        problem = self.counter.first_batch_problem(batch)
        if problem:
            log.warning("%s: %s", self.owner, problem)

    def collect_counts(self) -> Tensor:
        """Fold the counted batches into the counts, summed over ranks (every rank calls);
        the next-token pairs are summed on the writer (rank 0) only."""
        reduce = gather = None
        world = self.measurement.world if self.measurement is not None else 1
        if world > 1:
            rank = self.measurement.rank

            def reduce(t: Tensor) -> Tensor:
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
                return t

            def gather(mine: tuple) -> list | None:
                box = [None] * world if rank == 0 else None
                torch.distributed.gather_object(mine, box, dst=0)
                return box
        return self.counter.collect(reduce, gather)

    def set_counts(self, counts: Tensor, pairs: PairCounts | None = None) -> None:
        """Counts known otherwise than from training batches (a replay's `--count-corpus`)."""
        self.counter.counts = counts.clone()
        if pairs is not None:
            self.counter.pair_keys, self.counter.pair_counts, _ = pairs

    # ------------------------------------------------------------------ snapshot

    def due(self, step: int) -> bool:
        return step in self.schedule

    def snapshot(self, step: int, *, final: bool = False) -> None:
        """Measure at ``step`` (every rank together when distributed) and hand the snapshot
        to the writer. Never raises for a probe: a failure is recorded as missing."""
        start = time.perf_counter()
        changed = self._reread_if_changed()  # on every rank alike: the signature is local
        execution = self.execution
        if self.is_writer:
            execution.ensure()  # here, on the training thread: never forked from the pipeline
        counts = self.collect_counts()
        measurement = self.measurement
        faith_due = False
        if changed is not None:
            snap = Snapshot(step, final, error=changed)
        elif measurement.mode == "single":
            faith_due = self._faithfulness_due(final)
            offload = faith_due and execution.offload_faithfulness
            snap = measurement.take(step, final, faith_due and not offload)
            if offload and snap.error is None:  # the helper runs them on a copy of the model
                snap.weights = weights_for_helper(self.adapter.module)
        else:
            faith_due = self._broadcast(self._faithfulness_due(final)
                                        if measurement.rank == 0 else None)
            snap = measurement.take_distributed(step, final, faith_due)
        if not self.is_writer or snap is None:
            return
        if (faith_due and snap.error is None and snap.weights is None
                and measurement.alignment_methods):
            snap.gradient = measurement.gradient_alignment()  # here: not in the helper
        snap.counts = counts.clone()
        snap.pairs = self.counter.pairs()  # new tensors at every collect: no copy needed
        snap.train_seconds = time.perf_counter() - start
        if snap.error is None:
            self.snapshot_steps.append(step)
        execution.submit(snap)

    def _reread_if_changed(self) -> str | None:
        """Read the model again if it changed since it was read (`model_signature`: new
        embedding or head modules, other shapes, another tie), e.g. after
        `resize_token_embeddings` during a fit: the adapter is resolved and verified again
        and the probes encoded again; None when the snapshot can go on. If the model can no
        longer be read, the reason, naming the change, for the step's missing record."""
        module = self.adapter.module
        signature = model_signature(module)
        if signature == self._signature:
            return self._unreadable
        change = _describe_change(self._signature, signature)
        self.collect_counts()  # batches counted with the old vocabulary, folded in first
        old = self._encoded_for
        try:
            if self.adapter.resolved:
                adapter = resolve_adapter(module)
            else:
                verify_adapter(self.adapter)
                adapter = self.adapter
            self.prepare(adapter, **self._prepared_with)
        except (UnsupportedModelError, RuntimeError, ValueError) as error:
            self._signature = signature  # reported once per change, not at every step
            reason = (f"the model changed since it was read ({change}) and cannot be read "
                      f"again: {type(error).__name__}: {error}")
            log.warning("%s: %s; snapshots are recorded as missing until it can be",
                        self.owner, reason)
            self._unreadable = reason
            return reason
        log.warning("%s: the model changed since it was read (%s; vocabulary %d -> %d rows); "
                    "it was read and verified again and the probes encoded again for it",
                    self.owner, change, old[2], self._encoded_for[2])
        return None

    def _faithfulness_due(self, final: bool) -> bool:
        every = self.settings.faithfulness_every
        return bool(every) and (final or len(self.snapshot_steps) % every == 0)

    def _broadcast(self, value: Any) -> Any:
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------------------------ flushing

    def flush(self) -> None:
        """Wait until every snapshot taken so far is written and logged."""
        self.execution.flush()

    def finish(self) -> None:
        """End of training: flush, a last try at writes that failed, and one warning that
        lists every missing snapshot."""
        self.execution.finish(self.snapshot_steps)

    def close(self) -> None:
        """Flush and stop the pipeline and the writer (a later `prepare` starts new ones)."""
        self.execution.close()

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (flushes first: a checkpoint is never ahead of the
        snapshots before it)."""
        self.flush()
        latest = self.execution.latest or {}
        return {
            "snapshot_steps": list(self.snapshot_steps),
            "counts": None if self.counter is None else self.counter.state_dict(),
            "prev_norms": latest.get("prev_norms"),
            "prev_scores": latest.get("prev_scores"),
            # A resume writes into this run's store, wherever its new logger writes.
            "run_id": self.run["run_id"] if self.run else None,
            "store": str(self.store.root.resolve()) if self.store is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshot_steps = list(state["snapshot_steps"])
        if state["counts"] is not None:
            # Restored after setup: keep the counter setup configured for this batch format.
            if self.counter is None or self.counter.vocab_size != state["counts"]["vocab_size"]:
                self.counter = TokenCounter(state["counts"]["vocab_size"])
            self.counter.load_state_dict(state["counts"])
            self.counter.pending = None  # the checkpoint's counts hold what was pending then
        self.execution.set_latest({"prev_norms": state["prev_norms"],
                                   "prev_scores": state["prev_scores"]})


def _encoding_key(adapter: ModelAdapter) -> tuple:
    """What the encoded probes and the measurement depend on: a model that differs in any
    of these needs `prepare` again."""
    return (adapter.kind, adapter.num_layers, adapter.embedding.num_embeddings, adapter.tied,
            adapter.accepts_mask, adapter.context_length)


def _describe_change(before: tuple, after: tuple) -> str:
    """What differs between two `model_signature`s, in words."""
    parts = []
    if len(before) == 3 and len(after) == 3:
        old_ids, new_ids = set(before[0]), set(after[0])
        if old_ids != new_ids:
            parts.append(f"{len(new_ids - old_ids)} module(s) replaced or added")
        shapes = [f"{tuple(a)} -> {tuple(b)}" for a, b in zip(before[1], after[1], strict=False)
                  if a != b]
        if len(before[1]) != len(after[1]):
            shapes.append(f"{len(before[1])} -> {len(after[1])} embedding/linear weights")
        if shapes:
            parts.append("weight shapes " + ", ".join(shapes[:3]))
        if before[2] != after[2] and None not in (before[2], after[2]):
            parts.append("head tied" if after[2] else "head untied")
    text = "; ".join(parts) or "its modules changed"
    return text + " (resize_token_embeddings?)" if any("shapes" in p for p in parts) else text
