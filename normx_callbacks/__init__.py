"""normx-callbacks: watch token importance emerge while a language model pre-trains."""

from .adapters import ModelAdapter, UnsupportedModelError, verify_adapter
from .attribution import Attribution, mask_positions, normxlogit
from .callback import NormXLogitCallback
from .discovery import resolve_adapter
from .faithfulness import (
    REPLACEMENTS,
    Replacement,
    aopc,
    faithfulness_table,
    resolve_replacement,
    special_token_mask,
)
from .loading import RunData, load_run
from .methods import METHODS, attribute
from .monitor import NormXLogitMonitor
from .probes import Probe, ProbeError, ProbeSet
from .schedule import SnapshotSchedule
from .settings import Settings
from .store import SnapshotStore, StoreError

__all__ = [
    "METHODS",
    "REPLACEMENTS",
    "Attribution",
    "ModelAdapter",
    "UnsupportedModelError",
    "NormXLogitCallback",
    "NormXLogitMonitor",
    "NormXLogitTrainerCallback",
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
    # The transformers Trainer's callback is imported when asked for: it needs accelerate
    # (`normx-callbacks[transformers-trainer]`), which the rest of the package does not.
    if name == "NormXLogitTrainerCallback":
        from .trainer_callback import NormXLogitTrainerCallback

        return NormXLogitTrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
