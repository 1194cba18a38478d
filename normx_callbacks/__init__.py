"""normx-callbacks: watch token importance emerge while a language model pre-trains."""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .adapters import ModelAdapter, UnsupportedModelError, verify_adapter
    from .attribution import Attribution, mask_positions, normxlogit
    from .callback import NormXLogitCallback
    from .discovery import resolve_adapter
    from .faithfulness import aopc, faithfulness_table
    from .loading import RunData, load_run
    from .methods import METHODS, attribute
    from .monitor import NormXLogitMonitor
    from .probes import Probe, ProbeError, ProbeSet
    from .removal import REPLACEMENTS, Replacement, resolve_replacement, special_token_mask
    from .schedule import SnapshotSchedule
    from .settings import Settings
    from .store import SnapshotStore, StoreError
    from .trainer_callback import NormXLogitTrainerCallback

_WHERE = {
    "ModelAdapter": "adapters",
    "UnsupportedModelError": "adapters",
    "verify_adapter": "adapters",
    "Attribution": "attribution",
    "mask_positions": "attribution",
    "normxlogit": "attribution",
    "NormXLogitCallback": "callback",
    "resolve_adapter": "discovery",
    "REPLACEMENTS": "removal",
    "Replacement": "removal",
    "aopc": "faithfulness",
    "faithfulness_table": "faithfulness",
    "resolve_replacement": "removal",
    "special_token_mask": "removal",
    "RunData": "loading",
    "load_run": "loading",
    "METHODS": "methods",
    "attribute": "methods",
    "NormXLogitMonitor": "monitor",
    "Probe": "probes",
    "ProbeError": "probes",
    "ProbeSet": "probes",
    "SnapshotSchedule": "schedule",
    "Settings": "settings",
    "SnapshotStore": "store",
    "StoreError": "store",
    "NormXLogitTrainerCallback": "trainer_callback",
}

__all__ = [
    "METHODS",
    "REPLACEMENTS",
    "Attribution",
    "ModelAdapter",
    "UnsupportedModelError",
    "NormXLogitCallback",
    "NormXLogitMonitor",
    "NormXLogitTrainerCallback",
    "Probe",
    "ProbeError",
    "ProbeSet",
    "Replacement",
    "RunData",
    "Settings",
    "SnapshotSchedule",
    "SnapshotStore",
    "StoreError",
    "aopc",
    "attribute",
    "faithfulness_table",
    "load_run",
    "mask_positions",
    "normxlogit",
    "resolve_adapter",
    "resolve_replacement",
    "special_token_mask",
    "verify_adapter",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Names are imported on first use, so `normx` (the reports) starts without importing
    # Lightning, and the Trainer's callback (which needs accelerate, the
    # `normx-callbacks[transformers-trainer]` extra) only when asked for.
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
