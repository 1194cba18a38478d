"""NormXLogitTrainerCallback: the engine inside a transformers `Trainer` run.

    from transformers import Trainer, TrainingArguments
    from normx_callbacks import NormXLogitTrainerCallback

    args = TrainingArguments(output_dir="out", max_steps=1000, report_to=["tensorboard"])
    trainer = Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                      callbacks=[NormXLogitTrainerCallback(probes)])
    trainer.train()              # the store: out/normx; TensorBoard: beside the Trainer's curves

A driver of the `Engine` (`engine.py`), as thin as `NormXLogitMonitor`. Hooks used:

- `on_train_begin`: the model (the Trainer's ``model``), tokenizer (``processing_class``) and
  max steps (``state.max_steps``) come from the Trainer's own objects; the model is read and
  verified, the store opened (``<output_dir>/normx``), the run's resume state read from
  ``<output_dir>/checkpoint-N/normx_state.pt`` when the Trainer resumed at step N, the
  counting hook put on the model, and the snapshot at the start step taken when due;
- `on_step_end`: a snapshot at ``state.global_step`` when the schedule has it (the final one
  at ``max_steps``);
- `on_save`: every snapshot taken so far written, then the resume state into the checkpoint
  folder, atomically: a checkpoint's state never names a snapshot the store lacks;
- `on_train_end`: the final snapshot (an early stop), everything written, the hook removed.

Tokens are counted by a forward pre-hook on the model: every forward in training mode (the
Trainer's training steps; not evaluation, not the probes, which run in eval mode) counts
the ``input_ids`` it is given, without the ``attention_mask == 0`` positions. The user's
collator and data are not touched; several forwards per optimizer step (gradient
accumulation) are each counted once, and gradient checkpointing's recomputation, which
runs the layers again but not the model, is not counted again.

Distributed (DDP under torchrun; accelerate launch starts the same processes, untested):
every rank runs the callback, each measures its share of the probes, rank 0 gathers them
and writes. Sharded models (FSDP, FSDP2, DeepSpeed) are refused at train begin: accelerate
shards only on GPUs, so that path is untested here (under Lightning, `NormXLogitCallback`
supports FSDP2).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .adapters import ModelAdapter
from .attribution import Attribution
from .drivers import DriverCore, rank_and_world
from .engine import Engine
from .loggers import TensorBoardDirLogger, WandbRunLogger
from .settings import Settings, check_options
from .store import STORE_DIRNAME, SnapshotStore

log = logging.getLogger(__name__)

WHO = "NormXLogitTrainerCallback"
STATE_FILE = "normx_state.pt"  # in each checkpoint-N/ folder the Trainer saves
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR
# The oldest accelerate the transformers 5 Trainer runs with (1.2.0 lacks
# `unwrap_model(keep_torch_compile=)`); pyproject's `transformers-trainer` extra says the same.
ACCELERATE_MIN_VERSION = "1.3.0"
INSTALL = "pip install 'normx-callbacks[transformers-trainer]'"
# The W&B step metric the Trainer's WandbCallback defines: its curves and ours share it.
WANDB_STEP_METRIC = "train/global_step"


def require_accelerate() -> None:
    """The transformers Trainer runs on accelerate, an optional dependency of this package."""
    try:
        import accelerate
    except ImportError:
        raise ImportError(f"{WHO} needs accelerate, which the transformers Trainer runs on: "
                          f"{INSTALL}") from None
    from packaging.version import Version

    if Version(accelerate.__version__) < Version(ACCELERATE_MIN_VERSION):
        raise ImportError(f"{WHO} needs accelerate>={ACCELERATE_MIN_VERSION}, found "
                          f"{accelerate.__version__}: {INSTALL}")


class NormXLogitTrainerCallback(TrainerCallback):
    """Snapshots NormXLogit attributions and embedding norms during a transformers `Trainer`
    run: the store, metrics and media of `NormXLogitCallback` with the same settings.

    Args:
        probes: as for `NormXLogitCallback` (a `ProbeSet`, texts/dicts, a YAML/JSON/JSONL
            file, `"blimp:PATH"`).
        tokenizer: default the Trainer's ``processing_class`` (a processor's tokenizer).
        store_dir: the snapshot store; default ``<output_dir>/normx``.
        model_attr, adapter: how to find the language model inside the Trainer's model
            (default: found automatically, as the callback does).
        **settings: every other option (`normx_callbacks.Settings`: schedule,
            every_n_steps, layers, norm, track_tokens, media_probes, faithfulness_*,
            batch_key, mask_key, count_fn, max_pending, writer, ...), with the same meaning and
            defaults as for `NormXLogitCallback`.
            ``batch_key``/``mask_key``/``count_fn`` read the keyword arguments of the
            model's training forwards (a dict: ``input_ids``, ``attention_mask``, ...).

    Logging goes where the Trainer reports to (``report_to``): TensorBoard into the directory
    the Trainer's TensorBoard callback writes to, W&B into the Trainer's own run, stepped on
    ``train/global_step``; other integrations get nothing (one warning; the store has it).
    One instance per Trainer. When ``trainer.train()`` raises, call `close()` to write what
    was measured (else it is written when the interpreter exits).
    """

    def __init__(self, probes: Any, *, tokenizer: Any = None,
                 store_dir: str | os.PathLike | None = None, model_attr: str | None = None,
                 adapter: ModelAdapter | None = None, **settings: Any) -> None:
        require_accelerate()
        check_options(settings, WHO)
        self.engine = Engine(probes, Settings(**settings), owner=WHO)
        self.core = DriverCore(self.engine)
        self.tokenizer = tokenizer
        self.store_dir = store_dir
        self.model_attr = model_attr
        self._user_adapter = adapter
        self._module: nn.Module | None = None
        self._hook: Any = None
        self._max_steps: int | None = None
        self._loggers: list = []
        self._said_no_folder = False

    # Results, read through the engine.
    store = property(lambda self: self.engine.store)
    last_metrics = property(lambda self: self.engine.last_metrics)
    last_attribution: Attribution | None = property(lambda self: self.engine.last_attribution)
    snapshot_steps = property(lambda self: self.engine.snapshot_steps)
    # Every snapshot that is missing, with why: also those a full disk kept out of the store.
    missing_steps: dict[int, str] = property(lambda self: dict(self.engine.failed_steps))

    # ------------------------------------------------------------------ hooks

    def on_train_begin(self, args, state, control, model=None, processing_class=None,
                       **kwargs) -> None:
        _check_strategy(args, model)
        self._module = model
        adapter = self.core.read_model(model, self.model_attr, self._user_adapter)
        tokenizer = self._find_tokenizer(processing_class)
        rank, world = rank_and_world()
        mode = "shared" if world > 1 else "single"
        step = state.global_step
        if step == 0:
            self.core.last_step = None  # a new run, also for an instance used before
        self.core.restored = None
        if step > 0 and rank == 0:
            self._restore(args, state)
        root = self._store_root(args) if rank == 0 else None  # bad input fails before the writer starts
        if root is not None:
            SnapshotStore(root)  # a path that can never be a store fails here
        self._close_loggers()
        self._loggers = self._make_loggers(args, state) if rank == 0 else []
        autocast = _autocast(args, adapter.embedding.weight.device)
        self.engine.prepare(adapter, tokenizer, loggers=self._loggers, mode=mode,
                            is_writer=rank == 0, forward_context=autocast,
                            plain_precision=autocast is None)
        self._max_steps = state.max_steps
        if rank == 0:
            self.core.start_run(root, step=step, loggers=self._loggers,
                                going_on=self.core.last_step is not None and step > 0)
            for logger in self._loggers:  # `normx report` finds the TensorBoard runs by it
                if isinstance(logger, TensorBoardDirLogger):
                    logger.run_id = self.engine.run["run_id"]
        if world > 1:  # every rank skips or takes the same snapshots (collectives)
            self.core.last_step = _from_rank_zero(self.core.last_step)
        self._count_on(model)
        self._maybe_snapshot(step, force=False)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if not self.engine.prepared:
            return
        self._maybe_snapshot(state.global_step, force=False)

    def on_save(self, args, state, control, **kwargs) -> None:
        if not self.engine.prepared:
            return
        # Batches counted since the last snapshot are still pending on each rank: fold them
        # in (summed over ranks, every rank calls) or a resumed run loses them.
        self.engine.collect_counts()
        if not self.engine.is_writer:
            return
        folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}"
        if not folder.is_dir():
            if not self._said_no_folder:
                self._said_no_folder = True
                log.warning("%s: the Trainer saved a checkpoint, but %s is not a folder (a "
                            "hyper-parameter search run?); the resume state is not saved "
                            "and a resumed run writes a new store", WHO, folder)
            return
        # The engine flushes first: the state never names a snapshot the store lacks.
        saved = self.core.state_dict()
        _save_atomically(saved, folder / STATE_FILE)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if not self.engine.prepared:
            return
        self._maybe_snapshot(state.global_step, force=True)
        self.close()

    def close(self) -> None:
        """Write everything measured so far, stop the writer and remove the counting hook
        (`on_train_end` does; call it yourself when `trainer.train()` raised)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.engine.finish()
        self.engine.close()
        self._close_loggers()

    # ------------------------------------------------------------------ helpers

    def _maybe_snapshot(self, step: int, *, force: bool) -> None:
        self.core.maybe_snapshot(step, force=force, max_steps=self._max_steps)

    def _count_on(self, model: nn.Module) -> None:
        """The counting hook on the Trainer's model (its DDP wrapper calls it too)."""
        if self._hook is not None:
            self._hook.remove()
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not module.training:  # evaluation, prediction, the probe forwards
            return
        key = self.engine.settings.batch_key
        if args and not kwargs:
            batch: Any = args
        elif args and isinstance(key, str) and key not in kwargs:
            batch = {key: args[0], **kwargs}  # the ids passed positionally
        else:
            batch = kwargs
        self.engine.count(batch)  # on the batch's device, no host sync
        self.engine.check_counted(batch)  # once per run: one host sync

    def _find_tokenizer(self, processing_class: Any) -> Any:
        from transformers import ProcessorMixin

        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        if isinstance(tokenizer, ProcessorMixin):
            tokenizer = getattr(tokenizer, "tokenizer", None)
        if tokenizer is None:
            raise RuntimeError(f"{WHO} needs a tokenizer: pass Trainer(..., "
                               f"processing_class=tokenizer) or {WHO}(probes, tokenizer=...)")
        return tokenizer

    def _store_root(self, args) -> Path:
        return (Path(self.store_dir) if self.store_dir is not None
                else Path(args.output_dir) / STORE_DIRNAME)

    def _make_loggers(self, args, state) -> list:
        loggers, others = [], []
        for name in args.report_to or []:
            if name == "tensorboard":
                loggers.append(TensorBoardDirLogger(tensorboard_dir(args, state)))
            elif name == "wandb":
                # The run the Trainer's WandbCallback started at its on_train_begin (before
                # ours), held from now on; if there is none yet, the active run at each call.
                import wandb

                loggers.append(WandbRunLogger(wandb.run, step_metric=WANDB_STEP_METRIC))
            else:
                others.append(name)
        if others:
            log.warning("%s: report_to %s gets no normx metrics (TensorBoard and W&B do); every "
                        "snapshot is in the store at %s (normx summary, normx report)", WHO,
                        others, self._store_root(args))
        return loggers

    def _close_loggers(self) -> None:
        for logger in self._loggers:
            close = getattr(logger, "close", None)
            if close is not None:
                close()

    def _restore(self, args, state) -> None:
        """The resume state saved in the checkpoint the Trainer resumed from, loaded into
        the driver (the run id and store it continues); one warning, and a new store, when
        that checkpoint is not ``<output_dir>/checkpoint-N`` or holds no state of ours."""
        folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}"
        path = folder / STATE_FILE
        why = None
        if not path.is_file():
            why = f"{path} does not exist (saved without {WHO}?)"
        elif not _same_trainer_state(folder, state):
            why = (f"{folder}'s trainer_state.json is not the state the Trainer resumed from "
                   "(a checkpoint from outside output_dir?)")
        if why is not None:
            log.warning("%s: training resumes at step %d, but %s: this run's snapshots go to a "
                        "new store. Resume from <output_dir>/checkpoint-N to continue the run's "
                        "store", WHO, state.global_step, why)
            return
        self.core.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def tensorboard_dir(args, state) -> Path:
    """The directory the Trainer's `TensorBoardCallback` writes to: ``args.logging_dir``
    (transformers 4), ``$TENSORBOARD_LOGGING_DIR``, else the ``<output_dir>/runs/<time>_<host>``
    it names at its own `on_train_begin` (transformers 5), which runs before ours: the newest
    directory under it holding an event file of this process."""
    logging_dir = getattr(args, "logging_dir", None)
    if logging_dir:
        return Path(logging_dir)
    env = os.environ.get("TENSORBOARD_LOGGING_DIR")
    if env and not state.is_hyper_param_search:
        return Path(env).expanduser()
    runs = Path(args.output_dir) / "runs"
    mine = [p for p in runs.rglob(f"events.out.tfevents.*.{os.getpid()}.*") if p.is_file()]
    if mine:
        return max(mine, key=lambda p: p.stat().st_mtime).parent
    fallback = runs / "normx-tensorboard"  # not "normx": store discovery looks for that name
    log.warning("%s: no TensorBoard event file of the Trainer's TensorBoardCallback under %s; "
                "the normx curves go to %s", WHO, runs, fallback)
    return fallback


def _same_trainer_state(folder: Path, state) -> bool:
    """Whether ``folder/trainer_state.json`` is the state the Trainer restored: the same
    step and logged history."""
    try:
        saved = json.loads((folder / "trainer_state.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return (saved.get("global_step") == state.global_step
            and saved.get("log_history") == state.log_history)


def _check_strategy(args, model: nn.Module) -> None:
    """DeepSpeed and sharded models are refused before the first step. accelerate shards a
    model (FSDP, FSDP2) only on GPUs, so that path cannot be tested on CPU machines; on CPU
    the Trainer ignores its ``fsdp`` arguments and trains with DDP, which is supported."""
    if getattr(args, "deepspeed", None):
        raise RuntimeError(f"{WHO} does not support DeepSpeed: its sharded parameters would "
                           "need gathering for every probe. Use DDP (torchrun or accelerate "
                           "launch without a DeepSpeed config), or remove the callback")
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if isinstance(model, FullyShardedDataParallel) or any(
            isinstance(p, DTensor) for p in model.parameters()):
        raise RuntimeError(
            f"{WHO} does not support a sharded model (FSDP, FSDP2, tensor parallel) under the "
            "transformers Trainer: accelerate shards models on GPUs only, so this path is "
            "untested. Use DDP (drop the fsdp arguments), or Lightning's "
            "ModelParallelStrategy with NormXLogitCallback, which supports FSDP2")


def _autocast(args, device: torch.device):
    """The Trainer's mixed precision for the probe forwards (accelerate autocasts the
    training forwards with ``bf16``/``fp16``); None in full precision."""
    dtype = (torch.bfloat16 if getattr(args, "bf16", False)
             else torch.float16 if getattr(args, "fp16", False) else None)
    if dtype is None:
        return None
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _from_rank_zero(value: Any) -> Any:
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _save_atomically(obj: Any, path: Path) -> None:
    """torch.save to a temp file beside ``path``, fsync'd, then moved into place."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
