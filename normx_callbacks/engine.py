"""The engine: probes in, snapshots out to the store and the loggers, with no Trainer in it.

Every driver runs the same engine: the Lightning callback (`callback.py`), the Fabric /
plain-loop monitor (`monitor.py`) and `normx replay` (`replay.py`). A driver

1. builds an `Engine` from the user's arguments (checked at once: bad input fails before
   any training step);
2. calls `prepare(adapter, tokenizer, ...)` once the model exists, which encodes the probes
   for it and fixes everything the builders need (`snapshot.ProbeContext`);
3. on rank 0, calls `open_run(...)` to choose the store and record the run (`run.json`);
4. feeds every training batch to `count(batch)` and calls `snapshot(step)` at the steps
   `due(step)` names (every rank together in a distributed run);
5. calls `flush()` before a checkpoint is saved and `close()` when training ends.

`snapshot(step)` does on the calling (training) thread only what needs the model's weights
at that step: the probe forward inside the run's precision context with every RNG saved and
restored, the embedding row norms and, when due, the faithfulness forwards, all moved to the
CPU (a `snapshot.Snapshot`). The snapshot worker (`pipeline.Pipeline`) then builds metrics and
tables, writes the store (retrying a failed write at the next snapshot) and calls the
loggers, while training goes on.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .adapters import ModelAdapter, UnsupportedModelError, model_signature, resolve_adapter
from .attribution import NORMS, Attribution, _resolve_layers, normxlogit
from .embeddings import TokenCounter, embedding_norms
from .faithfulness import REPLACEMENTS, faithfulness_rows, resolve_replacement, special_token_mask
from .loggers import WANDB_LOGGER_TYPES, SnapshotLogger
from .methods import FORWARD_METHODS, GRADIENT_METHODS, METHODS, require_captum
from .pipeline import Pipeline
from .probes import ProbeSet
from .probes import _readable as readable_tokens
from .schedule import SnapshotSchedule
from .sharding import class_name
from .snapshot import ProbeContext, Snapshot
from .store import (
    SnapshotStore,
    claim_run_record,
    holds_snapshots,
    read_run_record,
    sibling_root,
    write_run_record,
)
from .worker import Faithfulness, HelperDied, HelperProcess, SnapshotWriter, Written

log = logging.getLogger(__name__)

MODES = ("single", "shared", "collective")
WORKERS = ("process", "thread")


@contextmanager
def preserved_rng():
    """Snapshots must not shift any random stream the training run draws from."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _positive(name: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        kind = "positive" if least else "non-negative"
        raise ValueError(f"{name}={value!r} must be a {kind} integer")


class Engine:
    """The measurement and everything after it, for one run (see the module docstring).

    The arguments are `NormXLogitCallback`'s, which documents them; ``owner`` names the
    driver in messages. ``max_pending`` bounds how many snapshots wait for the worker.
    """

    def __init__(
        self,
        probes: ProbeSet | Sequence | str | os.PathLike | None = None,
        *,
        schedule: str = "log",
        every_n_steps: int = 100,
        steps: Sequence[int] | None = None,
        log_base: int = 2,
        layers: str | Sequence[int] | None = "all",
        norm: str = "layer0",
        objective: str = "auto",
        track_tokens: Sequence[str] = (),
        top_k: int = 20,
        batch_key: str | int = "input_ids",
        mask_key: str | int | None = "attention_mask",
        count_fn: Callable[[Any], Tensor] | None = None,
        media_probes: int = 2,
        probe_batch_size: int = 32,
        history_length: int = 64,
        faithfulness_every: int | None = 4,
        faithfulness_methods: Sequence[str] = FORWARD_METHODS,
        faithfulness_probes: int = 16,
        faithfulness_replacement: str = "auto",
        max_pending: int = 8,
        worker: str = "process",
        owner: str = "NormXLogitCallback",
    ) -> None:
        self.owner = owner
        self.probes = None if probes is None else ProbeSet.coerce(probes)
        self.schedule = SnapshotSchedule(schedule, every_n_steps=every_n_steps, steps=steps,
                                         base=log_base)
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not one of {NORMS}")
        if objective not in ("auto", "causal", "masked"):
            raise ValueError(f"objective={objective!r} is not one of ('auto', 'causal', 'masked')")
        if isinstance(layers, str) and layers != "all":
            raise ValueError(f"layers={layers!r}: use 'all', None or a list of layer indices")
        if isinstance(layers, (list, tuple)) and (
            not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
        ):
            raise ValueError(f"layers={layers!r}: use 'all', None or a non-empty list of layer "
                             "indices (ints)")
        for name, value in (("top_k", top_k), ("media_probes", media_probes),
                            ("history_length", history_length)):
            _positive(name, value, 0)
        for name, value in (("probe_batch_size", probe_batch_size),
                            ("faithfulness_probes", faithfulness_probes),
                            ("faithfulness_every", faithfulness_every or 1),
                            ("max_pending", max_pending)):
            _positive(name, value, 1)
        unknown = [m for m in faithfulness_methods if m not in METHODS]
        if unknown or not faithfulness_methods:
            raise ValueError(f"faithfulness_methods={list(faithfulness_methods)!r}: unknown "
                             f"{unknown}; valid names are {METHODS}")
        if faithfulness_replacement not in REPLACEMENTS:
            raise ValueError(f"faithfulness_replacement={faithfulness_replacement!r} is not one "
                             f"of {REPLACEMENTS}")
        if worker not in WORKERS:
            raise ValueError(f"worker={worker!r} is not one of {WORKERS}")
        if count_fn is not None and not callable(count_fn):
            raise ValueError(f"count_fn={count_fn!r} must be a callable batch -> token ids")
        self.layers = list(layers) if isinstance(layers, (list, tuple)) else layers
        self.norm = norm
        self.objective = objective
        self.track_tokens = list(track_tokens)
        self.top_k = top_k
        self.batch_key = batch_key
        self.mask_key = mask_key
        self.count_fn = count_fn
        self.media_probes = media_probes
        self.probe_batch_size = probe_batch_size
        self.history_length = history_length
        self.faithfulness_every = faithfulness_every
        self.faithfulness_methods = tuple(faithfulness_methods)
        self.faithfulness_probes = faithfulness_probes
        self.faithfulness_replacement = faithfulness_replacement
        self.max_pending = max_pending
        self.worker = worker

        # Results of the last snapshot, as plain attributes that tests and users read.
        self.last_metrics: dict[str, float] = {}
        self.last_attribution: Attribution | None = None
        self.snapshot_steps: list[int] = []
        self.store: SnapshotStore | None = None
        self.adapter: ModelAdapter | None = None
        self.ctx: ProbeContext | None = None
        self.counter: TokenCounter | None = None
        self.writer: SnapshotWriter | None = None  # where snapshots are built and written
        self.pipeline: Pipeline | None = None
        self.run: dict | None = None  # run.json of the store being written (rank zero)
        self.run_meta: dict = {}
        self.mode = "single"
        self.rank, self.world = 0, 1
        self.is_writer = True
        self._forward_context: Callable[[], AbstractContextManager] = nullcontext
        self._logger: SnapshotLogger | None = None
        self._helper: HelperProcess | None = None
        self._writer_args: tuple | None = None
        self._writer_pending = False  # prepared, not started yet (see `_ensure_writer`)
        self._offload_faithfulness = False
        # The last built (or restored) snapshot's norms and scores: drift and stability of
        # the next one, a writer rebuilt after the helper died, and the resume state.
        self._latest: dict | None = None
        self._count_checked = False
        self.failed_steps: dict[int, str] = {}  # step -> why its snapshot is missing
        # What `prepare` was given, to read the model again when it changes during a fit.
        self._prepared_with: dict[str, Any] = {}
        self._signature: tuple = ()
        self._unreadable: str | None = None  # why the changed model cannot be read, if so
        self._held: set[int] = set()  # steps the writer holds for a retry (failed writes)

    # ------------------------------------------------------------------ setup

    def check_methods_for(self, mode: str) -> None:
        if mode == "collective":
            gradient = [m for m in self.faithfulness_methods if m in GRADIENT_METHODS]
            if self.faithfulness_every and gradient:
                raise RuntimeError(
                    f"{self.owner}: faithfulness_methods {gradient} need a backward pass, "
                    "which under ModelParallelStrategy would reduce gradients into the sharded "
                    "parameters; use the forward-only methods there")

    def prepare(self, adapter: ModelAdapter, tokenizer: Any, *, loggers: Sequence = (),
                mode: str = "single", is_writer: bool = True,
                forward_context: Callable[[], AbstractContextManager] | None = None,
                plain_precision: bool | None = None) -> None:
        """Encode the probes for the model and fix what the builders need.

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
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        self.flush()  # the worker's builder state is read below
        self._prepared_with = dict(tokenizer=tokenizer, loggers=loggers, mode=mode,
                                   is_writer=is_writer, forward_context=forward_context,
                                   plain_precision=plain_precision)
        if self.probes is None:
            raise RuntimeError(f"{self.owner} has no probes: pass probes=[...] (texts, dicts, a "
                               "ProbeSet, a YAML/JSONL path or 'blimp:PATH')")
        self.check_methods_for(mode)
        self.mode = mode
        self.is_writer = is_writer
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank = torch.distributed.get_rank()
            self.world = torch.distributed.get_world_size()
        self._forward_context = forward_context or nullcontext
        if adapter.num_layers is None:
            raise RuntimeError(f"{self.owner}: the ModelAdapter's num_layers is not set; pass "
                               "ModelAdapter(..., num_layers=L)")
        try:
            _resolve_layers(self.layers, adapter.num_layers)
        except ValueError as error:
            # Caught here, not at the first snapshot (which would record every one as missing).
            raise ValueError(f"{self.owner}: {error}") from None
        objective = self.objective
        if objective == "auto":
            if adapter.kind not in ("causal", "masked"):
                raise RuntimeError(
                    f"{self.owner} instruments language-model pre-training, but the model is a "
                    f"{adapter.kind} model; use normxlogit() directly for classifiers")
            objective = adapter.kind
        vocab = adapter.embedding.num_embeddings
        if len(tokenizer) > vocab:
            raise RuntimeError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                f"{vocab} rows: pass the tokenizer the model was built for")
        self.adapter = adapter
        self._adapter_shape = _shape(adapter)
        self._signature = model_signature(adapter.module)
        self._unreadable = None
        encoded = self.probes.encode(tokenizer, objective=objective,
                                     max_length=adapter.context_length)
        self.ctx = ProbeContext(
            encoded=encoded,
            objective=objective,
            # One rule for special tokens: never ranked by alignment, never removed by AOPC.
            protect=special_token_mask(encoded.input_ids, tokenizer),
            tokens=encoded.tokens,
            token_strings=tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))),
            text_of=partial(readable_tokens, tokenizer),
            track_ids=self._resolve_tracked(tokenizer),
            num_layers=adapter.num_layers,
            faithfulness_methods=self.faithfulness_methods,
            top_k=self.top_k,
            tied=adapter.tied,
        )
        if self.faithfulness_every:
            self._prepare_faithfulness(tokenizer)
        counter = TokenCounter(vocab, batch_key=self.batch_key, mask_key=self.mask_key,
                               masked=objective == "masked",
                               mask_token_id=getattr(tokenizer, "mask_token_id", None),
                               count_fn=self.count_fn)
        counter.device = adapter.embedding.weight.device
        if self.counter is not None:  # loaded from a checkpoint, or counted in an earlier fit
            kept = min(vocab, self.counter.vocab_size)
            counter.counts[:kept] = self.counter.counts[:kept]
            if self.counter.vocab_size != vocab:
                log.warning("%s: the vocabulary has %d rows now, %d before (a resized "
                            "embedding): token counts go on for ids below %d%s", self.owner,
                            vocab, self.counter.vocab_size, kept,
                            f"; counts of ids {kept}.. are dropped" if vocab < kept else "")
        self.counter = counter
        self._count_checked = False
        frozen = not adapter.embedding.weight.requires_grad
        if frozen and is_writer:
            log.warning("%s: the input embedding of %s is frozen (requires_grad=False, as with "
                        "PEFT/LoRA or a frozen base): its norms, embedding/drift and the "
                        "norm-frequency correlations stay as they are during this run; "
                        "NormXLogit still moves with the layers that train", self.owner,
                        class_name(adapter.module) if adapter.module is not None else "the model")
        self.run_meta = {
            "objective": objective,
            "embedding_frozen": frozen,
            "norm": self.norm,
            "layers": self.layers,
            "model": class_name(adapter.module) if adapter.module else None,
            "num_layers": adapter.num_layers,
            "vocab_size": vocab,
            "tied_embeddings": adapter.tied,
            "probes": len(self.probes),
        }
        if is_writer:
            if plain_precision is None:
                plain_precision = forward_context is None
            self._start_writer(loggers, adapter, mode, plain_precision)
            if self.pipeline is None:
                self.pipeline = Pipeline(self._job_failed, max_pending=self.max_pending)

    def _prepare_faithfulness(self, tokenizer: Any) -> None:
        gradient = [m for m in self.faithfulness_methods if m in GRADIENT_METHODS]
        if gradient:
            require_captum(gradient[0])  # a missing optional backend fails here, not mid-run
        self.replacement = resolve_replacement(tokenizer, self.faithfulness_replacement,
                                                attention=self.adapter.accepts_mask)
        if self.faithfulness_replacement == "auto" and self.replacement.strategy in (
                "unk", "pad"):
            log.warning("%s: the tokenizer has no mask or eos token and the model takes no "
                        "attention mask, so faithfulness replaces tokens with %s %r, which "
                        "training may never have shown the model; pass "
                        "faithfulness_replacement= to choose", self.owner,
                        self.replacement.strategy, self.replacement.token)
        if self.replacement.strategy == "attention" and not self.adapter.accepts_mask:
            raise ValueError(f"{self.owner}: faithfulness_replacement resolves to 'attention' "
                             "but the model takes no attention mask; pass "
                             "faithfulness_replacement='eos' (or another token)")

    def _resolve_tracked(self, tokenizer: Any) -> dict[str, int]:
        tracked = {}
        for word in self.track_tokens:
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise RuntimeError(
                    f"track_tokens: {word!r} is not a single token for this tokenizer "
                    f"(it splits into {len(ids)}); track single-token words")
            tracked[word] = ids[0]
        return tracked

    @property
    def prepared(self) -> bool:
        return self.ctx is not None

    @property
    def helper_pid(self) -> int | None:
        """The pid of the snapshot helper process this engine writes through, or None (not
        started, or the work runs in this process): for monitoring, and for fault tests."""
        return self._helper.process.pid if self._helper is not None else None

    def use_model(self, adapter: ModelAdapter) -> None:
        """Measure another model of the same shape with the probes as encoded (a replayed
        checkpoint): no flush, the worker goes on with the snapshots before."""
        if _shape(adapter) != self._adapter_shape:
            raise ValueError(f"another model shape (kind, layers, vocabulary, tied, mask, "
                             f"context: {_shape(adapter)}) than the one the probes were "
                             f"encoded for ({self._adapter_shape})")
        self.adapter = adapter
        self._signature = model_signature(adapter.module)
        self.counter.device = adapter.embedding.weight.device

    def release_model(self) -> None:
        """Drop the reference to the model (the worker needs none)."""
        self.adapter = None

    # ------------------------------------------------------------------ run identity

    def open_run(self, root: Path, *, restored: dict | None, loggers: Sequence = (),
                 going_on: bool = False) -> None:
        """Choose the store of this run and record the run (``run.json``); writer only.

        A resume (``restored``: the run id and store a checkpoint recorded) writes into the
        store of the run it came from; ``going_on`` (the same driver fitting on from steps it
        already took) keeps its store; a fresh run gets a new run id and never writes into
        another run's store: it goes beside it (``<root>-<8 hex>``).
        """
        self.flush()
        if restored is None and self.run is not None and going_on:
            return  # fitting on in memory: the same run, the same store
        if restored is not None and restored.get("run_id"):
            old = Path(restored["store"]) if restored.get("store") else None
            record = read_run_record(old) if old is not None else None
            if record is not None and record["run_id"] == restored["run_id"]:
                self._use_store(old, record)
                return
            run = self._new_run(loggers, continues=restored["run_id"])
            root = self._claim(root, run, quiet=True)
            log.warning("%s: the store of run %s (%s) is gone; this resumed run writes a new "
                        "store at %s that records which run it continues", self.owner,
                        restored["run_id"], old, root)
        else:
            run = self._new_run(loggers, continues=None)
            if restored is not None and read_run_record(root) is None:
                # A checkpoint from before stores recorded their run: its store is this one.
                self._use_store(root, run)
                return
            root = self._claim(root, run)
        self._use_store(root, run, claimed=True)

    def _new_run(self, loggers: Sequence, *, continues: str | None) -> dict:
        described = [{"type": type(lg).__name__, "name": _attr_or_none(lg, "name"),
                      "version": _attr_or_none(lg, "version")} for lg in loggers]
        wandb = [lg["version"] for lg in described if lg["type"] in WANDB_LOGGER_TYPES]
        return {"run_id": uuid.uuid4().hex,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "loggers": described, "wandb_run_id": wandb[0] if wandb else None,
                "continues": continues}

    def _claim(self, root: Path, run: dict, *, quiet: bool = False) -> Path:
        """Claim ``root`` for the new ``run`` (`claim_run_record`: atomic), or the store beside
        it (``<root>-<8 hex>``) when another run has it already: one that ran before, one
        started at the same moment, or an old store without a run record."""
        taken = read_run_record(root) is None and holds_snapshots(root)  # before run records
        if not taken and claim_run_record(root, run):
            return root
        record = read_run_record(root)
        other = record["run_id"] if record else "without a run id"
        beside = sibling_root(root, run["run_id"])
        if not claim_run_record(beside, run):  # a run id is unique: this cannot happen twice
            raise RuntimeError(f"{self.owner}: {beside} already holds a run record")
        if not quiet:
            log.warning("%s: %s holds another run's store (run %s); this run (%s) writes its "
                        "store beside it at %s", self.owner, root, other, run["run_id"],
                        beside)
        return beside

    def _use_store(self, root: Path, run: dict, *, claimed: bool = False) -> None:
        self._ensure_writer()
        self.store = SnapshotStore(root, run_meta=self.run_meta)
        if not claimed:
            write_run_record(root, run)
        self.run = run
        self._call("use_store", str(root), self.run_meta)

    def append_to(self, root: Path) -> None:
        """Write into the store at ``root``, going on with the run recorded there (a new run
        when there is none): a replay that resumes, or adds steps, appends to its store."""
        self._use_store(root, read_run_record(root) or self._new_run((), continues=None))

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
        """Fold the counted batches into the counts, summed over ranks (every rank calls)."""
        reduce = None
        if self.world > 1:
            def reduce(t: Tensor) -> Tensor:
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
                return t
        return self.counter.collect(reduce)

    # ------------------------------------------------------------------ snapshot

    def due(self, step: int) -> bool:
        return step in self.schedule

    def snapshot(self, step: int, *, final: bool = False) -> None:
        """Measure at ``step`` (every rank together when distributed) and hand the snapshot
        to the worker. Never raises for a probe: a failure is recorded as missing."""
        start = time.perf_counter()
        changed = self._reread_if_changed()  # on every rank alike: the signature is local
        self._ensure_writer()  # here, on the training thread: never forked from the worker
        counts = self.collect_counts()
        if changed is not None:
            snap = Snapshot(step, final, error=changed)
        elif self.mode == "single":
            faith_due = self._faithfulness_due(final)
            offload = faith_due and self._offload_faithfulness
            snap = self._measure(step, final, range(len(self.ctx.encoded)),
                                 faith_due and not offload)
            if offload and snap.error is None:  # the helper runs them on a copy of the model
                snap.weights = {k: v.detach().to("cpu", copy=True)
                                for k, v in self.adapter.module.state_dict().items()}
        else:
            faith_due = self._broadcast(self._faithfulness_due(final) if self.rank == 0 else None)
            snap = self._measure_distributed(step, final, faith_due)
        if not self.is_writer or snap is None:
            return
        snap.counts = counts.clone()
        snap.train_seconds = time.perf_counter() - start
        if snap.error is None:
            self.snapshot_steps.append(step)
        self.pipeline.submit(step, self._process, snap)

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
        old = self._adapter_shape
        try:
            adapter = (resolve_adapter(module) if getattr(self.adapter, "resolved", False)
                       else _verified(self.adapter))
            self.prepare(adapter, **self._prepared_with)
        except (UnsupportedModelError, RuntimeError, ValueError) as error:
            self._signature = signature  # reported once per change, not at every step
            reason = (f"the model changed since it was read ({change}) and cannot be read "
                      f"again: {type(error).__name__}: {error}")
            log.warning("%s: %s; snapshots are recorded as missing until it can be",
                        self.owner, reason)
            self._unreadable = reason
            return reason
        self._unreadable = None
        log.warning("%s: the model changed since it was read (%s; vocabulary %d -> %d rows); "
                    "it was read and verified again and the probes encoded again for it",
                    self.owner, change, old[2], self._adapter_shape[2])
        return None

    def _faithfulness_due(self, final: bool) -> bool:
        every = self.faithfulness_every
        return bool(every) and (final or len(self.snapshot_steps) % every == 0)

    def _broadcast(self, value: Any) -> Any:
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def _measure(self, step: int, final: bool, rows: Sequence[int], faith_due: bool,
                 weight: Tensor | None = None) -> Snapshot:
        with preserved_rng():
            try:
                with self._forward_context():
                    attribution = self.attribute(rows)
                faith = (self.faithfulness_parts(range(min(self.faithfulness_probes,
                                                           len(self.ctx.encoded))))
                         if faith_due else None)
                norms = embedding_norms(self.adapter.embedding.weight if weight is None
                                        else weight)
            except Exception as error:  # the training run must never die for a probe
                return Snapshot(step, final, error=f"{type(error).__name__}: {error}")
        return Snapshot(step, final, attribution=attribution, norms=norms, faithfulness=faith)

    def _measure_distributed(self, step: int, final: bool, faith_due: bool) -> Snapshot | None:
        """"shared": each rank measures its share of the probes and of the faithfulness
        probes, rank 0 gathers them in probe order. "collective" (FSDP2): every rank runs
        every probe in the same order, a sharded embedding is gathered on every rank, and
        rank 0 keeps its own result. A rank's failure is sent as an error, so every rank
        reaches the gather and training goes on."""
        n = len(self.ctx.encoded)
        n_faith = min(self.faithfulness_probes, n)
        weight = None
        with preserved_rng():
            try:
                if self.mode == "shared":
                    rows, faith_rows = (_share(n, self.rank, self.world),
                                        _share(n_faith, self.rank, self.world))
                else:
                    rows, faith_rows = list(range(n)), list(range(n_faith))
                    weight = _full_tensor(self.adapter.embedding.weight.detach())
                with self._forward_context():
                    part = self.attribute(rows) if rows else None
                faith = self.faithfulness_parts(faith_rows) if faith_due else None
                mine: object = (rows, part, faith)
            except Exception as error:  # noqa: BLE001 - recorded as missing by rank 0
                mine = RuntimeError(f"rank {self.rank}: {type(error).__name__}: {error}")
        if self.mode == "collective":
            gathered = [mine]
        else:
            gathered = [None] * self.world if self.rank == 0 else None
            torch.distributed.gather_object(mine, gathered, dst=0)
        if self.rank != 0:
            return None
        try:
            attribution, faith = _merge_shares(gathered, faith_due)
            with preserved_rng():
                norms = embedding_norms(self.adapter.embedding.weight if weight is None
                                        else weight)
        except Exception as error:  # noqa: BLE001 - a rank's failure: the step is missing
            return Snapshot(step, final, error=f"{type(error).__name__}: {error}")
        return Snapshot(step, final, attribution=attribution, norms=norms, faithfulness=faith)

    def attribute(self, rows: Sequence[int]) -> Attribution:
        """NormXLogit of the probes at `rows`, on the CPU."""
        adapter = self.adapter
        encoded = self.ctx.encoded
        enc = encoded.select(list(rows)).to(adapter.embedding.weight.device)
        return normxlogit(
            adapter, enc.input_ids, enc.attention_mask, positions=enc.positions,
            targets=enc.targets, foils=enc.foils if bool((encoded.foils >= 0).any()) else None,
            layers=self.layers, norm=self.norm, batch_size=self.probe_batch_size,
        ).cpu()

    def faithfulness_parts(self, rows: Sequence[int]) -> list[pd.DataFrame]:
        """Per-probe AOPC rows of the configured methods on the faithfulness probes at `rows`
        (a subset of the first `faithfulness_probes`). A model that takes no attention mask
        sees padding as text: probes of each length are evaluated apart."""
        rows = list(rows)
        if not rows:
            return []
        subset = self.ctx.encoded.select(rows)
        protect = self.ctx.protect[rows].to(self.adapter.embedding.weight.device)
        groups = ([(list(range(len(subset))), subset)] if self.adapter.accepts_mask
                  else subset.equal_length_groups())
        parts = []
        for group_rows, group in groups:
            with self._forward_context():
                parts.append(faithfulness_rows(
                    self.adapter, group, self.faithfulness_methods,
                    replacement=self.replacement,
                    protect=protect[group_rows][:, : group.input_ids.shape[1]],
                    batch_size=self.probe_batch_size))
        return parts

    # ------------------------------------------------------------------ worker side

    def _start_writer(self, loggers: Sequence, adapter: ModelAdapter, mode: str,
                      plain_precision: bool) -> None:
        """The writer of this fit, in the helper process when it can be (see worker.py)."""
        self._close_writer()
        self._logger = SnapshotLogger(loggers)
        faithfulness = None
        self._offload_faithfulness = False
        if (self.worker == "process" and self.faithfulness_every and mode == "single"
                and plain_precision and adapter.embedding.weight.device.type == "cpu"
                and adapter.module is not None
                and not any(m in GRADIENT_METHODS for m in self.faithfulness_methods)
                and _small_copy(adapter.module) and _picklable(adapter.module)):
            faithfulness = Faithfulness(
                model=adapter.module, methods=self.faithfulness_methods,
                replacement=self.replacement, probes=self.faithfulness_probes,
                batch_size=self.probe_batch_size, accepts_mask=adapter.accepts_mask)
        self._writer_args = ((self.ctx,), dict(
            owner=self.owner, media_probes=self.media_probes,
            history_length=self.history_length, takes_images=self._logger.takes_images,
            has_loggers=bool(self._logger.sink.loggers),
            faithfulness=faithfulness))
        self._writer_pending = True

    def _ensure_writer(self) -> None:
        """Start the writer prepared by `_start_writer` at its first use. The drivers first
        use it on the training thread once training starts (the store is opened, or a
        snapshot is taken): by then Lightning has released a restored checkpoint, which a
        helper forked earlier would keep a copy of (see `worker._release_inherited_tensors`
        for the rest of what it inherits)."""
        if not self._writer_pending:
            return
        self._writer_pending = False
        faithfulness = self._writer_args[1]["faithfulness"]
        if self.worker == "process":
            try:
                self._helper = HelperProcess.shared()
                self._helper.call(id(self), "init", *self._writer_args)
                self._offload_faithfulness = faithfulness is not None
            except Exception as error:  # noqa: BLE001 - this process writes instead
                log.warning("%s: the snapshot helper process is not available (%s: %s); "
                            "snapshots are built in this process", self.owner,
                            type(error).__name__, error)
                self._helper = None
        if self._helper is None:
            self._local_writer()
        if self._latest is not None:  # a second fit or a resume goes on from the snapshots before
            self._call("set_state", self._state_for(self.adapter))
        if self.store is not None:  # a fit going on in its store, or the model read again
            self._call("use_store", str(self.store.root), self.run_meta)

    def _state_for(self, adapter: ModelAdapter | None) -> dict:
        """The last snapshot's norms and scores for the next one's drift and stability, or
        None in place of those that no longer fit (a resized vocabulary, other probes)."""
        state = dict(self._latest)
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
        self._offload_faithfulness = False

    def _call(self, method: str, *args: Any) -> Any:
        """A call on the writer, in the helper process or here; if the helper dies (or is
        killed for making no progress), the writer is rebuilt here (one warning) and the
        call runs again. Snapshots the helper held for a retry are recorded as missing."""
        self._ensure_writer()
        if self._helper is not None:
            try:
                return self._helper.call(id(self), method, *args,
                                         training_waits=self._training_waits)
            except HelperDied as error:
                log.warning("%s: %s; snapshots are built in this process from now on",
                            self.owner, error)
                self._helper = None
                self._local_writer(taken_for_helper=True)
                if self._latest is not None:
                    self.writer.set_state(self._latest)
                if self.store is not None:
                    self.writer.use_store(str(self.store.root), self.run_meta)
                held, self._held = sorted(self._held), set()
                for step in held:
                    self._note(self.writer.mark_missing(
                        step, f"its write had failed and {error} while holding it for a "
                              "retry"))
        if self.writer is None:
            return None
        return getattr(self.writer, method)(*args)

    def _training_waits(self) -> bool:
        """Whether the training thread waits for the writer now: always when it calls the
        writer itself, and while it waits on the worker (a full queue, a flush)."""
        pipeline = self.pipeline
        return pipeline is None or not pipeline.on_worker_thread() or pipeline.training_waits

    def _note(self, written: Written | None) -> None:
        """Keep what the writer says it lost or holds for a retry (see `Written`)."""
        if written is None:
            return
        self.failed_steps.update(written.lost)
        if written.failed is not None:
            self.failed_steps[written.step] = written.failed
        self._held = set(written.held)

    def _close_writer(self) -> None:
        self._writer_pending = False
        if self._helper is not None:
            try:
                self._helper.call(id(self), "close")
            except HelperDied:
                pass
        self._helper = None
        self.writer = None

    def _process(self, snap: Snapshot) -> None:
        """On the worker thread: build and write (in the helper process or here), then the
        logger calls, here, where the loggers live."""
        written = self._call("process", snap)
        self._note(written)
        if written.metrics:
            self.last_metrics = written.metrics
            self.last_attribution = snap.attribution
            self._latest = {"prev_norms": snap.norms, "prev_scores": snap.attribution.scores}
        try:
            self._logger.send(snap.step, written.media)
        except Exception as error:  # noqa: BLE001 - the store has it
            log.warning("%s: logging the snapshot at step %d failed (%s: %s); it is in the "
                        "snapshot store", self.owner, snap.step, type(error).__name__, error)

    def _job_failed(self, step: Any, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"
        if isinstance(step, int):
            self.failed_steps[step] = reason
            try:
                self._note(self._call("mark_missing", step, reason))
            except Exception:  # noqa: BLE001 - the warning below still says it
                log.warning("%s: snapshot at step %d failed (%s)", self.owner, step, reason)
        else:
            log.warning("%s: the snapshot worker's %s job failed (%s)", self.owner, step,
                        reason)

    # ------------------------------------------------------------------ flushing

    def flush(self) -> None:
        """Wait until every snapshot taken so far is written and logged."""
        if self.pipeline is not None:
            self.pipeline.flush()

    def finish(self) -> None:
        """End of training: flush, then a last try at writes that failed, then one warning
        listing every snapshot that is missing (also those the store could not record)."""
        if self.pipeline is None:
            return
        self.pipeline.submit("retry", lambda: self._note(self._call("retry", True)))
        self.pipeline.flush()
        log.info("%s: training waited %.2f s in all for the snapshot worker (a full queue, "
                 "the flushes before checkpoints and at the end)", self.owner,
                 self.pipeline.waited_seconds)
        if self.failed_steps:
            taken = set(self.snapshot_steps) | set(self.failed_steps)
            where = f"; {self.store.root}'s missing table records them" if self.store else ""
            log.warning("%s: %d of %d snapshots are missing: %s%s (a record the store could "
                        "not take is listed here only)", self.owner, len(self.failed_steps),
                        len(taken), missing_summary(self.failed_steps), where)

    def close(self) -> None:
        """Flush and stop the worker (a later `prepare` starts a new one)."""
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None
        self._close_writer()

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (flushes first: a checkpoint is never ahead of the
        snapshots before it)."""
        self.flush()
        latest = self._latest or {}
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
        prev = {"prev_norms": state["prev_norms"], "prev_scores": state["prev_scores"]}
        self._latest = prev
        if self.writer is not None or self._helper is not None:  # else set at `prepare`
            self._call("set_state", prev)


def missing_summary(missing: dict[int, str], most: int = 10) -> str:
    """``step N (reason); ...`` for at most ``most`` steps, then how many more."""
    steps = sorted(missing)
    text = "; ".join(f"step {s} ({missing[s]})" for s in steps[:most])
    return text + (f"; and {len(steps) - most} more" if len(steps) > most else "")


def _verified(adapter: ModelAdapter) -> ModelAdapter:
    from .adapters import verify_adapter

    verify_adapter(adapter)
    return adapter


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


# The helper keeps a copy of the weights for the faithfulness forwards only while the copy
# costs at most this share of the training process's memory; above it (a 124M model on the
# CPU) the forwards run on the training thread, which costs time but no second model.
OFFLOAD_MEMORY_SHARE = 0.05


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
    import pickle

    try:
        pickle.dumps(module)
    except Exception:  # noqa: BLE001 - hooks, lambdas, open handles: measured here instead
        return False
    return True


def _shape(adapter: ModelAdapter) -> tuple:
    return (adapter.kind, adapter.num_layers, adapter.embedding.num_embeddings, adapter.tied,
            adapter.accepts_mask, adapter.context_length)


def _attr_or_none(obj: Any, name: str) -> Any:
    """A logger property for the run record; a logger whose property raises is not fatal."""
    try:
        return getattr(obj, name)
    except Exception as error:  # third-party loggers: anything may raise
        log.warning("%s.%s raised %s: %s; not recorded in run.json", type(obj).__name__, name,
                    type(error).__name__, error)
        return None


def _full_tensor(tensor: Tensor) -> Tensor:
    """A DTensor gathered on every rank (collective); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _share(n: int, rank: int, world: int) -> list[int]:
    """Rank `rank`'s contiguous share of n items (sizes differ by at most one)."""
    size, extra = divmod(n, world)
    begin = rank * size + min(rank, extra)
    return list(range(begin, begin + size + (rank < extra)))


def _merge_shares(gathered: list, due: bool) -> tuple[Attribution, list[pd.DataFrame] | None]:
    """One Attribution over all probes (in probe order) and the faithfulness tables of every
    rank, from what each rank sent; a rank's error is raised here, on rank 0."""
    import dataclasses

    for item in gathered:
        if isinstance(item, Exception):
            raise item
    parts = [(rows, part) for rows, part, _ in gathered if part is not None]
    order = torch.argsort(torch.tensor([r for rows, _ in parts for r in rows]))
    first = parts[0][1]
    merged = {}
    for f in dataclasses.fields(first):
        value = getattr(first, f.name)
        if isinstance(value, Tensor):
            value = torch.cat([getattr(p, f.name) for _, p in parts])[order]
        merged[f.name] = value
    tables = [t for _, _, faith in gathered for t in faith or []] if due else None
    return Attribution(**merged), tables
