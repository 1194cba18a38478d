"""Every option of the instrument, declared once.

`Settings` is what each driver (the Lightning callback, the Fabric / plain-loop monitor,
replay) hands the `Engine`. The drivers keep flat keyword arguments, as users write them
(``NormXLogitCallback(probes, every_n_steps=500)``, ``every_n_steps: 500`` in a
LightningCLI config), and forward them whole as ``Settings(**settings)``: LightningCLI reads
the options, their types and their documentation from this class, so adding an option
touches this class and the docs only. Values are checked here, once, when a driver is built:
bad input fails before any training step.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from torch import Tensor

from .attribution import NORMS, NormKind
from .methods import ALIGNMENT_DEFAULT, FORWARD_METHODS, METHODS, resolve_alignment_methods
from .removal import REPLACEMENTS, ReplacementName
from .schedule import SCHEDULES, ScheduleKind, SnapshotSchedule

# The choices of schedule, norm and faithfulness_replacement are defined once, where they are
# used (schedule.py, attribution.py, removal.py), as the Literal types LightningCLI reads.
Objective = Literal["auto", "causal", "masked"]
Writer = Literal["process", "thread"]
WRITERS = get_args(Writer)
# Options renamed since users last saw them: old name -> current name.
RENAMED = {"worker": "writer"}


@dataclass(frozen=True)
class Settings:
    """Options shared by every driver (`NormXLogitCallback`, `NormXLogitMonitor`, replay).

    Args:
        schedule: which steps get a snapshot: "log" (step 0, then 1, 2, 4, ... up to
            `every_n_steps`, then every `every_n_steps`), "interval" (0 and every
            `every_n_steps`) or "steps" (0 and `steps`); the last step always does.
        every_n_steps: the interval of the "log" and "interval" schedules.
        steps: the steps of the "steps" schedule.
        log_base: the base of the log-spaced steps.
        layers: "all" (every layer's logit lens), None (the last layer only) or a list of
            layer indices (0 = the embedding output, L = the last layer, negative from it).
        norm: "layer0" (the paper's ||hidden_states[0]||) or "word" (the raw embedding row).
        objective: "auto" (from the model), "causal" or "masked".
        probe_batch_size: probes per forward pass (bounds memory).
        track_tokens: words whose embedding norms are logged at every snapshot (a bare
            string is one word).
        top_k: how many tokens the largest/smallest norm lists show.
        faithfulness_every: AOPC faithfulness at every n-th snapshot and the final one;
            None turns it off.
        faithfulness_methods: the methods it compares (`normx_callbacks.METHODS`; a bare
            string is one method); the gradient ones need
            `pip install 'normx-callbacks[baselines]'`.
        faithfulness_probes: how many probes (the first n) it uses.
        faithfulness_replacement: how AOPC removes a token (`normx_callbacks.REPLACEMENTS`):
            "auto", "mask", "unk", "pad", "eos" or "attention".
        alignment_methods: the gradient reference of evidence alignment, at the
            faithfulness cadence: "installed" (input x gradient and Saliency), None, or a
            list of gradient methods ("integrated_gradients" needs Captum).
        batch_key: where a training batch holds its token ids (a key, or an index of a
            tuple), for token counting.
        mask_key: where it holds the attention mask (None: count every position).
        count_fn: ``batch -> token ids`` for batch formats the keys cannot describe.
        media_probes: how many probes get heatmap images and HTML (cost control).
        history_length: how many snapshots the history heatmaps show (the latest ones).
        max_pending: how many snapshots may wait for the writer before training waits.
        writer: where snapshots are built, written and drawn: "process" (a helper process
            forked from the training process, on idle CPU time) or "thread" (a thread of the
            training process).
    """

    # schedule
    schedule: ScheduleKind = "log"
    every_n_steps: int = 100
    steps: Sequence[int] | None = None
    log_base: int = 2
    # probes and layers
    layers: Literal["all"] | Sequence[int] | None = "all"
    norm: NormKind = "layer0"
    objective: Objective = "auto"
    probe_batch_size: int = 32
    track_tokens: Sequence[str] = ()
    top_k: int = 20
    # faithfulness and the gradient reference of alignment
    faithfulness_every: int | None = 4
    faithfulness_methods: Sequence[str] = FORWARD_METHODS
    faithfulness_probes: int = 16
    faithfulness_replacement: ReplacementName = "auto"
    alignment_methods: str | Sequence[str] | None = ALIGNMENT_DEFAULT
    # token counting
    batch_key: str | int = "input_ids"
    mask_key: str | int | None = "attention_mask"
    count_fn: Callable[[Any], Tensor] | None = None
    # logger media
    media_probes: int = 2
    history_length: int = 64
    # execution
    max_pending: int = 8
    writer: Writer = "process"

    def __post_init__(self) -> None:
        # A bare word is one word (as a probe's bare cue is), not a sequence of characters:
        # track_tokens="is" would otherwise track "i" and "s" without a word of warning.
        for name in ("track_tokens", "faithfulness_methods"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, (getattr(self, name),))
        for name, choices in (("schedule", SCHEDULES), ("norm", NORMS),
                              ("objective", get_args(Objective)),
                              ("faithfulness_replacement", REPLACEMENTS),
                              ("writer", WRITERS)):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}")
        self.snapshot_schedule()  # its own checks
        layers = self.layers
        if isinstance(layers, str) and layers != "all":
            raise ValueError(f"layers={layers!r}: use 'all', None or a list of layer indices")
        if not isinstance(layers, str) and layers is not None and (
                not layers or not all(_is_int(x) for x in layers)):
            raise ValueError(f"layers={layers!r}: use 'all', None or a non-empty list of layer "
                             "indices (ints)")
        for name in ("top_k", "media_probes", "history_length"):
            _at_least(name, getattr(self, name), 0)
        for name in ("probe_batch_size", "faithfulness_probes", "max_pending"):
            _at_least(name, getattr(self, name), 1)
        if self.faithfulness_every is not None:
            _at_least("faithfulness_every", self.faithfulness_every, 1)
        methods = list(self.faithfulness_methods)
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"faithfulness_methods={methods!r}: unknown {unknown}; valid names "
                             f"are {METHODS}")
        resolve_alignment_methods(self.alignment_methods)  # its own checks
        if self.count_fn is not None and not callable(self.count_fn):
            raise ValueError(f"count_fn={self.count_fn!r} must be a callable batch -> token ids")
        # Sequences as tuples: a frozen object holds no list another caller could change.
        for name in ("steps", "track_tokens", "faithfulness_methods"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if isinstance(layers, (list, range)):
            object.__setattr__(self, "layers", tuple(layers))

    def snapshot_schedule(self) -> SnapshotSchedule:
        return SnapshotSchedule(self.schedule, every_n_steps=self.every_n_steps,
                                steps=self.steps, base=self.log_base)

    @property
    def layer_list(self) -> str | list[int] | None:
        """`layers` as `normxlogit` takes it ("all", None or a list)."""
        return list(self.layers) if isinstance(self.layers, tuple) else self.layers

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def check_options(options: Mapping[str, Any], who: str) -> None:
    """A `ValueError` naming an unknown or renamed option and the closest valid one (before
    ``Settings(**options)``, whose TypeError would not)."""
    unknown = [name for name in options if name not in Settings.names()]
    if unknown:
        name = unknown[0]
        if name in RENAMED:
            hint = f"it is now called {RENAMED[name]!r}"
        else:
            close = difflib.get_close_matches(name, Settings.names(), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid: {Settings.names()}"
        raise ValueError(f"{who}: unknown option {name!r}; {hint}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _at_least(name: str, value: Any, least: int) -> None:
    if not _is_int(value) or value < least:
        kind = "positive" if least else "non-negative"
        raise ValueError(f"{name}={value!r} must be a {kind} integer")
