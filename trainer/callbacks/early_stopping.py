"""Stop training when a monitored value stops improving."""

from __future__ import annotations

import logging
import math

import tensorflow as tf

from trainer.callbacks.base import Callback, improved, ship_best
from trainer.common.errors import UserError

log = logging.getLogger(__name__)


class EarlyStopping(Callback):
    """Sets ``trainer.stop_training`` after ``patience`` validations without improvement
    (epochs, or the validations every ``trainer.val_every_n_steps`` steps).

    The best value, the epochs waited and the stopped epoch live in ``tf.Variable``s
    (``state()``), so a resumed run keeps counting its patience where it stopped;
    ``best``, ``wait`` and ``stopped_epoch`` read them as Python numbers.

    Args:
        monitor: a key of the validation logs, such as ``val/loss``.
        mode: ``"min"`` or ``"max"``.
        patience: validations without improvement to tolerate.
        min_delta: the smallest change that counts as improvement.
        restore_best_weights: keep a copy of the weights of the best epoch (part of the
            checkpointed state, so it survives a restart) and give them back to the
            models at the end of ``fit``, whether it stopped early or not (not when
            preempted: a resumed run must continue from the last weights).
    """

    state_key = "early_stopping"

    def __init__(self, *, monitor: str = "val/loss", mode: str = "min", patience: int = 5,
                 min_delta: float = 0.0, restore_best_weights: bool = False):
        if mode not in ("min", "max"):
            raise UserError(f"callbacks.early_stopping.mode={mode!r} must be 'min' or 'max'")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        # Created here, before the trainer builds its checkpoint; float64 keeps the
        # host's value exactly. stopped_epoch -1 stands for "not stopped".
        self._best = tf.Variable(math.inf if mode == "min" else -math.inf, dtype=tf.float64,
                                 trainable=False, name="best")
        self._wait = tf.Variable(0, dtype=tf.int64, trainable=False, name="wait")
        self._stopped = tf.Variable(-1, dtype=tf.int64, trainable=False, name="stopped_epoch")
        self.restore_best_weights = bool(restore_best_weights)
        self._weights: list = []  # the models' weights, in the order of the copies
        self._best_weights: list = []  # copies made when the checkpoint is built

    def state(self, trainer) -> dict:
        state = {"best": self._best, "wait": self._wait, "stopped_epoch": self._stopped}
        if self.restore_best_weights:
            if not self._weights:
                self._weights = [v for m in trainer.models.values() for v in m.weights]
                self._best_weights = [tf.Variable(v, trainable=False, name="best_weight")
                                      for v in self._weights]
            state["best_weights"] = self._best_weights
        return state

    @property
    def best(self) -> float:
        """The best monitored value so far (``inf``/``-inf`` before the first epoch)."""
        return float(self._best.numpy())

    @property
    def wait(self) -> int:
        """Validations since the last improvement."""
        return int(self._wait.numpy())

    @property
    def stopped_epoch(self) -> int | None:
        """The 0-based epoch at which training was stopped, or None."""
        epoch = int(self._stopped.numpy())
        return None if epoch < 0 else epoch

    def on_validation_end(self, trainer, global_step, logs):
        if self.monitor not in logs:
            raise UserError(
                f"callbacks.early_stopping.monitor={self.monitor!r} is not logged; "
                f"choose one of {sorted(k for k in logs if '/' in k)}"
            )
        value, best = float(logs[self.monitor]), self.best
        if improved(value, best, self.mode, self.min_delta):
            self._best.assign(value)
            self._wait.assign(0)
            for copy, v in zip(self._best_weights, self._weights):
                copy.assign(v)
            return
        self._wait.assign_add(1)
        if self.wait >= self.patience:
            self._stopped.assign(logs["epoch"] - 1)
            trainer.stop_training = True
            log.info("early stopping at epoch %d (step %d): %s did not improve for %d "
                     "validations", logs["epoch"], global_step, self.monitor, self.patience)

    def on_fit_end(self, trainer, logs):
        if self._best_weights and math.isfinite(self.best) and not trainer.preempted:
            for copy, v in zip(self._best_weights, self._weights):
                v.assign(copy)
            ship_best(trainer, self.monitor, self.best)
            log.info("restored the weights of the best epoch (%s=%.4g)", self.monitor, self.best)
