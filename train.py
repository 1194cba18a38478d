"""Pre-train a small language model from scratch and watch token importance emerge.

    python train.py fit --config configs/tiny.yaml
    python train.py fit --config configs/tiny.yaml --trainer.max_steps 50
    python train.py fit --help
    python train.py fit --config my.yaml --debug   # full parser output / tracebacks on errors

The LightningModule (`LanguageModel`) and DataModule (`TextDataModule`) live in
`normx_callbacks.demo`; the callback comes from the config's `trainer.callbacks`.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from normx_callbacks import NormXLogitCallback, load_run
from normx_callbacks.demo import ARCHITECTURES, LanguageModel, TextDataModule, cli_errors
from normx_callbacks.demo.cli_errors import OneLineParser
from normx_callbacks.demo.progress import StepProgressBar
from normx_callbacks.execution import missing_summary
from normx_callbacks.store import StoreError
from normx_callbacks.summary import headline_lines, next_commands, summary_paragraph


class _FirstBatch(Callback):
    """Whether this process has started a training batch: errors before it are bad input
    (the callback checks everything at setup and fit start), after it a traceback."""

    started = False

    def on_train_batch_start(self, *args, **kwargs) -> None:
        self.started = True


class NormXCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The model is sized by the tokenizer the DataModule trains, and probes and
        # training examples share the model's context length.
        parser.link_arguments("model.context", "data.context")
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.pad_token_id", "model.pad_token_id", apply_on="instantiate")
        parser.link_arguments("data.tokenizer", "model.tokenizer", apply_on="instantiate")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # `--trainer.callbacks=CLASS` gives one callback, not a list (the Trainer takes both).
        given = config.get("callbacks")
        given = [] if given is None else given if isinstance(given, list) else [given]
        if "callbacks" in config:
            config["callbacks"] = given
        self._say_if_the_callback_was_dropped(given)
        # Lightning's bar reads `Epoch 0/-2` in a max_steps run: count steps instead.
        wants_bar = config.get("enable_progress_bar") is not False
        has_bar = any(isinstance(c, ProgressBar) for c in [*given, *callbacks])
        if wants_bar and not has_bar and (config.get("max_steps") or -1) > 0 and _RICH_AVAILABLE:
            callbacks = [*callbacks, StepProgressBar()]
        self._started = _FirstBatch()
        callbacks = [*callbacks, self._started]
        return super()._instantiate_trainer(config, callbacks)

    def _say_if_the_callback_was_dropped(self, given: list) -> None:
        """One line when the command line's `--trainer.callbacks=...` replaced a config's
        callback list that attached NormXLogitCallback (`+=` appends to it instead)."""
        if any(isinstance(c, NormXLogitCallback) for c in given):
            return
        files = [f for f in (self.config.get(str(self.subcommand), self.config).get("config")
                             or []) if _attaches_the_callback(f)]
        if files and rank_zero_only.rank == 0:
            print(f"train.py: note: --trainer.callbacks replaced the callbacks of {files[0]}, "
                  "so NormXLogitCallback is not attached and this run takes no snapshots; use "
                  "--trainer.callbacks+=CLASS to add a callback to the config's",
                  file=sys.stderr)

    def instantiate_classes(self) -> None:
        # A value a class refuses (e.g. `schedule: logarithmic`): its message, not two tracebacks.
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            if cli_errors.DEBUG["on"]:
                raise
            cli_errors.refuse(error)

    def _run_subcommand(self, subcommand: str) -> None:
        # Bad input refused before the first training step (probes longer than the context,
        # a layer that does not exist, ...): its own line, not a traceback through Lightning.
        try:
            super()._run_subcommand(subcommand)
        except (ValueError, RuntimeError, ImportError, OSError) as error:
            if cli_errors.DEBUG["on"] or self._started.started:
                raise
            sys.stderr.write(f"train.py: error: {' '.join(str(error).split())}\n"
                             "(--debug shows the traceback)\n")
            sys.exit(1)

    def before_fit(self) -> None:
        expected = ARCHITECTURES[self.model.hparams.arch][1]
        if self.datamodule.hparams.objective != expected:
            raise SystemExit(
                f"error: model.arch={self.model.hparams.arch!r} trains a {expected} LM but "
                f"data.objective={self.datamodule.hparams.objective!r}; set "
                f"--data.objective {expected}"
            )

    def after_fit(self) -> None:
        trainer = self.trainer
        # trainer.log_dir broadcasts under DDP: every rank must ask, not rank 0 alone.
        log_dir = trainer.log_dir or trainer.default_root_dir
        if not trainer.is_global_zero:
            return
        watched = [cb for cb in trainer.callbacks
                   if isinstance(cb, NormXLogitCallback) and cb.store is not None]
        print(end_of_run_message(trainer, log_dir, [cb.store.root for cb in watched],
                                 [cb.missing_steps for cb in watched]), file=sys.stderr)


def _attaches_the_callback(config_file) -> bool:
    """Whether a `--config` file lists NormXLogitCallback under `trainer.callbacks`."""
    try:
        text = Path(getattr(config_file, "absolute", config_file)).read_text("utf-8")
        callbacks = (yaml.safe_load(text) or {}).get("trainer", {}).get("callbacks") or []
    except (OSError, ValueError, AttributeError, TypeError, yaml.YAMLError):
        return False  # not a file (an inline config) or not one this check can read
    entries = callbacks if isinstance(callbacks, list) else [callbacks]
    return any(isinstance(e, dict) and str(e.get("class_path", "")).rsplit(".", 1)[-1]
               == NormXLogitCallback.__name__ for e in entries)


def _dashboard(trainer) -> dict:
    """Where the run's dashboard is, as `summary.next_commands` keyword arguments."""
    where: dict = {}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            where["tensorboard_dir"] = logger.log_dir
        elif isinstance(logger, WandbLogger):
            run = logger.experiment
            if getattr(run, "offline", False):
                where["wandb_dir"] = Path(run.dir).parent
            else:
                where["wandb_url"] = run.url
    return where


def end_of_run_message(trainer, log_dir: str, stores: list[Path],
                       missing: list[dict[int, str]] | None = None) -> str:
    """Headline numbers of each snapshot store and the next commands, as printed.
    ``missing``: per store, the callback's `missing_steps` (also those the store could not
    record, a full disk)."""
    lines = ["", f"Run finished: {log_dir}"]
    where = _dashboard(trainer)
    for i, root in enumerate(stores):
        lines.append(f"  snapshots:      {root}")
        try:
            run = load_run(root)
        except StoreError as error:
            lines.append(f"  (no headline numbers: {error})")
            run = None
        lost = dict(missing[i]) if missing else {}
        if run is not None:
            lost.update({int(s): r for s, r in zip(run.missing["step"], run.missing["reason"],
                                                   strict=True) if int(s) not in lost})
            taken = len(set(run.steps) | set(lost))
        else:
            taken = len(lost)
        if lost:
            lines += textwrap.wrap(f"MISSING: {len(lost)} of {taken} snapshots: "
                                   f"{missing_summary(lost, most=5)}", width=96,
                                   initial_indent="  ", subsequent_indent="    ")
        if run is not None:
            lines += [f"  {line}" for line in headline_lines(run)]
            paragraph = summary_paragraph(run)
            if paragraph:
                lines += textwrap.wrap(paragraph, width=96, initial_indent="  ",
                                       subsequent_indent="  ")
        lines.append("Next:")
        lines += [f"  {c}" for c in next_commands(root, **where)]
    return "\n".join(lines)

def main(args=None) -> None:
    """Run the CLI; `--debug` (anywhere) keeps full parser messages and tracebacks."""
    if args is None:  # LightningCLI reads sys.argv itself (and warns when given both)
        cli_errors.DEBUG["on"] = "--debug" in sys.argv
        sys.argv = [a for a in sys.argv if a != "--debug"]
    else:
        cli_errors.DEBUG["on"] = "--debug" in args
        args = [a for a in args if a != "--debug"]
    NormXCLI(LanguageModel, TextDataModule, save_config_kwargs={"overwrite": True},
             parser_class=OneLineParser,
             args=args)


if __name__ == "__main__":
    main()
