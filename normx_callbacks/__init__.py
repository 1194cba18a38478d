"""normx-callbacks: watch token importance emerge while a language model pre-trains."""

from .attribution import Attribution, mask_positions, normxlogit
from .callback import NormXLogitCallback
from .heads import ModelAdapter, UnsupportedModelError, resolve_adapter
from .probes import Probe, ProbeError, ProbeSet
from .schedule import SnapshotSchedule
from .store import RunData, SnapshotStore, StoreError, load_run

__all__ = [
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
    "load_run",
    "mask_positions",
    "normxlogit",
    "resolve_adapter",
]
__version__ = "0.1.0"
