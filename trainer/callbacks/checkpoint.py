"""Checkpoints of models, optimizers and the global step at the end of epochs."""

from __future__ import annotations

import logging

import tensorflow as tf

from trainer.callbacks.base import Callback, resolve

log = logging.getLogger(__name__)


class CheckpointCallback(Callback):
    """Saves a ``tf.train.CheckpointManager`` checkpoint every ``every_n_epochs`` epochs.

    The checkpoint holds every model and optimizer of the step and the trainer's
    global step. TensorFlow writes each checkpoint to temporary files and renames
    them when complete, so an interrupted save leaves the previous one intact.

    Args:
        directory: where checkpoints go, relative to the run directory.
        max_to_keep: how many recent checkpoints to keep.
        every_n_epochs: save interval in epochs (the last epoch is always saved).
    """

    def __init__(self, *, directory: str = "checkpoints", max_to_keep: int = 3,
                 every_n_epochs: int = 1):
        self.directory = directory
        self.max_to_keep = max_to_keep
        self.every_n_epochs = every_n_epochs
        self.manager = None

    def on_fit_start(self, trainer):
        items = {**trainer.step.models, **trainer.step.optimizers}
        ckpt = tf.train.Checkpoint(global_step=trainer.global_step, **items)
        self.manager = tf.train.CheckpointManager(
            ckpt, str(resolve(trainer, self.directory)), max_to_keep=self.max_to_keep
        )

    def on_epoch_end(self, trainer, epoch, logs):
        last = epoch + 1 == trainer.epochs
        if (epoch + 1) % self.every_n_epochs == 0 or last:
            path = self.manager.save(checkpoint_number=trainer.current_step)
            log.debug("saved checkpoint %s", path)
