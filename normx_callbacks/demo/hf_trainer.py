"""Pre-train the demo model with the transformers `Trainer` and `NormXLogitTrainerCallback`.

    python -m normx_callbacks.demo.hf_trainer                       # runs/hf-tiny, 600 steps
    python -m normx_callbacks.demo.hf_trainer --max-steps 50 --output-dir runs/hf-short
    python -m normx_callbacks.demo.hf_trainer --resume              # an interrupted run goes on
    WANDB_MODE=offline python -m normx_callbacks.demo.hf_trainer --report-to wandb

The same job as `configs/tiny.yaml` (the agreement corpus, its byte-level BPE trained here
and cached in ``--cache-dir``, the 2-layer GPT-2 shape, AdamW at 3e-3 with warm-up and
cosine decay to 10%), with the Trainer instead of Lightning: checkpoints every 200 steps
in ``<output-dir>/checkpoint-N``, TensorBoard in ``<output-dir>/runs``, the snapshot store in
``<output-dir>/normx``. Nothing is downloaded. Needs ``normx-callbacks[transformers-trainer]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from transformers import TrainerCallback

from ..loading import load_run
from ..store import StoreError
from ..summary import headline_lines, next_commands, summary_paragraph
from .data import TextDataModule
from .model import ARCHITECTURES, build_model

TRACK = ["is", "are", "was", "were", "himself", "themselves"]


class _Started(TrainerCallback):
    """Whether training reached its first step: errors before it are bad input."""

    started = False

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self.started = True


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m normx_callbacks.demo.hf_trainer",
        description="Pre-train the demo model with the transformers Trainer while "
                    "NormXLogitTrainerCallback records token importance.")
    parser.add_argument("--output-dir", default="runs/hf-tiny",
                        help="checkpoints, TensorBoard runs and the normx store (%(default)s)")
    parser.add_argument("--max-steps", type=int, default=600, help="optimizer steps")
    parser.add_argument("--arch", default="gpt2", choices=sorted(ARCHITECTURES),
                        help="model shape; bert and roberta train a masked LM (%(default)s)")
    parser.add_argument("--report-to", default="tensorboard",
                        help="the Trainer's report_to, comma-separated: tensorboard, wandb, "
                             "none (%(default)s)")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="resume from the last checkpoint in --output-dir, or from "
                             "CHECKPOINT (one of its checkpoint-N folders)")
    parser.add_argument("--every-n-steps", type=int, default=100,
                        help="snapshots at 0, 1, 2, 4, ... up to this, then every this many")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-train", type=int, default=20000, help="synthetic sentences")
    parser.add_argument("--save-steps", type=int, default=200, help="checkpoint interval")
    parser.add_argument("--cache-dir", default=".normx_cache", help="the tokenizer's cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one line")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    from .. import NormXLogitTrainerCallback

    started = _Started()
    try:
        from transformers import Trainer, TrainingArguments, set_seed

        objective = ARCHITECTURES[options.arch][1]
        os.environ.setdefault("WANDB_PROJECT", "normx-demo")
        data = TextDataModule(corpus="agreement", objective=objective, bpe_vocab_size=512,
                              context=32, batch_size=options.batch_size,
                              num_train=options.num_train, num_probes=64, seed=options.seed,
                              cache_dir=options.cache_dir)
        data.setup("fit")
        set_seed(options.seed)
        model = build_model(options.arch, vocab_size=data.vocab_size, d_model=64, n_layers=2,
                            n_heads=4, context=32, dropout=0.0,
                            pad_token_id=data.pad_token_id)
        report_to = [r for r in options.report_to.split(",") if r and r != "none"]
        args = TrainingArguments(
            output_dir=options.output_dir, max_steps=options.max_steps, seed=options.seed,
            per_device_train_batch_size=options.batch_size, per_device_eval_batch_size=64,
            learning_rate=3e-3, weight_decay=0.01, adam_beta2=0.98, max_grad_norm=1.0,
            warmup_steps=30, lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1},
            logging_steps=10, eval_strategy="steps", eval_steps=200,
            save_strategy="steps", save_steps=options.save_steps, report_to=report_to,
            use_cpu=True, dataloader_num_workers=0, disable_tqdm=False)
        callback = NormXLogitTrainerCallback(
            data.probes, every_n_steps=options.every_n_steps, layers="all", norm="layer0",
            track_tokens=TRACK, media_probes=2)
        trainer = Trainer(model=model, args=args, train_dataset=data._train,
                          eval_dataset=data._val, processing_class=data.tokenizer,
                          data_collator=data._masking if objective == "masked" else None,
                          callbacks=[callback, started])
        trainer.train(resume_from_checkpoint=options.resume)
    except (ValueError, RuntimeError, OSError, ImportError) as error:
        # Bad input (a missing extra, probes longer than the context, ...) is refused before
        # the first step: one line. An error during training keeps its traceback.
        if options.debug or started.started:
            raise
        sys.stderr.write(f"hf_trainer: error: {' '.join(str(error).split())}\n"
                         "(--debug shows the traceback)\n")
        return 1
    if trainer.is_world_process_zero() and callback.store is not None:
        sys.stderr.write(end_of_run_message(Path(options.output_dir), callback,
                                            report_to) + "\n")
    return 0


def end_of_run_message(output_dir: Path, callback, report_to: list[str]) -> str:
    """The run's headline numbers, its summary paragraph and the next commands."""
    root = callback.store.root  # absolute when resumed (the path the checkpoint recorded)
    relative = Path(os.path.relpath(root))
    root = root if relative.parts[:1] == ("..",) else relative
    lines = ["", f"Run finished: {output_dir}", f"  snapshots:      {root}"]
    if callback.missing_steps:
        lines.append(f"  MISSING: {len(callback.missing_steps)} snapshots (see {root}'s "
                     "missing table)")
    try:
        run = load_run(root)
    except StoreError as error:
        lines.append(f"  (no headline numbers: {error})")
    else:
        lines += [f"  {line}" for line in headline_lines(run)]
        paragraph = summary_paragraph(run)
        if paragraph:
            lines += textwrap.wrap(paragraph, width=96, initial_indent="  ",
                                   subsequent_indent="  ")
    where: dict = {}
    if "tensorboard" in report_to:
        where["tensorboard_dir"] = output_dir / "runs"
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            if getattr(wandb.run, "offline", False):
                where["wandb_dir"] = Path(wandb.run.dir).parent
            else:
                where["wandb_url"] = wandb.run.url
    lines.append("Next:")
    lines += [f"  {c}" for c in next_commands(root, **where)]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
