"""normx-callbacks: watch token importance emerge while a language model pre-trains."""

from .attribution import Attribution, mask_positions, normxlogit
from .callback import NormXLogitCallback
from .faithfulness import aopc, faithfulness_table, replacement_for, special_token_mask
from .heads import ModelAdapter, UnsupportedModelError, resolve_adapter, verify_adapter
from .methods import METHODS, attribute
from .probes import Probe, ProbeError, ProbeSet
from .schedule import SnapshotSchedule
from .store import RunData, SnapshotStore, StoreError, load_run

__all__ = [
    "METHODS",
    "Attribution",
    "ModelAdapter",
    "UnsupportedModelError",
    "NormXLogitCallback",
    "Probe",
    "ProbeError",
    "ProbeSet",
    "RunData",
    "SnapshotSchedule",
    "SnapshotStore",
    "StoreError",
    "aopc",
    "attribute",
    "faithfulness_table",
    "load_run",
    "mask_positions",
    "normxlogit",
    "replacement_for",
    "resolve_adapter",
    "special_token_mask",
    "verify_adapter",
]
__version__ = "0.1.0"
