"""normx-callbacks: watch token importance emerge while a language model pre-trains."""

from .attribution import Attribution, mask_positions, normxlogit
from .heads import ModelAdapter, UnsupportedModelError, resolve_adapter

__all__ = [
    "Attribution",
    "ModelAdapter",
    "UnsupportedModelError",
    "mask_positions",
    "normxlogit",
    "resolve_adapter",
]
__version__ = "0.1.0"
