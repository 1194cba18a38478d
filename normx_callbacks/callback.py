"""NormXLogitCallback: watch token importance emerge in any Lightning pre-training run.

The callback is a driver of the `Engine` (`engine.py`): it checks its arguments, finds the
model, tokenizer and probes in the Trainer, calls the engine at the scheduled steps, flushes
it around checkpoints, and keeps the run's resume state in Lightning checkpoints.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from .adapters import ModelAdapter
from .attribution import Attribution
from .drivers import DriverCore
from .engine import Engine
from .probes import ProbeSet
from .settings import Settings, check_options
from .store import STORE_DIRNAME, SnapshotStore

log = logging.getLogger(__name__)

WHO = "NormXLogitCallback"
_UNSUPPORTED_STRATEGIES = ("FSDP", "DeepSpeed", "XLA")


class NormXLogitCallback(Callback):
    """Snapshots input-embedding norms and NormXLogit attributions during training.

    At step 0, on a log-spaced schedule, then every `every_n_steps`, and at the end
    of training, the callback runs the probe set through the model (eval mode,
    no grad, RNG untouched) on the training thread; the snapshot writer (in a helper
    process by default) then builds the metrics and tables and writes the snapshot store
    (`<log_dir>/normx`, see `normx_callbacks.load_run`), and the pipeline's thread logs to
    every logger while training goes on. The pipeline is flushed before every checkpoint
    save, at the end of training and on an exception.
    The work itself is the `Engine` (`engine.py`); Fabric and plain loops drive the same
    engine through `NormXLogitMonitor`.

    Args:
        probes: a `ProbeSet`, a list of texts/dicts, a YAML/JSON/JSONL path, or
            `"blimp:PATH"` (BLiMP-format file, directory or glob, see `ProbeSet.from_blimp`);
            default `trainer.datamodule.probes`.
        tokenizer: a fast HF tokenizer; default `pl_module.tokenizer`, then
            `trainer.datamodule.tokenizer`.
        model_attr: dotted attribute path of the HF model inside the LightningModule
            (default: found automatically); or pass a `ModelAdapter` as `adapter`.
        store_dir: where the snapshot store goes (default `<log_dir>/normx`).
        **settings: every other option, with the same meaning in every driver, declared
            and documented once in `normx_callbacks.Settings` (schedule, every_n_steps,
            layers, norm, track_tokens, faithfulness_*, alignment_methods, batch_key,
            count_fn, media_probes, max_pending, writer, ...); in a LightningCLI config they
            are written flat (`every_n_steps: 500`).
        state_key_suffix: distinguishes two instances in one Trainer.
        alignment_methods: gradient methods whose evidence alignment is measured beside
            NormXLogit's, at the faithfulness cadence, as a reference: "installed" (default:
            input x gradient and Saliency, one backward pass each, no optional package), a
            list of them (Integrated Gradients: Captum, 50 passes per probe), or None.
            Skipped under FSDP2 (one info line) and when no probe has cues.

    Logged metrics (prefix `normx/`; `<l>` is a layer index; docs/reference.md has them all):
        - `embedding/{mean,std,min,max,median,p05,p95}`: input-embedding row norms
        - `embedding/drift`: relative change of the norm vector since the last snapshot
        - `embedding/norm_logfreq_spearman`: Spearman(norm, log frequency) over seen token
          types (the paper predicts < 0); `embedding/norm_infogain_spearman`: Spearman(norm,
          information gain KL(p(next | w) || p(next))) over types with >= 20 counted
          next-token pairs (the paper predicts > 0); both with intervals over types;
          `embedding/{seen,unseen}_{tokens,norm_median}`: never-seen tokens apart;
          `embedding/bigram_pairs{,_dropped}`
        - `embedding/tied`: 1 if input and output embeddings share weights
        - `embedding/track/<word>`: norm of each tracked token
        - `probe/target_prob`, `probe/target_logit`: mean over probes (`probe/probes` of them)
        - `probe/accuracy`: fraction of probes with target logit > foil logit, over the
          `probe/accuracy_probes` probes with a foil and a finite contrast
        - `probe/contrast`: mean target-minus-foil logit at the explained position
        - `probe/{accuracy,contrast}/<group>`: the same per probe group (e.g. BLiMP paradigm)
        - `probe/prediction_depth`: mean first layer whose logit lens ranks the target first
          (over the probes where one does); `probe/prediction_depth_never` counts the others
        - `alignment/{ap,dp_raw,dp_z}` and `alignment/{ap,dp}_random`: evidence alignment of
          cue words (NormXLogit, the model's last layer whatever `layers` lists) over every
          real position but the explained one: Average Precision, the paper's Dot Product,
          its scale-free form on per-probe standardised scores, and their exact random
          baselines; `alignment/probes` counts the probes that entered,
          `alignment/probes_without_cues` those left out for having no cue word,
          `alignment/probes_cue_at_target` those whose cue sits only at the explained
          position; `alignment/ap_logat` the AP of LogAt alone
        - controls: `alignment/ap_contrast(_random)` (norm x target-minus-foil LogAt),
          `alignment/cue_over_attractor(_random)` (share of probes whose cue outscores every
          attractor; ties 0.5), `alignment/<key>_reference` (the first snapshot's value);
          paired differences over probes `alignment/<key>_vs_random` and `_vs_reference`
        - `alignment/<method>/{ap,ap_random,ap_vs_random,normxlogit_minus_method,spearman,
          seconds}`: the gradient reference (`alignment_methods`) at faithfulness snapshots
        - `alignment/ap_layer<l>`: AP per requested layer
        - `stability/spearman`: rank stability of NormXLogit vs the previous snapshot
        - `importance/norm_logat_spearman`: Spearman(norm, LogAt) over probe tokens
        - `nonfinite/{embedding,scores,logits}`: count of NaN/Inf embedding norms, scores
          and target logits (warns when > 0; the store's `nonfinite` table says where)
        - `faithfulness/<method>/{comprehensiveness,sufficiency}`: AOPC every
          `faithfulness_every` snapshots, explaining each probe's target where it has one;
          `.../seconds_per_instance` its cost; `faithfulness/probes` and
          `faithfulness/degenerate_cells` (see `aopc`); per probe, with the replacement used
          and what was explained, in the store's `faithfulness` table
        Probe-averaged metrics carry a seeded 95% bootstrap interval over probes in the
        store's `metrics` table (`low`, `high`; NaN where there is none).
        - `snapshot/train_seconds`: wall time the training thread spent on the snapshot
          (counts reduced, probe forward, embedding norms, copies to the CPU, on rank 0 the
          gather; when faithfulness is due, its forwards or the weights copy for the
          helper); `snapshot/worker_seconds`: wall time the helper process (or worker
          thread) spent before the store write (faithfulness forwards it ran, metrics,
          tables; the write, images and logger calls come after and are not in it)
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
        store_dir: str | os.PathLike | None = None,
        state_key_suffix: str = "",
        **settings: Any,
    ):
        super().__init__()
        check_options(settings, WHO)
        self.engine = Engine(probes, Settings(**settings), owner=WHO)
        self.core = DriverCore(self.engine)
        self.tokenizer = tokenizer
        self.model_attr = model_attr
        self._user_adapter = adapter  # else found anew at each fit: the model may change
        self.store_dir = store_dir
        self.state_key_suffix = state_key_suffix
        self._ready = False  # no snapshot before on_fit_start has read the model
        self._store_root: Path | None = None

    # Results and settings, read through the engine.
    settings: Settings = property(lambda self: self.engine.settings)
    probes = property(lambda self: self.engine.probes)
    schedule = property(lambda self: self.engine.schedule)
    adapter = property(lambda self: self.engine.adapter)
    store = property(lambda self: self.engine.store)
    last_metrics = property(lambda self: self.engine.last_metrics)
    last_attribution: Attribution | None = property(lambda self: self.engine.last_attribution)
    snapshot_steps = property(lambda self: self.engine.snapshot_steps)
    # Every snapshot that is missing, with why: also those a full disk kept out of the store.
    missing_steps: dict[int, str] = property(lambda self: dict(self.engine.failed_steps))

    @property
    def state_key(self) -> str:
        return self._generate_state_key(suffix=self.state_key_suffix)

    # ------------------------------------------------------------------ setup

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Checks the strategy, tokenizer and probes; the model is read at fit start, after
        Lightning's `configure_model` has built it."""
        if stage != "fit":
            return
        self.core.restored = None  # load_state_dict runs after setup when a checkpoint is given
        self._ready = False
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in _UNSUPPORTED_STRATEGIES):
            raise RuntimeError(
                f"NormXLogitCallback does not support {strategy}: sharded parameters would "
                "need gathering for every probe. For sharded training use "
                "ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) with "
                "fully_shard in LightningModule.configure_model (FSDP2); else strategy='ddp' "
                "(or single device), or remove the callback")
        if _sharded(trainer):
            self._check_sharding(trainer, pl_module)
        self._find_tokenizer(trainer, pl_module)
        if self.engine.probes is None:
            probes = getattr(trainer.datamodule, "probes", None)
            if probes is None:
                raise RuntimeError(
                    "NormXLogitCallback has no probes: pass probes=[...] (texts, dicts, a "
                    "ProbeSet or a YAML/JSONL path), or give the DataModule a `probes` attribute")
            self.engine.probes = ProbeSet.coerce(probes)

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
        self.engine.check_mode("collective")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prepare(trainer, pl_module)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reads the model (built by now) and prepares the engine for it."""
        adapter = self.core.read_model(pl_module, self.model_attr, self._user_adapter)
        mode = ("collective" if _sharded(trainer) else "shared" if _distributed(trainer)
                else "single")
        self.engine.prepare(adapter, self._find_tokenizer(trainer, pl_module),
                            loggers=trainer.loggers, mode=mode,
                            is_writer=trainer.is_global_zero,
                            forward_context=trainer.precision_plugin.forward_context,
                            plain_precision=str(trainer.precision) in ("32-true", "64-true"))
        # On every rank: `trainer.log_dir` broadcasts, so calling it on rank 0 alone hangs DDP.
        self._store_root = (Path(self.store_dir) if self.store_dir
                            else Path(trainer.log_dir or trainer.default_root_dir) / STORE_DIRNAME)
        if trainer.is_global_zero:
            SnapshotStore(self._store_root)  # a path that can never be a store fails here
        self._ready = True
        # The store itself is chosen in on_train_start, once a checkpoint's run is restored.

    def _find_tokenizer(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        tokenizer = self.tokenizer
        if tokenizer is None:
            tokenizer = getattr(pl_module, "tokenizer", None)
        if tokenizer is None and trainer.datamodule is not None:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            raise RuntimeError(
                "NormXLogitCallback needs a tokenizer: pass tokenizer=..., or set "
                "`self.tokenizer` on the LightningModule or the DataModule")
        return tokenizer

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in setup: Lightning restores a checkpoint's callback state after setup.
        if trainer.is_global_zero:
            self.core.start_run(self._store_root, step=trainer.global_step,
                                loggers=trainer.loggers, going_on=trainer.global_step > 0)
        self.core.restored = None
        self._maybe_snapshot(trainer, force=False)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._ready:
            self.engine.count(batch)  # on the batch's device, no host sync

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._ready:
            self.engine.check_counted(batch)
        self._maybe_snapshot(trainer, force=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._maybe_snapshot(trainer, force=True)
        self.engine.finish()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        # What was measured before the error is written; Lightning skips `teardown` then.
        self.engine.finish()
        self.engine.close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.engine.close()

    def _maybe_snapshot(self, trainer: pl.Trainer, *, force: bool) -> None:
        if not trainer.sanity_checking and self._ready:  # every rank together
            self.core.maybe_snapshot(trainer.global_step, force=force,
                                     max_steps=trainer.max_steps)

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        return self.core.state_dict()

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Batches counted since the last snapshot are still pending on each rank; fold them
        # into the saved counts or a resumed run loses them. Every rank saves a checkpoint
        # together (`Trainer.save_checkpoint` ends in a barrier), so the reduction is safe.
        if not self._ready:
            return
        self.engine.collect_counts()
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None:
            state["counts"] = self.engine.counter.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.core.load_state_dict(state_dict)


def _sharded(trainer: pl.Trainer) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(trainer.strategy, ModelParallelStrategy)


def _distributed(trainer: pl.Trainer) -> bool:
    import torch

    return (trainer.world_size > 1 and torch.distributed.is_available()
            and torch.distributed.is_initialized())
