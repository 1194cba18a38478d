"""What every driver of the engine does the same way, whatever runs the training.

A driver (the Lightning callback, the Fabric / plain-loop monitor) only knows its host:
where the model, tokenizer, loggers and steps come from, and when to flush. The rest is
here, once: reading the model (a hand-built adapter verified at every fit, else the model
found and verified again), starting the run's store (a resume in its own store, with the
snapshots written after its checkpoint re-taken), deciding when a step gets a snapshot (once
per optimizer step, on the schedule, and the final step), and the resume state a checkpoint
keeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import ModelAdapter, UnsupportedModelError, verify_adapter
from .discovery import find_model
from .engine import Engine


class DriverCore:
    """The engine as a driver holds it, with the driver's step bookkeeping.

    ``last_step``: the step of the last snapshot taken (or restored from a checkpoint);
    ``restored``: the run id and store a checkpoint recorded, until the run starts.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.last_step: int | None = None
        self.restored: dict | None = None

    @property
    def who(self) -> str:
        return self.engine.owner

    def read_model(self, module: nn.Module, model_attr: str | None,
                   adapter: ModelAdapter | None) -> ModelAdapter:
        """The adapter of the model to watch: the user's, checked against its model (the
        weights may have changed since the last fit), or the model found in ``module`` and
        verified again (`find_model(check=True)`)."""
        if adapter is None:
            return find_model(module, model_attr, who=self.who, check=True)
        try:
            verify_adapter(adapter)
        except UnsupportedModelError as error:
            raise RuntimeError(f"{self.who}: the adapter disagrees with its model: {error}"
                               ) from error
        return adapter

    def start_run(self, root: Path, *, step: int, loggers: Any = (),
                  going_on: bool) -> None:
        """Open the store (rank 0 only): a resume continues its run's store and re-takes the
        snapshots a killed run wrote after its checkpoint; ``going_on``: the same driver
        fitting on from steps it already took."""
        restored, self.restored = self.restored, None
        self.engine.open_run(root, restored=restored, loggers=loggers, going_on=going_on)
        if restored is not None:
            self.engine.truncate_after(step)

    def maybe_snapshot(self, step: int, *, force: bool = False,
                       max_steps: int | None = None) -> None:
        """A snapshot at ``step`` if it is due (or ``force``), once per step: with gradient
        accumulation several batches share one. The run's last step (``max_steps``) is the
        final snapshot whichever call reaches it first. Every rank calls this together."""
        if step == self.last_step or (not force and not self.engine.due(step)):
            return
        self.last_step = step
        final = force or (max_steps is not None and 0 < max_steps <= step)
        self.engine.snapshot(step, final=final)

    def state_dict(self) -> dict[str, Any]:
        """The resume state (the engine flushes first: a checkpoint is never ahead of the
        snapshots before it)."""
        return {"last_step": self.last_step, **self.engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = state["last_step"]
        self.engine.load_state_dict(state)
        # Checkpoints written before runs had an id restore {"run_id": None, "store": None}.
        self.restored = {"run_id": state.get("run_id"), "store": state.get("store")}


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size (0, 1 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
