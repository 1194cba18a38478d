"""When to take a snapshot: step 0, log-spaced early steps, then a fixed interval."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Literal, get_args

ScheduleKind = Literal["log", "interval", "steps"]
SCHEDULES = get_args(ScheduleKind)


class SnapshotSchedule:
    """Decides whether a global step gets a snapshot.

    - "log" (default): 0, 1, 2, 4, 8, ... (powers of `base`, as Pythia's
      checkpoints, since importance emerges early) up to `every_n_steps`, then
      every `every_n_steps`.
    - "interval": 0 and every `every_n_steps`.
    - "steps": 0 and the explicit `steps` list.
    The final step is added by the callback at the end of training.
    """

    def __init__(
        self,
        kind: str = "log",
        *,
        every_n_steps: int = 100,
        steps: Iterable[int] | None = None,
        base: int = 2,
    ):
        steps = None if steps is None else list(steps)  # a range, generator or array too
        if kind not in SCHEDULES:
            raise ValueError(f"schedule={kind!r} is not one of {SCHEDULES}")
        if not _is_int(every_n_steps) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} must be a positive integer")
        if not _is_int(base) or base < 2:
            raise ValueError(f"log_base={base!r} must be an integer >= 2")
        if kind == "steps":
            if not steps:
                raise ValueError("schedule='steps' needs a non-empty steps=[...] list")
            bad = [s for s in steps if not _is_int(s) or s < 0]
            if bad:
                raise ValueError(f"steps contains {bad}: steps must be non-negative integers")
        elif steps:
            raise ValueError(f"steps=[...] is only used with schedule='steps', not {kind!r}")
        self.kind = kind
        self.every_n_steps = every_n_steps
        self.base = base
        self.steps = frozenset(int(s) for s in steps or ())

    def __contains__(self, step: int) -> bool:
        if step == 0:
            return True
        if self.kind == "steps":
            return step in self.steps
        if step % self.every_n_steps == 0:
            return True
        if self.kind == "log" and step < self.every_n_steps:
            power = 1
            while power < step:
                power *= self.base
            return power == step
        return False

    def upto(self, last: int) -> list[int]:
        """Every scheduled step in 0..last (for docs, tests and planning)."""
        return [s for s in range(last + 1) if s in self]


def _is_int(value) -> bool:
    # bool is an int subclass, but `every_n_steps=True` is a mistake, not 1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
