"""Measuring a snapshot: what needs the model's weights at a step, on the training thread.

`prepare_measurement` reads what a model and tokenizer mean for the probes (the objective,
the encoded probes and their `ProbeContext`, the faithfulness replacement, whether the
gradient reference runs) and checks what can be wrong before any training step. A
`Measurement` then takes each snapshot: the probe forward (NormXLogit, every requested
layer, the prediction depth) inside the run's precision context with every RNG saved and
restored, the embedding row norms and, when due, the faithfulness forwards and the gradient
reference, all moved to the CPU as a `snapshot.Snapshot`.

On one process it measures every probe. Distributed ("shared", DDP) each rank measures its
share of the probes and rank 0 gathers them in probe order; "collective" (FSDP2) every rank
runs every probe in the same order so the sharded forwards meet, and rank 0 keeps its own
result. A failure never reaches the training run: it becomes the snapshot's ``error``, and a
rank's failure is sent to rank 0 so every rank still reaches the gather.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .adapters import ModelAdapter
from .attribution import Attribution, normxlogit, resolve_layers
from .embeddings import embedding_norms
from .encoding import readable_tokens
from .faithfulness import faithfulness_rows
from .methods import (
    GRADIENT_METHODS,
    probe_attributions,
    require_captum,
    resolve_alignment_methods,
)
from .probes import ProbeSet
from .removal import Replacement, resolve_replacement, special_token_mask
from .settings import Settings
from .snapshot import ProbeContext, Snapshot

log = logging.getLogger(__name__)

MODES = ("single", "shared", "collective")


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


def check_mode(settings: Settings, mode: str, owner: str) -> None:
    """What a distribution mode refuses: under FSDP2 ("collective") a backward pass would
    reduce gradients into the sharded parameters, so no gradient faithfulness method."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if mode == "collective":
        gradient = [m for m in settings.faithfulness_methods if m in GRADIENT_METHODS]
        if settings.faithfulness_every and gradient:
            raise RuntimeError(
                f"{owner}: faithfulness_methods {gradient} need a backward pass, which under "
                "ModelParallelStrategy would reduce gradients into the sharded parameters; use "
                "the forward-only methods there")


@dataclass
class Measurement:
    """Takes snapshots of one prepared model (see the module docstring)."""

    adapter: ModelAdapter
    ctx: ProbeContext
    settings: Settings
    owner: str
    mode: str = "single"
    rank: int = 0
    world: int = 1
    forward_context: Callable[[], AbstractContextManager] = nullcontext
    replacement: Replacement | None = None  # how faithfulness removes a token
    alignment_methods: tuple[str, ...] = ()  # the gradient reference this fit measures
    _alignment_failed: bool = field(default=False, repr=False)

    def take(self, step: int, final: bool, faith_due: bool) -> Snapshot:
        """Every probe on this process; faithfulness forwards when ``faith_due``."""
        n_faith = min(self.settings.faithfulness_probes, len(self.ctx.encoded))
        with preserved_rng():
            try:
                with self.forward_context():
                    attribution = self.attribute(range(len(self.ctx.encoded)))
                faith = self.faithfulness_parts(range(n_faith)) if faith_due else None
                norms = embedding_norms(self.adapter.embedding.weight)
            except Exception as error:  # the training run must never die for a probe
                return Snapshot(step, final, error=f"{type(error).__name__}: {error}")
        return Snapshot(step, final, attribution=attribution, norms=norms, faithfulness=faith)

    def take_distributed(self, step: int, final: bool, faith_due: bool) -> Snapshot | None:
        """Every rank together ("shared" or "collective", see the module docstring); the
        snapshot on rank 0, None elsewhere."""
        n = len(self.ctx.encoded)
        n_faith = min(self.settings.faithfulness_probes, n)
        weight = None
        with preserved_rng():
            try:
                if self.mode == "shared":
                    rows, faith_rows = (share(n, self.rank, self.world),
                                        share(n_faith, self.rank, self.world))
                else:
                    rows, faith_rows = list(range(n)), list(range(n_faith))
                    weight = full_tensor(self.adapter.embedding.weight.detach())
                with self.forward_context():
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
            attribution, faith = merge_shares(gathered, faith_due)
            with preserved_rng():
                norms = embedding_norms(self.adapter.embedding.weight if weight is None
                                        else weight)
        except Exception as error:  # noqa: BLE001 - a rank's failure: the step is missing
            return Snapshot(step, final, error=f"{type(error).__name__}: {error}")
        return Snapshot(step, final, attribution=attribution, norms=norms, faithfulness=faith)

    def attribute(self, rows: Sequence[int]) -> Attribution:
        """NormXLogit of the probes at `rows`, on the CPU."""
        adapter, encoded, s = self.adapter, self.ctx.encoded, self.settings
        enc = encoded.select(list(rows)).to(adapter.embedding.weight.device)
        return normxlogit(
            adapter, enc.input_ids, enc.attention_mask, positions=enc.positions,
            targets=enc.targets, foils=enc.foils if bool((encoded.foils >= 0).any()) else None,
            layers=s.layer_list, norm=s.norm, batch_size=s.probe_batch_size,
            prediction_depth=True,  # when the prediction forms: probe/prediction_depth
        ).cpu()

    def gradient_alignment(self) -> dict | None:
        """Scores of the gradient reference methods for every probe (`probe_attributions`),
        on this process's model; None (one warning per fit) when they fail."""
        try:
            with preserved_rng(), self.forward_context():
                return probe_attributions(self.adapter, self.ctx.encoded, self.alignment_methods,
                                          batch_size=self.settings.probe_batch_size)
        except Exception as error:  # noqa: BLE001 - the snapshot goes on without it
            if not self._alignment_failed:
                self._alignment_failed = True
                log.warning("%s: the gradient reference of evidence alignment failed (%s: %s);"
                            " alignment/<method>/* are not logged", self.owner,
                            type(error).__name__, error)
            return None

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
            with self.forward_context():
                parts.append(faithfulness_rows(
                    self.adapter, group, self.settings.faithfulness_methods,
                    replacement=self.replacement,
                    protect=protect[group_rows][:, : group.input_ids.shape[1]],
                    batch_size=self.settings.probe_batch_size))
        return parts

    def with_model(self, adapter: ModelAdapter) -> Measurement:
        """The same measurement of another model of the same shape (a replayed checkpoint)."""
        return dataclasses.replace(self, adapter=adapter)


def prepare_measurement(adapter: ModelAdapter, tokenizer: Any, probes: ProbeSet,
                        settings: Settings, *, owner: str, mode: str = "single",
                        forward_context: Callable[[], AbstractContextManager] | None = None,
                        ) -> Measurement:
    """Encode the probes for ``adapter`` and fix everything a snapshot needs; raises (before
    any training step) for a model, tokenizer or setting that cannot work together."""
    check_mode(settings, mode, owner)
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if adapter.num_layers is None:
        raise RuntimeError(f"{owner}: the ModelAdapter's num_layers is not set; pass "
                           "ModelAdapter(..., num_layers=L)")
    try:
        resolve_layers(settings.layer_list, adapter.num_layers)
    except ValueError as error:
        # Caught here, not at the first snapshot (which would record every one as missing).
        raise ValueError(f"{owner}: {error}") from None
    objective = settings.objective
    if objective == "auto":
        if adapter.kind not in ("causal", "masked"):
            raise RuntimeError(
                f"{owner} instruments language-model pre-training, but the model is a "
                f"{adapter.kind} model; use normxlogit() directly for classifiers")
        objective = adapter.kind
    vocab = adapter.embedding.num_embeddings
    if len(tokenizer) > vocab:
        raise RuntimeError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
            f"{vocab} rows: pass the tokenizer the model was built for")
    encoded = probes.encode(tokenizer, objective=objective, max_length=adapter.context_length)
    ctx = ProbeContext(
        encoded=encoded,
        objective=objective,
        # One rule for special tokens: never ranked by alignment, never removed by AOPC.
        protect=special_token_mask(encoded.input_ids, tokenizer),
        tokens=encoded.tokens,
        token_strings=tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))),
        text_of=partial(readable_tokens, tokenizer),
        track_ids=_tracked_ids(tokenizer, settings.track_tokens),
        num_layers=adapter.num_layers,
        faithfulness_methods=settings.faithfulness_methods,
        top_k=settings.top_k,
        tied=adapter.tied,
        owner=owner,
    )
    replacement = (_replacement(adapter, tokenizer, settings, owner)
                   if settings.faithfulness_every else None)
    return Measurement(adapter, ctx, settings, owner, mode, rank, world,
                       forward_context or nullcontext, replacement,
                       _alignment_methods(ctx, settings, mode, owner))


def _replacement(adapter: ModelAdapter, tokenizer: Any, settings: Settings,
                 owner: str) -> Replacement:
    gradient = [m for m in settings.faithfulness_methods if m in GRADIENT_METHODS]
    if gradient:
        require_captum(gradient[0])  # a missing optional backend fails here, not mid-run
    replacement = resolve_replacement(tokenizer, settings.faithfulness_replacement,
                                      attention=adapter.accepts_mask)
    if settings.faithfulness_replacement == "auto" and replacement.strategy in ("unk", "pad"):
        log.warning("%s: the tokenizer has no mask or eos token and the model takes no "
                    "attention mask, so faithfulness replaces tokens with %s %r, which "
                    "training may never have shown the model; pass "
                    "faithfulness_replacement= to choose", owner, replacement.strategy,
                    replacement.token)
    if replacement.strategy == "attention" and not adapter.accepts_mask:
        raise ValueError(f"{owner}: faithfulness_replacement resolves to 'attention' but the "
                         "model takes no attention mask; pass faithfulness_replacement='eos' "
                         "(or another token)")
    return replacement


def _alignment_methods(ctx: ProbeContext, settings: Settings, mode: str,
                       owner: str) -> tuple[str, ...]:
    """The gradient reference of alignment this fit measures: at the faithfulness cadence,
    when some probe has cues, and never under FSDP2."""
    wanted = (resolve_alignment_methods(settings.alignment_methods)
              if settings.faithfulness_every else ())
    methods = wanted if bool(ctx.encoded.cue_mask.any()) else ()
    if mode == "collective" and methods:
        log.info("%s: the gradient reference of evidence alignment (%s) is skipped under "
                 "ModelParallelStrategy: its backward would reduce gradients into the sharded "
                 "parameters", owner, ", ".join(methods))
        return ()
    return methods


def _tracked_ids(tokenizer: Any, words: Sequence[str]) -> dict[str, int]:
    tracked = {}
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(
                f"track_tokens: {word!r} is not a single token for this tokenizer (it splits "
                f"into {len(ids)}); track single-token words")
        tracked[word] = ids[0]
    return tracked


def full_tensor(tensor: Tensor) -> Tensor:
    """A DTensor gathered on every rank (collective); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def share(n: int, rank: int, world: int) -> list[int]:
    """Rank `rank`'s contiguous share of n items (sizes differ by at most one)."""
    size, extra = divmod(n, world)
    begin = rank * size + min(rank, extra)
    return list(range(begin, begin + size + (rank < extra)))


def merge_shares(gathered: list, due: bool) -> tuple[Attribution, list[pd.DataFrame] | None]:
    """One Attribution over all probes (in probe order) and the faithfulness tables of every
    rank, from what each rank sent; a rank's error is raised here, on rank 0."""
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
