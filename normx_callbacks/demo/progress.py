"""A training progress bar that counts optimizer steps when the run is sized by `max_steps`.

Lightning's Rich bar counts batches of the current epoch and labels it `Epoch 0/-2` when
`max_epochs` is unset (-1); a `max_steps` run then shows no useful end. `StepProgressBar`
shows `Step N/max_steps` instead (completed = `trainer.global_step`) and behaves as
Lightning's bar otherwise.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """Rich progress bar over optimizer steps (`global_step` of `max_steps`)."""

    def _by_steps(self) -> bool:
        return self._trainer is not None and (self.trainer.max_steps or -1) > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._by_steps():
            return super()._get_train_description(current_epoch)
        return f"{'Step':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if self._by_steps():
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._by_steps():
            self._update(self.train_progress_bar_id, trainer.global_step)
