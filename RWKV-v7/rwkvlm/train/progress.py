"""The training progress bar: the run's global step of its total steps.

Lightning's own bar counts the batches of the current fit from 0, so a run resumed at step 10
of 200 counted 1/190, 2/190, ... (after a stray `Training: 0/?` bar). StepProgressBar starts at
10/200 and goes on from there, with the rate and the time left of this run's steps. It appears
when the first step starts, after the notes the run prints when it starts; the messages printed
while it is shown (train.log) go above it instead of splicing into it.
"""
from __future__ import annotations

import sys

from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm


class StepProgressBar(TQDMProgressBar):
    """A TQDMProgressBar over global steps start_step+1 .. total_steps."""

    def __init__(self, start_step: int, total_steps: int, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate, leave=True)
        self.start_step = int(start_step)
        self.total_steps = int(total_steps)

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(
            desc="training", total=self.total_steps, initial=self.start_step,
            position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
            file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT, unit="step",
        )

    def on_train_start(self, trainer, pl_module) -> None:
        pass  # the bar is made at the epoch's start: after the LightningModule's start notes

    def on_train_epoch_start(self, trainer, *_) -> None:
        if self._train_progress_bar is None:  # one bar for the whole run (one epoch: max_epochs=1)
            self.train_progress_bar = self.init_train_tqdm()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self._train_progress_bar
        step = self.start_step + batch_idx + 1  # the sampler starts at start_step
        if bar is not None and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        bar = self._train_progress_bar
        if bar is not None and not bar.disable:
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # the last step's metrics
            bar.close()

    def on_train_end(self, *_) -> None:
        if self._train_progress_bar is not None:
            self._train_progress_bar.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end()  # the error message below a finished line, not spliced into the bar
