"""NormXLogitMonitor: the callback's engine for Lightning Fabric and plain PyTorch loops.

    monitor = NormXLogitMonitor(probes, store_dir="runs/x/normx", loggers=fabric.loggers)
    monitor.setup(model, tokenizer, max_steps=max_steps, autocast=fabric.autocast)
    for step, batch in enumerate(loader, start=1):
        ...                                   # forward, backward, optimizer step
        monitor.step(step, model, batch)      # counts the batch; snapshots when scheduled
    monitor.end(step)                         # the final snapshot, then everything written

`step` counts optimizer steps done, as Lightning's `global_step` does: the snapshot at step
s shows the weights after s updates and the tokens of the batches that made them. The same
store, metrics and media as `NormXLogitCallback` with the same arguments and the same
training (a test checks it under Fabric).

Distributed: call every method on every rank. With `torch.distributed` initialised (Fabric
DDP), each rank measures a share of the probes and rank 0 writes; an embedding sharded as a
DTensor (FSDP2) is measured collectively, every rank running every probe.
Resume: save `monitor.state_dict()` in your checkpoint; on resume call
`monitor.load_state_dict(state)` before `setup(..., step=resumed_step)`: the snapshots go on
in the same store and the ones written after the checkpoint are re-taken.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import ModelAdapter
from .drivers import DriverCore, rank_and_world
from .engine import Engine
from .settings import Settings, check_options
from .store import STORE_DIRNAME, SnapshotStore

WHO = "NormXLogitMonitor"


class NormXLogitMonitor:
    """Snapshots NormXLogit attributions and embedding norms from any training loop.

    Args:
        probes: as for `NormXLogitCallback` (a `ProbeSet`, texts/dicts, a file, `"blimp:PATH"`).
        store_dir: the snapshot store; default ``<log_dir of the first logger>/normx``.
        loggers: Lightning or Fabric loggers (`fabric.loggers`); may also be given to `setup`.
        model_attr, adapter: how to find the language model inside the module given to
            `setup` (default: found automatically, as the callback does).
        **settings: every other option (`normx_callbacks.Settings`: schedule,
            every_n_steps, layers, norm, track_tokens, media_probes, faithfulness_*,
            batch_key, count_fn, max_pending, writer, ...), with the same meaning and defaults
            as for `NormXLogitCallback`.
    """

    def __init__(self, probes: Any, *, store_dir: str | os.PathLike | None = None,
                 loggers: Sequence = (), model_attr: str | None = None,
                 adapter: ModelAdapter | None = None, **settings: Any) -> None:
        check_options(settings, WHO)
        self.engine = Engine(probes, Settings(**settings), owner=WHO)
        self.core = DriverCore(self.engine)
        self.store_dir = store_dir
        self.loggers = list(loggers)
        self.model_attr = model_attr
        self._user_adapter = adapter
        self._module: nn.Module | None = None
        self._max_steps: int | None = None

    # Results, read through the engine.
    store = property(lambda self: self.engine.store)
    last_metrics = property(lambda self: self.engine.last_metrics)
    last_attribution = property(lambda self: self.engine.last_attribution)
    snapshot_steps = property(lambda self: self.engine.snapshot_steps)
    # Every snapshot that is missing, with why: also those a full disk kept out of the store.
    missing_steps: dict[int, str] = property(lambda self: dict(self.engine.failed_steps))

    def setup(self, model: nn.Module, tokenizer: Any, *, step: int = 0,
              max_steps: int | None = None, loggers: Sequence | None = None,
              autocast: Callable[[], AbstractContextManager] | None = None) -> None:
        """Read the model, encode the probes, open the store and take the snapshot at ``step``
        (the step training starts from: 0, or the resumed step) when the schedule has it.

        Args:
            model: the module being trained (a Fabric-wrapped module is unwrapped).
            tokenizer: the run's fast tokenizer.
            max_steps: the run's last step: its snapshot is the final one (with faithfulness).
            loggers: overrides the constructor's loggers.
            autocast: the run's precision context, e.g. `fabric.autocast`.
        """
        if loggers is not None:
            self.loggers = list(loggers)
        self._max_steps = max_steps
        self._module = _unwrap(model)
        adapter = self.core.read_model(self._module, self.model_attr, self._user_adapter)
        rank, world = rank_and_world()
        mode = ("collective" if _is_dtensor(adapter.embedding.weight)
                else "shared" if world > 1 else "single")
        root = self._store_root() if rank == 0 else None  # bad input fails before the writer starts
        if root is not None:
            SnapshotStore(root)  # a path that can never be a store fails here
        self.engine.prepare(adapter, tokenizer, loggers=self.loggers, mode=mode,
                            is_writer=rank == 0, forward_context=autocast)
        if rank == 0:
            self.core.start_run(root, step=step, loggers=self.loggers,
                                going_on=self.core.last_step is not None and step > 0)
        self.core.restored = None
        self._maybe_snapshot(step, force=False)

    def _store_root(self) -> Path:
        if self.store_dir is not None:
            return Path(self.store_dir)
        for logger in self.loggers:
            log_dir = getattr(logger, "log_dir", None)
            if log_dir:
                return Path(log_dir) / STORE_DIRNAME
        raise ValueError(f"{WHO} needs a place for its store: pass store_dir=... (or a logger "
                         "with a log_dir)")

    def step(self, step: int, model: nn.Module | None = None, batch: Any = None) -> None:
        """After optimizer step ``step``: count ``batch`` (the tokens just trained on) and take
        a snapshot when the schedule has the step. ``model``, when given, must be the module
        given to `setup` (or its Fabric wrapper)."""
        self._check_ready()
        if model is not None and _unwrap(model) is not self._module:
            raise ValueError(f"{WHO}.step: model is not the module given to setup(); call "
                             "setup() again for another model")
        if batch is not None:
            self.engine.count(batch)
            self.engine.check_counted(batch)
        final = self._max_steps is not None and step >= self._max_steps
        self._maybe_snapshot(step, force=final)

    def end(self, step: int) -> None:
        """Training ended at ``step``: take its final snapshot (unless taken), write
        everything and stop the pipeline."""
        self._check_ready()
        self._maybe_snapshot(step, force=True)
        self.close()

    def close(self) -> None:
        """Write everything measured so far and stop the pipeline (also on an exception:
        use the monitor as a context manager, or call this in a `finally`)."""
        self.engine.finish()
        self.engine.close()

    def flush(self) -> None:
        """Wait until every snapshot taken so far is written (call before saving a
        checkpoint; `state_dict` does)."""
        self.engine.flush()

    def __enter__(self) -> NormXLogitMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_ready(self) -> None:
        if not self.engine.prepared:
            raise RuntimeError(f"{WHO}: call setup(model, tokenizer) before step() and end()")

    def _maybe_snapshot(self, step: int, *, force: bool) -> None:
        self.core.maybe_snapshot(step, force=force, max_steps=self._max_steps)

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """The monitor's resume state (written snapshots flushed first; pending token counts
        folded in, summed over ranks: call on every rank)."""
        if self.engine.prepared:
            self.engine.collect_counts()
        return self.core.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore before `setup(..., step=resumed_step)`."""
        self.core.load_state_dict(state)


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a Fabric (`_FabricModule`) or DDP wrapper."""
    from lightning.fabric.wrappers import _FabricModule

    if isinstance(model, _FabricModule):
        return _unwrap(model._original_module)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return _unwrap(model.module)
    return model


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)
