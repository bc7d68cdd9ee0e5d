"""Checkpoints of the trainer's whole training state: recent ones, and the best one."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import tensorflow as tf

from trainer.callbacks.base import Callback, improved, resolve, ship_best
from trainer.common.errors import UserError
from trainer.training.periodic import Periodic

log = logging.getLogger(__name__)

MODES = ("min", "max")


class CheckpointCallback(Callback):
    """Saves the trainer's training state when due, keeps the recent ones and the best one.

    ``trainer.training_state`` (``trainer.training.state.TrainingState``) is everything
    that must survive a restart (models, optimizers, seed generators, data position,
    callback state, global step, epoch, the epoch's running sums, the format version);
    this callback only decides when it is written, and asks it to save through a
    ``tf.train.CheckpointManager`` numbering checkpoints by global step
    (``<directory>/ckpt-<step>``). TensorFlow writes each checkpoint to temporary files
    and renames them when complete, and updates the index last, so a save interrupted
    by a kill leaves the previous checkpoints intact.

    When: every ``every_n_steps`` steps and every ``every_n_epochs`` epochs (both
    held back while the last save is more recent than ``min_interval_seconds``),
    every ``every_seconds`` seconds, and always at the end of ``fit`` (the last
    epoch, ``max_steps``, early stopping, a preemption). Saves happen at execution
    boundaries, after every other callback (``order``), so their state is of the
    same moment as the weights.

    Best: with ``monitor`` (a validation log such as ``val/accuracy``) and ``mode``, the
    checkpoint of the best validation so far (an epoch's end, or a step of
    ``trainer.val_every_n_steps``) is kept in ``<directory>/best``, and at the
    end of ``fit`` (unless preempted) the models are given the best weights, so
    ``model.keras`` holds them; the recent checkpoints keep the last state for
    resuming.

    Args:
        directory: where checkpoints go, relative to the run directory.
        max_to_keep: how many recent checkpoints to keep.
        every_n_steps: save interval in steps; 0 turns it off.
        every_n_epochs: save interval in epochs; 0 turns it off.
        every_seconds: save at least this often (seconds); 0 turns it off. With the
            default a kill loses at most about a minute of work.
        min_interval_seconds: hold step and epoch saves back while the last save is
            more recent than this. A save takes 10-20 ms even for a small model: with
            epochs of a fraction of a second, saving every one would slow training by
            a tenth; the default keeps the cost near zero. 0 saves every time it is due.
        monitor: an epoch log to keep the best checkpoint by; None keeps none.
        mode: ``"min"`` or ``"max"``: whether a smaller or a larger value is better.
    """

    state_key = "checkpoint"
    #: After every other callback: their state in the checkpoint is of the same moment.
    order = 100

    def __init__(self, *, directory: str = "checkpoints", max_to_keep: int = 3,
                 every_n_steps: int = 0, every_n_epochs: int = 1, every_seconds: float = 60.0,
                 min_interval_seconds: float = 30.0, monitor: str | None = None,
                 mode: str = "min"):
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs),
                            ("every_seconds", every_seconds),
                            ("min_interval_seconds", min_interval_seconds)):
            if value < 0:
                raise UserError(f"callbacks.checkpoint.{name}={value} must be >= 0 (0 turns "
                                "it off)")
        if max_to_keep < 1:
            raise UserError(f"callbacks.checkpoint.max_to_keep={max_to_keep} must be >= 1")
        if mode not in MODES:
            raise UserError(f"callbacks.checkpoint.mode={mode!r} must be 'min' or 'max'")
        self.directory = directory
        self.max_to_keep = int(max_to_keep)
        self.every_n_steps = int(every_n_steps)
        self.every_n_epochs = int(every_n_epochs)
        self.every_seconds = float(every_seconds)
        self.min_interval_seconds = float(min_interval_seconds)
        self.monitor, self.mode = monitor, mode
        self.manager: tf.train.CheckpointManager | None = None
        self._scratch: str | None = None  # a worker's throwaway directory (not the chief)
        self.best_manager: tf.train.CheckpointManager | None = None
        self._when = Periodic(every_n_steps=self.every_n_steps,
                              every_n_epochs=self.every_n_epochs,
                              every_seconds=self.every_seconds,
                              min_seconds=self.min_interval_seconds, at_end=True)
        # The best monitored value so far: part of the training state, so a resumed run
        # keeps the best checkpoint of the whole run.
        self._best = tf.Variable(math.inf if mode == "min" else -math.inf, dtype=tf.float64,
                                 trainable=False, name="best")

    def state(self, trainer) -> dict:
        return {"best": self._best} if self.monitor else {}

    @property
    def best(self) -> float:
        """The best monitored value so far (``inf``/``-inf`` before the first epoch)."""
        return float(self._best.numpy())

    def on_fit_start(self, trainer):
        state, root = trainer.training_state, resolve(trainer, self.directory)
        if not trainer.is_chief:
            # Every worker of a multi-worker run saves (a save may need all of them to
            # read distributed variables); only the chief keeps its checkpoints. A worker
            # writes into a scratch directory of its own in the run dir, emptied at the
            # start (a killed worker's leftovers go then) and removed at the end.
            self._scratch = str(Path(trainer.run_dir) / f".worker-{trainer.worker_index}")
            shutil.rmtree(self._scratch, ignore_errors=True)
            root = Path(self._scratch) / "checkpoints"
        self._when.use_clock(trainer.clock)
        if self.manager is None or self.manager.checkpoint is not state.checkpoint:
            self.manager = state.manager(root, self.max_to_keep)
            if self.monitor:
                self.best_manager = state.manager(root / "best", 1)
        # Count from where this fit starts: a resumed run does not save at once for the
        # intervals it passed before the restart. The epoch that ends next is the open one
        # (a resumed run may have all its steps done and only its end to run).
        open_epoch = trainer.progress.open_epoch
        self._when.reset(trainer.current_step, epoch=open_epoch if open_epoch is not None
                         else trainer.current_step // max(trainer.steps_per_epoch, 1))

    def on_execution_end(self, trainer, global_step, logs):
        if self._when.due(global_step):
            self._save(trainer, global_step)

    def on_validation_end(self, trainer, global_step, logs):
        if self.monitor:
            if self.monitor not in logs:
                raise UserError(f"callbacks.checkpoint.monitor={self.monitor!r} is not logged; "
                                f"choose one of {sorted(k for k in logs if '/' in k)}")
            value = float(logs[self.monitor])
            if improved(value, self.best, self.mode):
                self._best.assign(value)
                path = trainer.training_state.save(self.best_manager, global_step)
                log.info("best %s=%.4g: saved %s", self.monitor, value, path)

    def on_epoch_end(self, trainer, epoch, logs):
        global_step = trainer.current_step
        if self._when.due(global_step, epoch_end=epoch):
            self._save(trainer, global_step)

    def on_fit_end(self, trainer, logs):
        # Always, even at the step of the last save: the state may have moved on since
        # (an epoch's end, early stopping's decision). The trainer runs this hook first,
        # before other callbacks change the models (early stopping's best weights).
        if self.manager is not None:
            self._save(trainer, trainer.current_step)
        best = self.best_manager.latest_checkpoint if self.best_manager else None
        if best and not trainer.preempted:
            # Only the weights (and their average): the latest checkpoint (saved above)
            # keeps the last state.
            averages = {} if trainer.averages is None else {"averages": trainer.averages}
            tf.train.Checkpoint(models=trainer.models, **averages).read(best).expect_partial()
            ship_best(trainer, self.monitor, self.best)
            log.info("the models hold the best weights (%s=%.4g, %s)", self.monitor,
                     self.best, best)
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch, self.manager, self.best_manager = None, None, None

    def _save(self, trainer, global_step: int) -> None:
        trainer.training_state.save(self.manager, global_step)
