"""Checkpoints of models, optimizers and the global step at the end of epochs."""

from __future__ import annotations

import logging
import time

import tensorflow as tf

from trainer.callbacks.base import Callback, resolve

log = logging.getLogger(__name__)


class CheckpointCallback(Callback):
    """Saves a ``tf.train.CheckpointManager`` checkpoint every ``every_n_epochs`` epochs,
    but not more often than every ``min_interval_seconds``.

    The checkpoint holds every model and optimizer of the step and the trainer's
    global step. TensorFlow writes each checkpoint to temporary files and renames
    them when complete, so an interrupted save leaves the previous one intact.

    Args:
        directory: where checkpoints go, relative to the run directory.
        max_to_keep: how many recent checkpoints to keep.
        every_n_epochs: save interval in epochs (the last epoch is always saved).
        min_interval_seconds: skip a due save if the previous one is more recent than
            this. A save takes 10-20 ms even for a small model, so with epochs of a
            fraction of a second saving every one would slow training by a tenth or more;
            the default keeps the cost near zero. A run that ends early (``max_steps``,
            early stopping) saves its final state at the end of ``fit``; 0 saves every
            ``every_n_epochs``.
    """

    def __init__(self, *, directory: str = "checkpoints", max_to_keep: int = 3,
                 every_n_epochs: int = 1, min_interval_seconds: float = 30.0):
        self.directory = directory
        self.max_to_keep = max_to_keep
        self.every_n_epochs = every_n_epochs
        self.min_interval_seconds = float(min_interval_seconds)
        self.manager = None
        self._saved_at = None
        self._saved_step = None

    def on_fit_start(self, trainer):
        items = {**trainer.step.models, **trainer.step.optimizers}
        ckpt = tf.train.Checkpoint(global_step=trainer.global_step, **items)
        self.manager = tf.train.CheckpointManager(
            ckpt, str(resolve(trainer, self.directory)), max_to_keep=self.max_to_keep
        )

    def on_epoch_end(self, trainer, epoch, logs):
        last = epoch + 1 == trainer.epochs
        recent = (self._saved_at is not None
                  and time.monotonic() - self._saved_at < self.min_interval_seconds)
        if ((epoch + 1) % self.every_n_epochs == 0 and not recent) or last:
            self._save(trainer.current_step)

    def on_fit_end(self, trainer, logs):
        step = trainer.current_step
        if self.manager is not None and step != self._saved_step:
            self._save(step)  # stopped early, or the last due save was skipped as too recent

    def _save(self, step: int) -> None:
        path = self.manager.save(checkpoint_number=step)
        self._saved_at, self._saved_step = time.monotonic(), step
        log.debug("saved checkpoint %s", path)
