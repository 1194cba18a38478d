"""NormXLogitCallback: watch token importance emerge in any Lightning pre-training run."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from . import plots
from .attribution import NORMS, Attribution, _resolve_layers, normxlogit
from .embeddings import TokenCounter, snapshot_embeddings
from .faithfulness import (
    REPLACEMENTS,
    faithfulness_rows,
    resolve_replacement,
    special_token_mask,
    summarise_faithfulness,
)
from .adapters import ModelAdapter, UnsupportedModelError, resolve_adapter, verify_adapter
from .loggers import LoggerSink, norm_extremes, token_html
from .methods import GRADIENT_METHODS, METHODS, require_captum
from .metrics import (
    alignment_per_probe,
    bootstrap_interval,
    group_contrast,
    rank_stability,
    ranked_positions,
    spearman,
)
from .probes import EncodedProbes, ProbeSet
from .probes import _readable as readable_tokens
from .schedule import SnapshotSchedule
from .store import (
    STORE_DIRNAME,
    SnapshotStore,
    holds_snapshots,
    read_run_record,
    sibling_root,
    write_run_record,
)

log = logging.getLogger(__name__)

PREFIX = "normx"
# Forward-only methods are cheap enough to evaluate during training by default; gradient
# methods (a backward pass per probe, x n_steps for IG) are opt-in.
FORWARD_METHODS = ("normxlogit", "logat", "norm", "random")
_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "XLA")
# Snapshots whose write failed (disk full, store unreachable) are kept in memory and written
# before the next one; a few at most, so a disk that stays full cannot grow memory.
MAX_UNWRITTEN = 3


@contextmanager
def _preserved_rng():
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


def _get_attr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


class NormXLogitCallback(Callback):
    """Snapshots input-embedding norms and NormXLogit attributions during training.

    At step 0, on a log-spaced schedule, then every `every_n_steps`, and at the end
    of training, the callback runs the probe set through the model (eval mode,
    no grad, RNG untouched), writes everything to the snapshot store
    (`<log_dir>/normx`, see `normx_callbacks.load_run`) and logs to every logger.

    Args:
        probes: a `ProbeSet`, a list of texts/dicts, a YAML/JSON/JSONL path, or
            `"blimp:PATH"` (BLiMP-format file, directory or glob, see `ProbeSet.from_blimp`);
            default `trainer.datamodule.probes`.
        tokenizer: a fast HF tokenizer; default `pl_module.tokenizer`, then
            `trainer.datamodule.tokenizer`.
        model_attr: dotted attribute path of the HF model inside the LightningModule
            (default: found automatically); or pass a `ModelAdapter` as `adapter`.
        schedule: "log" (default), "interval" or "steps" (see `SnapshotSchedule`).
        every_n_steps, steps, log_base: schedule parameters.
        layers: "all" (default), None (last layer only) or a list of layer indices.
        norm: "layer0" (the paper's `hidden_states[0]`) or "word" (raw embedding row).
        objective: "auto" (from the model), "causal" or "masked".
        track_tokens: words whose embedding norms are logged at every snapshot.
        top_k: how many tokens to list with the largest/smallest norms.
        batch_key, mask_key: where the token ids / attention mask sit in a
            training batch (dict key, or index for tuples) for frequency counting; a
            tuple/list batch with a string `batch_key` is read at its first 2-D integer
            tensor. Masked-LM batches count `labels` where they are not -100 (the
            uncorrupted text), never the mask token (see `TokenCounter`).
        count_fn: `batch -> token ids` for batch formats the above cannot read.
        store_dir: where the snapshot store goes (default `<log_dir>/normx`).
        media_probes: how many probes get heatmap images / HTML (cost control).
        probe_batch_size: probes per forward pass (bounds memory).
        faithfulness_every: evaluate AOPC faithfulness at every n-th snapshot (and the
            final one); None turns it off.
        faithfulness_methods: methods compared (`normx_callbacks.METHODS`); default the
            forward-only ones; gradient methods need `pip install 'normx-callbacks[baselines]'`.
        faithfulness_probes: how many probes (the first n) the faithfulness evaluation uses.
        faithfulness_replacement: how AOPC removes a token (`normx_callbacks.REPLACEMENTS`):
            "auto" (default; see `resolve_replacement`), "mask", "unk", "pad", "eos" or
            "attention" (attention mask 0, positions kept).
        state_key_suffix: distinguishes two instances in one Trainer.

    Logged metrics (prefix `normx/`; `<l>` is a layer index):
        - `embedding/{mean,std,min,max,median,p05,p95}`: input-embedding row norms
        - `embedding/drift`: relative change of the norm vector since the last snapshot
        - `embedding/norm_logfreq_spearman`: Spearman(norm, log frequency) over seen tokens
        - `embedding/tied`: 1 if input and output embeddings share weights
        - `embedding/track/<word>`: norm of each tracked token
        - `probe/target_prob`, `probe/target_logit`: mean over probes (`probe/probes` of them)
        - `probe/accuracy`: fraction of probes with target logit > foil logit, over the
          `probe/accuracy_probes` probes with a foil and a finite contrast
        - `probe/contrast`: mean target-minus-foil logit at the explained position
        - `probe/{accuracy,contrast}/<group>`: the same per probe group (e.g. BLiMP paradigm)
        - `alignment/{ap,dp_raw,dp_z}` and `alignment/{ap,dp}_random`: evidence alignment of
          cue words (NormXLogit, the model's last layer whatever `layers` lists): Average
          Precision, the paper's Dot Product, its scale-free form on per-probe standardised
          scores, and their exact random baselines; `alignment/probes` counts the probes that
          entered, `alignment/probes_without_cues` those left out for having no cue word;
          `alignment/ap_logat` the AP of LogAt alone
        - `alignment/ap_layer<l>`: AP per requested layer
        - `stability/spearman`: rank stability of NormXLogit vs the previous snapshot
        - `importance/norm_logat_spearman`: Spearman(norm, LogAt) over probe tokens
        - `nonfinite/{embedding,scores,logits}`: count of NaN/Inf embedding norms, scores
          and target logits (warns when > 0; the store's `nonfinite` table says where)
        - `faithfulness/<method>/{comprehensiveness,sufficiency}`: AOPC every
          `faithfulness_every` snapshots; `.../seconds_per_instance` its cost;
          `faithfulness/probes` and `faithfulness/degenerate_cells` (see `aopc`); per probe,
          with the replacement used, in the store's `faithfulness` table
        Probe-averaged metrics carry a seeded 95% bootstrap interval over probes in the
        store's `metrics` table (`low`, `high`; NaN where there is none).
        - `snapshot/seconds`: wall time of the snapshot
    Media: `normx/embedding/norms` histogram, `normx/embedding/top` table,
    `normx/heatmap/<probe>/layers` and `/history` images, `normx/tokens/<probe>`
    tables (TensorBoard Markdown, W&B `wandb.Table`), `normx/html/<probe>` (W&B).
    """

    def __init__(
        self,
        probes: ProbeSet | Sequence | str | os.PathLike | None = None,
        *,
        tokenizer: Any = None,
        model_attr: str | None = None,
        adapter: ModelAdapter | None = None,
        schedule: str = "log",
        every_n_steps: int = 100,
        steps: Sequence[int] | None = None,
        log_base: int = 2,
        layers: str | Sequence[int] | None = "all",
        norm: str = "layer0",
        objective: str = "auto",
        track_tokens: Sequence[str] = (),
        top_k: int = 20,
        batch_key: str | int = "input_ids",
        mask_key: str | int | None = "attention_mask",
        count_fn: Callable[[Any], Tensor] | None = None,
        store_dir: str | os.PathLike | None = None,
        media_probes: int = 2,
        probe_batch_size: int = 32,
        history_length: int = 64,
        faithfulness_every: int | None = 4,
        faithfulness_methods: Sequence[str] = FORWARD_METHODS,
        faithfulness_probes: int = 16,
        faithfulness_replacement: str = "auto",
        state_key_suffix: str = "",
    ):
        super().__init__()
        # None: taken from `trainer.datamodule.probes` at setup (train.py's data modules).
        self.probes = None if probes is None else ProbeSet.coerce(probes)
        self.schedule = SnapshotSchedule(schedule, every_n_steps=every_n_steps, steps=steps,
                                         base=log_base)
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is not one of {NORMS}")
        if objective not in ("auto", "causal", "masked"):
            raise ValueError(f"objective={objective!r} is not one of ('auto', 'causal', 'masked')")
        if isinstance(layers, str) and layers != "all":
            raise ValueError(f"layers={layers!r}: use 'all', None or a list of layer indices")
        if isinstance(layers, (list, tuple)) and (
            not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
        ):
            raise ValueError(f"layers={layers!r}: use 'all', None or a non-empty list of layer "
                             "indices (ints)")
        for name, value in (("top_k", top_k), ("media_probes", media_probes),
                            ("probe_batch_size", probe_batch_size),
                            ("history_length", history_length),
                            ("faithfulness_probes", faithfulness_probes),
                            ("faithfulness_every", faithfulness_every or 1)):
            least = 1 if name in ("probe_batch_size", "faithfulness_probes",
                                  "faithfulness_every") else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                kind = "positive" if least else "non-negative"
                raise ValueError(f"{name}={value!r} must be a {kind} integer")
        unknown = [m for m in faithfulness_methods if m not in METHODS]
        if unknown or not faithfulness_methods:
            raise ValueError(f"faithfulness_methods={list(faithfulness_methods)!r}: unknown "
                             f"{unknown}; valid names are {METHODS}")
        self.faithfulness_every = faithfulness_every
        self.faithfulness_methods = tuple(faithfulness_methods)
        self.faithfulness_probes = faithfulness_probes
        if faithfulness_replacement not in REPLACEMENTS:
            raise ValueError(f"faithfulness_replacement={faithfulness_replacement!r} is not one "
                             f"of {REPLACEMENTS}")
        self.faithfulness_replacement = faithfulness_replacement
        self.tokenizer = tokenizer
        self.model_attr = model_attr
        self.adapter = adapter
        self._user_adapter = adapter  # else found anew at each setup: the model may change
        self.layers = list(layers) if isinstance(layers, (list, tuple)) else layers
        self.norm = norm
        self.objective = objective
        self.track_tokens = list(track_tokens)
        self.top_k = top_k
        self.batch_key = batch_key
        self.mask_key = mask_key
        if count_fn is not None and not callable(count_fn):
            raise ValueError(f"count_fn={count_fn!r} must be a callable batch -> token ids")
        self.count_fn = count_fn
        self.store_dir = store_dir
        self.media_probes = media_probes
        self.probe_batch_size = probe_batch_size
        self.history_length = history_length
        self.state_key_suffix = state_key_suffix

        # Results of the last snapshot, as plain attributes that tests and users read.
        self.last_metrics: dict[str, float] = {}
        self.last_attribution: Attribution | None = None
        self.snapshot_steps: list[int] = []
        self.store: SnapshotStore | None = None
        self._encoded: EncodedProbes | None = None
        self._counter: TokenCounter | None = None
        self._pending: Tensor | None = None
        self._count_checked = False
        self._prev_norms: Tensor | None = None
        self._prev_scores: Tensor | None = None
        self._history: deque = deque(maxlen=history_length)
        self._last_step: int | None = None
        self._resumed_at: int | None = None
        self._sink: LoggerSink | None = None
        self._unwritten: dict[int, dict[str, pd.DataFrame]] = {}  # step -> tables, oldest first
        self._run: dict | None = None  # run.json of the store being written (rank zero)
        self._restored: dict | None = None  # run id and store a checkpoint restored, this fit
        self._store_root: Path | None = None
        self._run_meta: dict = {}
        self._intervals: dict[str, tuple[float, float]] = {}  # key -> 95% interval (low, high)
        self._warned_left_out: set[str] = set()  # probes already named in a warning

    @property
    def state_key(self) -> str:
        return self._generate_state_key(suffix=self.state_key_suffix)

    # ------------------------------------------------------------------ setup

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Checks the strategy, tokenizer and probes; the model is read at fit start, after
        Lightning's `configure_model` has built it."""
        if stage != "fit":
            return
        self._restored = None  # load_state_dict runs after setup when a checkpoint is given
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in _UNSUPPORTED_STRATEGIES):
            raise RuntimeError(
                f"NormXLogitCallback does not support {strategy}: sharded parameters would "
                "need gathering for every probe. For sharded training use "
                "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with "
                "fully_shard in LightningModule.configure_model (FSDP2); else strategy='ddp' "
                "(or single device), or remove the callback"
            )
        if _sharded(trainer):
            self._check_sharding(trainer, pl_module)
        self._encoded = None  # no snapshot before `on_fit_start` has read the model
        self._find_tokenizer(trainer, pl_module)
        self._find_probes(trainer)

    def _check_sharding(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """ModelParallelStrategy: FSDP2 data parallelism only, forward-only methods."""
        from lightning.pytorch.utilities.model_helpers import is_overridden

        if not is_overridden("configure_model", pl_module):
            raise RuntimeError(
                "NormXLogitCallback does not support ModelParallelStrategy: sharded parameters "
                "must come from fully_shard in LightningModule.configure_model, which "
                f"{type(pl_module).__name__} does not override; use strategy='ddp' otherwise")
        tensor_parallel = trainer.strategy.device_mesh["tensor_parallel"].size()
        if tensor_parallel > 1:
            raise RuntimeError(
                f"NormXLogitCallback does not support tensor parallelism (tensor_parallel_size="
                f"{tensor_parallel}): each layer's vectors are split across ranks. Use "
                "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) (FSDP2 "
                "data parallel)")
        gradient = [m for m in self.faithfulness_methods if m in GRADIENT_METHODS]
        if self.faithfulness_every and gradient:
            raise RuntimeError(
                f"NormXLogitCallback: faithfulness_methods {gradient} need a backward pass, "
                "which under ModelParallelStrategy would reduce gradients into the sharded "
                "parameters; use the forward-only methods there")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare(trainer, pl_module)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reads the model (built by now) and encodes the probes for it."""
        self.adapter = self._user_adapter or self._find_adapter(pl_module)
        if self._user_adapter is not None:
            try:  # the weights may have changed since the last fit: checked at every setup
                verify_adapter(self.adapter)
            except UnsupportedModelError as error:
                raise RuntimeError(f"NormXLogitCallback: the adapter disagrees with its model: "
                                   f"{error}") from error
        if self.adapter.num_layers is None:
            raise RuntimeError("NormXLogitCallback: the ModelAdapter's num_layers is not set; "
                               "pass ModelAdapter(..., num_layers=L)")
        try:
            _resolve_layers(self.layers, self.adapter.num_layers)
        except ValueError as error:
            # Caught here, not at the first snapshot (which would record every one as missing).
            raise ValueError(f"NormXLogitCallback: {error}") from None
        tokenizer = self._find_tokenizer(trainer, pl_module)
        objective = self.objective
        if objective == "auto":
            if self.adapter.kind not in ("causal", "masked"):
                raise RuntimeError(
                    f"NormXLogitCallback instruments language-model pre-training, but the model "
                    f"is a {self.adapter.kind} model; use normxlogit() directly for classifiers"
                )
            objective = self.adapter.kind
        vocab = self.adapter.embedding.num_embeddings
        if len(tokenizer) > vocab:
            raise RuntimeError(
                f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                f"{vocab} rows: pass the tokenizer the model was built for"
            )
        max_length = self.adapter.context_length
        self._encoded = self.probes.encode(tokenizer, objective=objective, max_length=max_length)
        self._objective = objective
        # One rule for special tokens: never ranked by alignment, never removed by AOPC.
        self._protect = special_token_mask(self._encoded.input_ids, tokenizer)
        self._tokens = self._encoded.tokens
        self._track_ids = self._resolve_tracked(tokenizer)
        self._token_strings = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self._text_of = partial(readable_tokens, tokenizer)  # ids -> decoded token text
        if self.faithfulness_every:
            gradient = [m for m in self.faithfulness_methods if m in GRADIENT_METHODS]
            if gradient:
                require_captum(gradient[0])  # a missing optional backend fails here, not mid-run
            self._replacement = resolve_replacement(tokenizer, self.faithfulness_replacement,
                                                    attention=self.adapter.accepts_mask)
            if self.faithfulness_replacement == "auto" and self._replacement.strategy in (
                    "unk", "pad"):
                log.warning("NormXLogitCallback: the tokenizer has no mask or eos token and the "
                            "model takes no attention mask, so faithfulness replaces tokens with "
                            "%s %r, which training may never have shown the model; pass "
                            "faithfulness_replacement= to choose", self._replacement.strategy,
                            self._replacement.token)
            if self._replacement.strategy == "attention" and not self.adapter.accepts_mask:
                raise ValueError("NormXLogitCallback: faithfulness_replacement resolves to "
                                 "'attention' but the model takes no attention mask; pass "
                                 "faithfulness_replacement='eos' (or another token)")
        counter = TokenCounter(vocab, batch_key=self.batch_key, mask_key=self.mask_key,
                               masked=objective == "masked",
                               mask_token_id=getattr(tokenizer, "mask_token_id", None),
                               count_fn=self.count_fn)
        if self._counter is not None and self._counter.vocab_size == vocab:
            counter.counts = self._counter.counts  # loaded from a checkpoint
        self._counter = counter
        self._count_checked = False
        self._sink = LoggerSink(trainer.loggers)
        # On every rank: `trainer.log_dir` broadcasts, so calling it on rank 0 alone hangs DDP.
        self._store_root = Path(self.store_dir) if self.store_dir else self._default_store(trainer)
        self._run_meta = {
            "objective": objective,
            "norm": self.norm,
            "layers": self.layers,
            "model": type(self.adapter.module).__name__ if self.adapter.module else None,
            "num_layers": self.adapter.num_layers,
            "vocab_size": vocab,
            "tied_embeddings": self.adapter.tied,
            "probes": len(self.probes),
        }
        if trainer.is_global_zero:
            SnapshotStore(self._store_root)  # a path that can never be a store fails here
        # The store itself is chosen in on_train_start, once a checkpoint's run is restored.

    def _find_adapter(self, pl_module: pl.LightningModule) -> ModelAdapter:
        if self.model_attr:
            try:
                model = _get_attr_path(pl_module, self.model_attr)
            except AttributeError:
                raise RuntimeError(
                    f"NormXLogitCallback(model_attr={self.model_attr!r}): "
                    f"{type(pl_module).__name__} has no such attribute"
                ) from None
        else:
            from transformers import PreTrainedModel

            found = [(name, m) for name, m in pl_module.named_modules()
                     if isinstance(m, PreTrainedModel)]
            # Outermost models only: a CausalLM contains its base model.
            outer = [(n, m) for n, m in found
                     if not any(n != o and n.startswith(o + ".") for o, _ in found if o)]
            if not outer:
                model = _plain_model(pl_module)
                return self._resolve(model)
            # A frozen model (a teacher, a reference) is not the one being trained.
            trainable = [(n, m) for n, m in outer if _trainable(m)]
            if len(outer) > 1 and len(trainable) == 1:
                log.info("NormXLogitCallback: watching %r, the only Hugging Face model with "
                         "trainable parameters (frozen: %s)", trainable[0][0],
                         [n for n, m in outer if m is not trainable[0][1]])
                outer = trainable
            if len(outer) != 1:
                names = [n or "<the module itself>" for n, _ in outer]
                raise RuntimeError(
                    f"NormXLogitCallback found {len(outer)} Hugging Face models in "
                    f"{type(pl_module).__name__} ({names}); pass model_attr='name' or "
                    "adapter=ModelAdapter(...)"
                )
            model = _choose_model(pl_module, outer)
        return self._resolve(model)

    @staticmethod
    def _resolve(model) -> ModelAdapter:
        try:
            return resolve_adapter(model)
        except UnsupportedModelError as error:
            raise RuntimeError(f"NormXLogitCallback cannot read the model: {error}") from error

    def _find_probes(self, trainer: pl.Trainer) -> None:
        if self.probes is None:
            probes = getattr(trainer.datamodule, "probes", None)
            if probes is None:
                raise RuntimeError(
                    "NormXLogitCallback has no probes: pass probes=[...] (texts, dicts, a "
                    "ProbeSet or a YAML/JSONL path), or give the DataModule a `probes` attribute"
                )
            self.probes = ProbeSet.coerce(probes)

    def _find_tokenizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        tokenizer = self.tokenizer
        if tokenizer is None:
            tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is None and trainer.datamodule is not None:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            raise RuntimeError(
                "NormXLogitCallback needs a tokenizer: pass tokenizer=..., or set "
                "`self.tokenizer` on the LightningModule or the DataModule"
            )
        return tokenizer

    def _resolve_tracked(self, tokenizer) -> dict[str, int]:
        tracked = {}
        for word in self.track_tokens:
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                raise RuntimeError(
                    f"track_tokens: {word!r} is not a single token for this tokenizer "
                    f"(it splits into {len(ids)}); track single-token words"
                )
            tracked[word] = ids[0]
        return tracked

    @staticmethod
    def _default_store(trainer: pl.Trainer) -> Path:
        base = trainer.log_dir or trainer.default_root_dir
        return Path(base) / STORE_DIRNAME

    # ------------------------------------------------------------------ run identity

    def _open_store(self, trainer: pl.Trainer) -> None:
        """Choose the store of this fit and record its run (``run.json``).

        A resume writes into the store of the run its checkpoint came from; a fit that goes
        on from the steps this callback already took (same callback, same trainer) keeps its
        store; a fresh run gets a new run id and never writes into another run's store.
        """
        restored, self._restored = self._restored, None
        root = self._store_root
        if restored is None and self._run is not None and trainer.global_step > 0:
            return  # fitting on in memory: the same run, the same store
        if restored is not None and restored.get("run_id"):
            old = Path(restored["store"]) if restored.get("store") else None
            record = read_run_record(old) if old is not None else None
            if record is not None and record["run_id"] == restored["run_id"]:
                self._use_store(old, record)
                return
            run = self._new_run(trainer, continues=restored["run_id"])
            root = self._free_root(root, run["run_id"], quiet=True)
            log.warning("NormXLogitCallback: the store of run %s (%s) is gone; this resumed run "
                        "writes a new store at %s that records which run it continues",
                        restored["run_id"], old, root)
        else:
            run = self._new_run(trainer, continues=None)
            if restored is not None and read_run_record(root) is None:
                # A checkpoint from before stores recorded their run: its store is this one.
                self._use_store(root, run)
                return
            root = self._free_root(root, run["run_id"])
        self._use_store(root, run)

    def _new_run(self, trainer: pl.Trainer, *, continues: str | None) -> dict:
        loggers = [{"type": type(lg).__name__, "name": _attr_or_none(lg, "name"),
                    "version": _attr_or_none(lg, "version")} for lg in trainer.loggers]
        wandb = [lg["version"] for lg in loggers if lg["type"] == "WandbLogger"]
        return {"run_id": uuid.uuid4().hex, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "loggers": loggers,
                "wandb_run_id": wandb[0] if wandb else None, "continues": continues}

    def _free_root(self, root: Path, run_id: str, *, quiet: bool = False) -> Path:
        """``root``, or the store beside it when ``root`` already holds another run."""
        record = read_run_record(root)
        if (record is None or record["run_id"] != run_id) and holds_snapshots(root):
            other = record["run_id"] if record else "without a run id"
            beside = sibling_root(root, run_id)
            if not quiet:
                log.warning("NormXLogitCallback: %s holds another run's snapshots (run %s); "
                            "this run (%s) writes its store beside it at %s", root, other,
                            run_id, beside)
            return beside
        return root

    def _use_store(self, root: Path, run: dict) -> None:
        self.store = SnapshotStore(root, run_meta=self._run_meta)
        write_run_record(root, run)
        self._run = run

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in setup: Lightning restores a checkpoint's callback state after setup.
        if trainer.is_global_zero:
            self._open_store(trainer)
        if self._resumed_at is not None and self.store is not None:
            # Snapshots a killed run wrote after its last checkpoint are re-taken now.
            self.store.truncate_after(trainer.global_step)
            self._resumed_at = None
        self._maybe_snapshot(trainer, force=False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        counts = self._counter.batch_counts(batch)  # on the batch's device, no host sync
        if counts is not None:
            self._pending = counts if self._pending is None else self._pending + counts

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._count_checked:
            # One host sync, once per fit: a batch format the counter cannot read must not
            # leave every count 0 (and the norm/frequency correlation NaN) without a word.
            self._count_checked = True
            if self._pending is None or int(self._pending.sum()) == 0:
                log.warning("NormXLogitCallback: %s", self._counter.not_counted_message(batch))
        self._maybe_snapshot(trainer, force=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_snapshot(trainer, force=True)
        self._retry_unwritten(last_chance=True)

    def _maybe_snapshot(self, trainer: pl.Trainer, *, force: bool) -> None:
        if trainer.sanity_checking or self._encoded is None:
            return
        step = trainer.global_step
        if step == self._last_step:
            return  # gradient accumulation: several batches share one step
        if not force and step not in self.schedule:
            return
        self._last_step = step
        # Every rank reaches this point at the same steps: the one collective lives here.
        counts = self._reduce_counts(trainer)
        # The last step is final whether on_train_end or the schedule reaches it first.
        final = force or (trainer.max_steps is not None and 0 < trainer.max_steps <= step)
        if _sharded(trainer):
            self._collective_snapshot(trainer, step, counts, final)
        elif _distributed(trainer):
            self._shared_snapshot(trainer, step, counts, final)
        elif trainer.is_global_zero:
            self._snapshot(trainer, step, counts, final=final)

    def _reduce_counts(self, trainer: pl.Trainer) -> Tensor:
        pending = self._pending
        if pending is None:
            device = self.adapter.embedding.weight.device
            pending = torch.zeros(self._counter.vocab_size, dtype=torch.long, device=device)
        if trainer.world_size > 1:
            pending = trainer.strategy.reduce(pending, reduce_op="sum")
        self._counter.merge_(pending)
        self._pending = None
        return self._counter.counts

    # ------------------------------------------------------------------ snapshot

    def _shared_snapshot(self, trainer: pl.Trainer, step: int, counts: Tensor,
                         final: bool) -> None:
        """Every rank measures its share of the probes (and of the faithfulness probes); rank
        0 gathers the shares, in probe order, and writes. A rank whose share fails sends the
        error instead, so every rank reaches the gather and training goes on."""
        start = time.perf_counter()
        rank, world = trainer.global_rank, trainer.world_size
        due = trainer.strategy.broadcast(self._faithfulness_due(final), src=0)
        with _preserved_rng():
            try:
                rows = _share(len(self._encoded), rank, world)
                with trainer.precision_plugin.forward_context():
                    part = self._attribute(rows) if rows else None
                faith_rows = _share(min(self.faithfulness_probes, len(self._encoded)), rank,
                                    world)
                faith = self._faithfulness_parts(trainer, faith_rows) if due else None
                mine: object = (rows, part, faith)
            except Exception as error:  # noqa: BLE001 - sent to rank 0, recorded as missing
                mine = RuntimeError(f"rank {rank}: {type(error).__name__}: {error}")
        gathered = [None] * world if rank == 0 else None
        torch.distributed.gather_object(mine, gathered, dst=0)
        if rank == 0:
            self._snapshot(trainer, step, counts, final=final, shares=(start, gathered, due))

    def _collective_snapshot(self, trainer: pl.Trainer, step: int, counts: Tensor,
                             final: bool) -> None:
        """FSDP2: every rank runs every probe forward, in the same order, so the all-gathers
        of the sharded blocks match; a sharded embedding is gathered on every rank; rank 0
        writes."""
        start = time.perf_counter()
        due = trainer.strategy.broadcast(self._faithfulness_due(final), src=0)
        weight = None
        with _preserved_rng():
            try:
                rows = list(range(len(self._encoded)))
                with trainer.precision_plugin.forward_context():
                    part = self._attribute(rows)
                faith = (self._faithfulness_parts(
                    trainer, range(min(self.faithfulness_probes, len(self._encoded))))
                    if due else None)
                weight = _full_tensor(self.adapter.embedding.weight.detach())
                mine: object = (rows, part, faith)
            except Exception as error:  # noqa: BLE001 - recorded as missing by rank 0
                mine = error
        if trainer.is_global_zero:
            self._snapshot(trainer, step, counts, final=final, shares=(start, [mine], due),
                           weight=weight)

    def _snapshot(self, trainer: pl.Trainer, step: int, counts: Tensor, final: bool = False,
                  shares: tuple | None = None, weight: Tensor | None = None) -> None:
        start = time.perf_counter() if shares is None else shares[0]
        with _preserved_rng():
            try:
                if shares is None:
                    with trainer.precision_plugin.forward_context():
                        attribution = self._attribute(range(len(self._encoded)))
                    faith = (self._faithfulness_parts(
                        trainer, range(min(self.faithfulness_probes, len(self._encoded))))
                        if self._faithfulness_due(final) else None)
                else:
                    attribution, faith = _merge_shares(shares[1], shares[2])
                embed = self._embeddings(counts, weight)
                metrics = self._metrics(attribution, embed)
                faithfulness = None
                if faith is not None:
                    found, faithfulness = self._faithfulness_summary(faith)
                    metrics.update(found)
                metrics["snapshot/seconds"] = time.perf_counter() - start
                tables = self._tables(step, attribution, embed, counts)
                if faithfulness is not None:
                    tables["faithfulness"] = faithfulness
            except Exception as error:  # the training run must never die for a probe
                log.warning("NormXLogitCallback: snapshot at step %d failed (%s: %s); "
                            "recorded as missing", step, type(error).__name__, error)
                self._mark_missing(step, f"{type(error).__name__}: {error}")
                return
            nan = (float("nan"), float("nan"))
            bounds = [self._intervals.get(k, nan) for k in metrics]
            tables["metrics"] = pd.DataFrame({"key": list(metrics), "value": list(metrics.values()),
                                              "low": [lo for lo, _ in bounds],
                                              "high": [hi for _, hi in bounds]})
            self._write(step, tables)
            try:
                self._log(step, metrics, attribution, embed, tables)
            except Exception as error:  # e.g. a figure that cannot be drawn: the store has it
                log.warning("NormXLogitCallback: logging the snapshot at step %d failed (%s: %s); "
                            "it is in the snapshot store", step, type(error).__name__, error)
        self.last_metrics = metrics
        self.last_attribution = attribution
        self.snapshot_steps.append(step)

    def _faithfulness_due(self, final: bool) -> bool:
        every = self.faithfulness_every
        return bool(every) and (final or len(self.snapshot_steps) % every == 0)

    def _faithfulness_parts(self, trainer: pl.Trainer, rows: Sequence[int]) -> list[pd.DataFrame]:
        """Per-probe AOPC rows of the configured methods on the faithfulness probes at `rows`
        (a subset of the first `faithfulness_probes`). A model that takes no attention mask
        sees padding as text: probes of each length are evaluated apart."""
        rows = list(rows)
        if not rows:
            return []
        subset = self._encoded.select(rows)
        protect = self._protect[rows].to(self.adapter.embedding.weight.device)
        groups = ([(list(range(len(subset))), subset)] if self.adapter.accepts_mask
                  else subset.equal_length_groups())
        parts = []
        for group_rows, group in groups:
            with trainer.precision_plugin.forward_context():
                parts.append(faithfulness_rows(
                    self.adapter, group, self.faithfulness_methods,
                    replacement=self._replacement,
                    protect=protect[group_rows][:, : group.input_ids.shape[1]],
                    batch_size=self.probe_batch_size))
        return parts

    def _faithfulness_summary(self, parts: list[pd.DataFrame]) -> tuple[dict[str, float],
                                                                          pd.DataFrame]:
        """The scalars (intervals in `_intervals`) and the per-probe `faithfulness` table from
        the rows of every group and rank, put in method and probe order first: the seeded
        bootstrap intervals depend on the order, which must not depend on the sharing."""
        methods = {m: i for i, m in enumerate(self.faithfulness_methods)}
        probes = {p: i for i, p in enumerate(self._encoded.ids)}
        rows = pd.concat(parts, ignore_index=True)
        rows = rows.sort_values(["method", "probe_id"], kind="stable", key=lambda c: c.map(
            methods if c.name == "method" else probes)).reset_index(drop=True)
        table = summarise_faithfulness(rows)
        first = rows[rows["method"] == rows["method"].iloc[0]]
        out = {"faithfulness/probes": float(len(first))}
        for row in table.itertuples(index=False):
            for name in ("comprehensiveness", "sufficiency"):
                key = f"faithfulness/{row.method}/{name}"
                out[key] = float(getattr(row, name))
                self._intervals[key] = (float(getattr(row, f"{name}_low")),
                                        float(getattr(row, f"{name}_high")))
            out[f"faithfulness/{row.method}/seconds_per_instance"] = float(
                row.seconds_per_instance)
        out["faithfulness/degenerate_cells"] = float(first["degenerate_cells"].sum())
        return out, rows

    def _attribute(self, rows: Sequence[int]) -> Attribution:
        """NormXLogit of the probes at `rows`, on the CPU."""
        adapter = self.adapter
        enc = self._encoded.select(list(rows)).to(adapter.embedding.weight.device)
        return normxlogit(
            adapter, enc.input_ids, enc.attention_mask, positions=enc.positions,
            targets=enc.targets, foils=enc.foils if bool((self._encoded.foils >= 0).any())
            else None, layers=self.layers, norm=self.norm, batch_size=self.probe_batch_size,
        ).cpu()

    def _embeddings(self, counts: Tensor, weight: Tensor | None = None):
        if weight is None:
            weight = self.adapter.embedding.weight.detach()
        return snapshot_embeddings(weight, counts=counts, previous=self._prev_norms,
                                   top_k=self.top_k, tied=self.adapter.tied)

    def _metrics(self, attr: Attribution, embed) -> dict[str, float]:
        """The snapshot's scalars; probe-averaged ones also get an interval in `_intervals`."""
        self._intervals: dict[str, tuple[float, float]] = {}
        m: dict[str, float] = {f"embedding/{k}": v for k, v in embed.stats.items()}
        m["embedding/tied"] = float(embed.tied)
        if embed.drift is not None:
            m["embedding/drift"] = embed.drift
        m["embedding/norm_logfreq_spearman"] = embed.norm_logfreq_spearman
        for word, token_id in self._track_ids.items():
            m[f"embedding/track/{word}"] = float(embed.norms[token_id])
        self._mean(m, "probe/target_prob", attr.target_probs)
        self._mean(m, "probe/target_logit", attr.target_logits)
        m["probe/probes"] = float(len(attr.target_probs))
        enc = self._encoded
        has_foil = enc.foils >= 0
        if bool(has_foil.any()):
            rows = torch.arange(len(enc))[has_foil]
            contrast = attr.contrast_logat[rows, attr.positions[rows]].double()
            self._mean(m, "probe/contrast", contrast)
            # A NaN contrast is neither right nor wrong: it stays out of the accuracy.
            correct = torch.where(torch.isnan(contrast), contrast, (contrast > 0).double())
            self._mean(m, "probe/accuracy", correct)
            m["probe/accuracy_probes"] = float((~torch.isnan(contrast)).sum())
            groups = [enc.probes[i].group for i in rows.tolist()]
            for group, (accuracy, mean) in group_contrast(contrast, groups).items():
                m[f"probe/accuracy/{group}"] = accuracy
                m[f"probe/contrast/{group}"] = mean
        without_cues = int((~enc.cue_mask.any(dim=1)).sum())
        if without_cues and bool(enc.cue_mask.any()):
            m["alignment/probes_without_cues"] = float(without_cues)  # left out of alignment
        if bool(enc.cue_mask.any()):
            m.update(self._alignment(attr))
        if self._prev_scores is not None and self._prev_scores.shape == attr.scores.shape:
            m["stability/spearman"] = rank_stability(self._prev_scores, attr.scores)
        m["importance/norm_logat_spearman"] = spearman(attr.norms[attr.valid],
                                                       attr.logat[attr.valid])
        bad_rows = torch.nonzero(~torch.isfinite(embed.norms)).flatten().tolist()
        bad_scores = int((~torch.isfinite(attr.scores[attr.valid])).sum())
        bad_logits = int((~torch.isfinite(attr.target_logits)).sum())
        m["nonfinite/embedding"] = float(len(bad_rows))
        m["nonfinite/scores"] = float(bad_scores)
        m["nonfinite/logits"] = float(bad_logits)
        if bad_rows or bad_scores or bad_logits:
            log.warning("NormXLogitCallback: non-finite values at this snapshot: %d embedding "
                        "norms (token ids %s%s), %d scores, %d target logits (diverging run or "
                        "fp16 overflow?); the store's `nonfinite` table lists them",
                        len(bad_rows), bad_rows[:10], " ..." if len(bad_rows) > 10 else "",
                        bad_scores, bad_logits)
        self._prev_norms = embed.norms
        self._prev_scores = attr.scores
        return m

    def _mean(self, m: dict[str, float], key: str, values: Tensor) -> None:
        """``m[key]`` = mean of the finite-or-NaN per-probe ``values`` (NaN left out), with
        its seeded bootstrap interval over probes in `_intervals`."""
        values = values.detach().double().cpu().numpy()
        kept = values[~np.isnan(values)]
        m[key] = float(kept.mean()) if kept.size else float("nan")
        self._intervals[key] = bootstrap_interval(kept)

    def _alignment(self, attr: Attribution) -> dict[str, float]:
        """`alignment/*` from the model's last layer (whatever `layers` lists) and AP per
        listed layer; a probe with cues that drops out is named once in a warning."""
        enc = self._encoded
        keep = ranked_positions(attr.valid, attr.positions, self._objective, self._protect)
        last = alignment_per_probe(attr.scores[:, None], enc.cue_mask, keep)
        entered = ~torch.isnan(last["ap"][:, 0])
        out = {"alignment/probes": float(entered.sum())}
        for key, values in last.items():
            self._mean(out, f"alignment/{key}", values[:, 0])
        logat = alignment_per_probe(attr.logat[:, None], enc.cue_mask, keep)["ap"][:, 0]
        self._mean(out, "alignment/ap_logat", logat)
        if attr.layer_scores is not None and attr.layers is not None:
            per_layer = alignment_per_probe(attr.layer_scores, enc.cue_mask, keep)["ap"]
            for i, layer in enumerate(attr.layers):
                self._mean(out, f"alignment/ap_layer{layer}", per_layer[:, i])
        left_out = [enc.ids[b] for b in range(len(enc))
                    if bool(enc.cue_mask[b].any()) and not bool(entered[b])]
        new = sorted(set(left_out) - self._warned_left_out)
        if new:
            log.warning("NormXLogitCallback: probe(s) %s have cue words but none is among the "
                        "ranked positions (cue only at the explained mask slot, a special "
                        "token, or a non-finite score); they are left out of alignment/* "
                        "(alignment/probes counts those that entered)", new)
            self._warned_left_out.update(new)
        return out

    def _tables(self, step, attr: Attribution, embed, counts) -> dict[str, pd.DataFrame]:
        enc = self._encoded
        layers = list(attr.layers) if attr.layers is not None else [self.adapter.num_layers]
        tok_rows = []
        for b, probe_id in enumerate(enc.ids):
            n = int(enc.attention_mask[b].sum())
            for k, layer in enumerate(layers):
                logat = attr.layer_logat[b, k] if attr.layer_logat is not None else attr.logat[b]
                each = attr.layer_each[b, k] if attr.layer_each is not None else None
                contrast = (attr.layer_contrast[b, k] if attr.layer_contrast is not None
                            else attr.contrast_logat[b] if attr.contrast_logat is not None
                            else None)
                for t in range(n):
                    tok_rows.append((
                        probe_id, layer, t, int(enc.input_ids[b, t]), self._tokens[b][t],
                        bool(enc.cue_mask[b, t]), t == int(attr.positions[b]),
                        float(attr.norms[b, t]), float(logat[t]), float(attr.norms[b, t] * logat[t]),
                        float("nan") if each is None else float(each[t]),
                        float("nan") if contrast is None else float(contrast[t]),
                    ))
        tokens = pd.DataFrame(tok_rows, columns=[
            "probe_id", "layer", "position", "token_id", "token", "is_cue", "is_explained",
            "norm", "logat", "score", "each", "contrast"])
        probes = pd.DataFrame({
            "probe_id": enc.ids,
            "text": [p.text for p in enc.probes],
            "group": [p.group for p in enc.probes],
            "position": attr.positions.tolist(),
            "target_id": attr.targets.tolist(),
            "target": [self._token_strings[i] if 0 <= i < len(self._token_strings) else str(i)
                       for i in attr.targets.tolist()],
            "target_given": (enc.targets >= 0).tolist(),
            "target_logit": attr.target_logits.tolist(),
            "target_prob": attr.target_probs.tolist(),
            "foil_id": enc.foils.tolist(),
            # Every piece of the target / foil word; the explained ids are the first that differ.
            "target_tokens": enc.target_tokens,
            "foil_tokens": enc.foil_tokens,
            "contrast": [float(attr.contrast_logat[b, attr.positions[b]])
                         if attr.contrast_logat is not None and enc.foils[b] >= 0
                         else float("nan") for b in range(len(enc))],
        })
        embedding = pd.DataFrame({
            "token_id": np.arange(len(embed.norms)),
            "norm": embed.norms.numpy(),
            "count": counts.numpy(),
        })
        tables = {"tokens": tokens, "probes": probes, "embedding": embedding}
        nonfinite = self._nonfinite_table(attr, embed)
        if len(nonfinite):
            tables["nonfinite"] = nonfinite
        return tables

    def _nonfinite_table(self, attr: Attribution, embed) -> pd.DataFrame:
        """Where NaN/Inf appeared: embedding rows, last-layer scores and target logits."""
        enc = self._encoded
        rows = [("embedding", None, -1, i, float(embed.norms[i]))
                for i in torch.nonzero(~torch.isfinite(embed.norms)).flatten().tolist()]
        rows += [("score", enc.ids[b], t, int(enc.input_ids[b, t]), float(attr.scores[b, t]))
                 for b, t in torch.nonzero(attr.valid & ~torch.isfinite(attr.scores)).tolist()]
        rows += [("target_logit", enc.ids[b], int(attr.positions[b]), int(attr.targets[b]),
                  float(attr.target_logits[b]))
                 for b in torch.nonzero(~torch.isfinite(attr.target_logits)).flatten().tolist()]
        frame = pd.DataFrame(rows, columns=["source", "probe_id", "position", "token_id", "value"])
        frame.insert(4, "token", [self._token_strings[i] if 0 <= i < len(self._token_strings)
                                  else str(i) for i in frame["token_id"]])
        return frame

    def _write(self, step: int, tables: dict[str, pd.DataFrame]) -> None:
        if self.store is None:
            return
        self._retry_unwritten()
        try:
            self.store.write(step, tables)
        except ValueError as error:  # a table Parquet cannot hold: a retry would fail alike
            log.warning("NormXLogitCallback: snapshot %d cannot be stored (%s); recorded as "
                        "missing", step, error)
            self._mark_missing(step, f"cannot be stored: {error}")
        except OSError as error:
            log.warning("NormXLogitCallback: could not write snapshot %d to %s (%s); kept in "
                        "memory and retried at the next snapshot, training continues", step,
                        self.store.root, error)
            self._unwritten[step] = tables
            # Recorded now, so a run killed before the retry still says what it lacks.
            self._mark_missing(step, f"write failed: {error} (will retry)")
            while len(self._unwritten) > MAX_UNWRITTEN:
                oldest = next(iter(self._unwritten))
                del self._unwritten[oldest]
                self._give_up(oldest, error)

    def _retry_unwritten(self, *, last_chance: bool = False) -> None:
        """Write the snapshots whose write failed; on the last chance, give up on the rest."""
        if self.store is None:
            return
        for step in list(self._unwritten):
            try:
                self.store.write(step, self._unwritten[step])  # clears its missing record
            except OSError as error:
                if last_chance:
                    del self._unwritten[step]
                    self._give_up(step, error)
                continue
            del self._unwritten[step]
            log.info("NormXLogitCallback: snapshot %d written on retry", step)

    def _give_up(self, step: int, error: OSError) -> None:
        log.warning("NormXLogitCallback: snapshot %d could not be written after retries (%s); "
                    "recorded as missing", step, error)
        self._mark_missing(step, f"write failed after retries: {error}")

    def _mark_missing(self, step: int, reason: str) -> None:
        if self.store is None:
            return
        try:
            self.store.mark_missing(step, reason)
        except OSError:
            log.warning("NormXLogitCallback: the store at %s is not writable at all",
                        self.store.root)

    def _log(self, step, metrics, attr: Attribution, embed, tables) -> None:
        with self._sink.snapshot(step):  # W&B: one log call for the snapshot's media
            self._log_all(step, metrics, attr, embed, tables)

    def _log_all(self, step, metrics, attr: Attribution, embed, tables) -> None:
        sink = self._sink
        sink.scalars({f"{PREFIX}/{k}": v for k, v in metrics.items()}, step)
        sink.histogram(f"{PREFIX}/embedding/norms", embed.norms.numpy(), step)
        seen, never_seen = norm_extremes(embed.norms.numpy(), self._counter.counts.cpu().numpy(),
                                         self.top_k, self._text_of)
        sink.table(f"{PREFIX}/embedding/top", seen, step)  # tokens seen in training, counts
        sink.table(f"{PREFIX}/embedding/top_never_seen", never_seen, step)
        enc = self._encoded
        self._history.append((step, attr.scores[: self.media_probes].numpy()))
        for b in range(min(self.media_probes, len(enc))):
            probe_id = enc.ids[b]
            n = int(enc.attention_mask[b].sum())
            tokens = self._tokens[b][:n]
            cues = enc.cue_mask[b, :n].tolist()
            # Figures are built lazily: only when some logger shows images.
            if attr.layer_scores is not None:
                fig = partial(plots.layer_heatmap, attr.layer_scores[b, :, :n].numpy(), tokens,
                              attr.layers, title=f"{probe_id} at step {step}", cues=cues)
                sink.figure(f"{PREFIX}/heatmap/{probe_id}/layers", fig, step)
            steps = [s for s, _ in self._history]
            history = np.stack([scores[b, :n] for _, scores in self._history])
            fig = partial(plots.history_heatmap, history, tokens, steps,
                          title=f"{probe_id}: NormXLogit over training", cues=cues)
            sink.figure(f"{PREFIX}/heatmap/{probe_id}/history", fig, step)
            rows = tables["tokens"]
            rows = rows[(rows.probe_id == probe_id) & (rows.layer == rows.layer.max())]
            sink.table(f"{PREFIX}/tokens/{probe_id}",
                       rows[["position", "token", "is_cue", "norm", "logat", "score"]], step)
            sink.html(f"{PREFIX}/html/{probe_id}",
                      token_html(tokens, attr.scores[b, :n].tolist(),
                                 title=f"{probe_id} step {step}"), step)

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self._last_step,
            "snapshot_steps": list(self.snapshot_steps),
            "counts": None if self._counter is None else self._counter.state_dict(),
            "prev_norms": self._prev_norms,
            "prev_scores": self._prev_scores,
            # A resume writes into this run's store, wherever its new logger writes.
            "run_id": self._run["run_id"] if self._run else None,
            "store": str(self.store.root.resolve()) if self.store is not None else None,
        }

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Batches counted since the last snapshot are still pending on each rank; fold them
        # into the saved counts or a resumed run loses them. Every rank saves a checkpoint
        # together (`Trainer.save_checkpoint` ends in a barrier), so the reduction is safe.
        if self._encoded is None or self._counter is None:
            return
        self._reduce_counts(trainer)
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None:
            state["counts"] = self._counter.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = state_dict["last_step"]
        self._resumed_at = state_dict["last_step"]
        self.snapshot_steps = list(state_dict["snapshot_steps"])
        if state_dict["counts"] is not None:
            # Restored after setup: keep the counter setup configured for this batch format.
            if self._counter is None or self._counter.vocab_size != state_dict["counts"][
                    "vocab_size"]:
                self._counter = TokenCounter(state_dict["counts"]["vocab_size"])
            self._counter.load_state_dict(state_dict["counts"])
        self._pending = None  # the checkpoint's counts already hold what was pending then
        self._prev_norms = state_dict["prev_norms"]
        self._prev_scores = state_dict["prev_scores"]
        # Checkpoints written before runs had an id restore {"run_id": None, "store": None}.
        self._restored = {"run_id": state_dict.get("run_id"), "store": state_dict.get("store")}


def _attr_or_none(obj: Any, name: str) -> Any:
    """A logger property for the run record; a logger whose property raises is not fatal."""
    try:
        return getattr(obj, name)
    except Exception as error:  # third-party loggers: anything may raise
        log.warning("NormXLogitCallback: %s.%s raised %s: %s; not recorded in run.json",
                    type(obj).__name__, name, type(error).__name__, error)
        return None


def _trainable(module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _choose_model(pl_module: pl.LightningModule, outer: list) -> Any:
    """The one Hugging Face model found, unless it is frozen while another module trains."""
    name, model = outer[0]
    if _trainable(model):
        return model
    inside = {id(p) for p in model.parameters()}
    training = [n for n, child in pl_module.named_children()
                if any(p.requires_grad and id(p) not in inside for p in child.parameters())]
    if training:
        raise RuntimeError(
            f"NormXLogitCallback: the only Hugging Face model, {name!r} "
            f"({type(model).__name__}), has no trainable parameters, while "
            f"{training[0]!r} ({type(getattr(pl_module, training[0])).__name__}) trains; its "
            "embeddings would never move. Watch the trained model with "
            f"adapter=ModelAdapter(module=pl_module.{training[0]}, ...), or pass "
            f"model_attr={name!r} to watch the frozen model on purpose"
        )
    return model


def _sharded(trainer: pl.Trainer) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(trainer.strategy, ModelParallelStrategy)


def _full_tensor(tensor: Tensor) -> Tensor:
    """A DTensor gathered on every rank (collective); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _distributed(trainer: pl.Trainer) -> bool:
    return (trainer.world_size > 1 and torch.distributed.is_available()
            and torch.distributed.is_initialized())


def _share(n: int, rank: int, world: int) -> list[int]:
    """Rank `rank`'s contiguous share of n items (sizes differ by at most one)."""
    size, extra = divmod(n, world)
    begin = rank * size + min(rank, extra)
    return list(range(begin, begin + size + (rank < extra)))


def _merge_shares(gathered: list, due: bool) -> tuple[Attribution, list[pd.DataFrame] | None]:
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


def _plain_model(pl_module: pl.LightningModule) -> torch.nn.Module:
    """The one plain PyTorch language model in `pl_module`: the outermost submodule holding
    an `nn.Embedding` and an `nn.ModuleList` (the module itself when none does), preferring
    the trainable one; discovered and verified by `resolve_adapter`."""

    def is_lm(m: torch.nn.Module) -> bool:
        kinds = {type(x) for x in m.modules()}
        return any(issubclass(k, torch.nn.Embedding) for k in kinds) and any(
            issubclass(k, torch.nn.ModuleList) for k in kinds)

    found = [(n, m) for n, m in pl_module.named_modules() if n and is_lm(m)]
    outer = [(n, m) for n, m in found
             if not any(n != o and n.startswith(o + ".") for o, _ in found)]
    if len(outer) > 1:
        outer = [(n, m) for n, m in outer if _trainable(m)] or outer
    if len(outer) > 1:
        raise RuntimeError(
            f"NormXLogitCallback found {len(outer)} language models in "
            f"{type(pl_module).__name__} ({[n for n, _ in outer]}); pass model_attr='name' or "
            "adapter=ModelAdapter(...)"
        )
    if outer:
        return outer[0][1]
    if is_lm(pl_module):
        return pl_module
    raise RuntimeError(
        f"NormXLogitCallback found no language model in {type(pl_module).__name__}: no "
        "Hugging Face model and no module holding an nn.Embedding and an nn.ModuleList of "
        "blocks (if the model is built in configure_model, build it there, not in a hook "
        "that runs later); pass model_attr='name' or adapter=ModelAdapter(...)"
    )

