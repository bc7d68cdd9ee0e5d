"""Stop training when a monitored value stops improving."""

from __future__ import annotations

import logging
import math

from trainer.callbacks.base import Callback
from trainer.errors import UserError

log = logging.getLogger(__name__)


class EarlyStopping(Callback):
    """Sets ``trainer.stop_training`` after ``patience`` epochs without improvement.

    Args:
        monitor: a key of the epoch logs, such as ``val/loss``.
        mode: ``"min"`` or ``"max"``.
        patience: epochs without improvement to tolerate.
        min_delta: the smallest change that counts as improvement.
    """

    def __init__(self, *, monitor: str = "val/loss", mode: str = "min", patience: int = 5,
                 min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise UserError(f"callbacks.early_stopping.mode={mode!r} must be 'min' or 'max'")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta
        self.best = math.inf if mode == "min" else -math.inf
        self.wait = 0
        self.stopped_epoch = None

    def on_epoch_end(self, trainer, epoch, logs):
        if self.monitor not in logs:
            raise UserError(
                f"callbacks.early_stopping.monitor={self.monitor!r} is not logged; "
                f"choose one of {sorted(k for k in logs if '/' in k)}"
            )
        value = logs[self.monitor]
        better = (value < self.best - self.min_delta if self.mode == "min"
                  else value > self.best + self.min_delta)
        if better:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            trainer.stop_training = True
            log.info("early stopping at epoch %d: %s did not improve for %d epochs",
                     epoch + 1, self.monitor, self.patience)
