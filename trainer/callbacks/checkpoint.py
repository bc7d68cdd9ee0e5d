"""Checkpoints of the trainer's whole training state at the end of epochs."""

from __future__ import annotations

import logging

import tensorflow as tf

from trainer.callbacks.base import Callback, resolve
from trainer.errors import UserError
from trainer.periodic import Periodic

log = logging.getLogger(__name__)


class CheckpointCallback(Callback):
    """Saves ``trainer.checkpoint`` every ``every_n_epochs`` epochs, but not more often
    than every ``min_interval_seconds``, and always at the end of ``fit``.

    ``trainer.checkpoint`` is the one ``tf.train.Checkpoint`` of everything that must
    survive a restart (models, optimizers, seed generators, data position, callback
    state, global step, epoch); this callback only decides when to write it, through
    a ``tf.train.CheckpointManager`` numbering checkpoints by global step. TensorFlow
    writes each checkpoint to temporary files and renames them when complete, so an
    interrupted save leaves the previous one intact.

    A save that comes due at the end of an epoch is written once every callback has
    finished that epoch (at the next epoch's start, or at the end of ``fit``), so the
    state of callbacks listed after this one (early stopping's patience) is that of
    the same moment as the weights.

    Args:
        directory: where checkpoints go, relative to the run directory.
        max_to_keep: how many recent checkpoints to keep.
        every_n_epochs: save interval in epochs; 0 saves only at the end of ``fit``.
        min_interval_seconds: hold a due save back while the previous one is more
            recent than this; it is written at the first epoch end after that. A
            save takes 10-20 ms even for a small model, so with epochs of a fraction
            of a second saving every one would slow training by a tenth or more; the
            default keeps the cost near zero. The end of ``fit`` (the last epoch,
            ``max_steps``, early stopping) is always saved; 0 saves every
            ``every_n_epochs``.
    """

    def __init__(self, *, directory: str = "checkpoints", max_to_keep: int = 3,
                 every_n_epochs: int = 1, min_interval_seconds: float = 30.0):
        if every_n_epochs < 0 or min_interval_seconds < 0:
            raise UserError("callbacks.checkpoint.every_n_epochs and min_interval_seconds "
                            f"must be >= 0; got {every_n_epochs} and {min_interval_seconds}")
        self.directory = directory
        self.max_to_keep = max_to_keep
        self.every_n_epochs = int(every_n_epochs)
        self.min_interval_seconds = float(min_interval_seconds)
        self.manager: tf.train.CheckpointManager | None = None
        self._when = Periodic(every_n_epochs=self.every_n_epochs,
                              min_seconds=self.min_interval_seconds, at_end=True)
        self._pending = False
        self._first_epoch = True

    def on_fit_start(self, trainer):
        ckpt = trainer.checkpoint
        if self.manager is None or self.manager.checkpoint is not ckpt:
            self.manager = tf.train.CheckpointManager(
                ckpt, str(resolve(trainer, self.directory)), max_to_keep=self.max_to_keep)
        self._pending = False
        self._first_epoch = True

    def on_epoch_end(self, trainer, epoch, logs):
        # Decided now, written once the other callbacks have finished the epoch.
        self._pending |= self._when.due(trainer.current_step, epoch_end=epoch)

    def on_epoch_start(self, trainer, epoch):
        if self._pending:
            self._save(trainer.current_step)
        if self._first_epoch:
            # Count epochs from where this fit starts (a resumed run): the hook's epoch
            # is exact here, whatever the trainer's epoch read before the loop.
            self._when.reset(trainer.current_step, epoch=epoch)
            self._first_epoch = False

    def on_fit_end(self, trainer, logs):
        global_step = trainer.current_step
        # Stopped early, the last epoch, or a due save held back as too recent.
        if self.manager is not None and (self._pending
                                         or self._when.due(global_step, end=True)):
            self._save(global_step)

    def _save(self, global_step: int) -> None:
        path = self.manager.save(checkpoint_number=global_step)
        self._pending = False
        log.debug("saved checkpoint %s", path)
