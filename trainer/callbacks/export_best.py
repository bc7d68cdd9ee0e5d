"""The serving SavedModel of the best epoch so far, written whenever the monitored value
improves (Orbit's ``ExportSavedModel`` on a new best)."""

from __future__ import annotations

import contextlib
import logging
import math

import tensorflow as tf

from trainer.callbacks.base import Callback, improved, resolve
from trainer.common.errors import UserError
from trainer.training.serving import preparation_ops, write_saved_model

log = logging.getLogger(__name__)


class ExportCallback(Callback):
    """Writes ``directory`` (a SavedModel, as ``python -m trainer.export --format saved_model``
    writes it: raw inputs in, probabilities or values out) at every validation (each epoch's
    end, and the steps of ``trainer.val_every_n_steps``) whose ``monitor`` beats the best
    so far.

    The directory is replaced whole (a temporary directory renamed into place), so a reader
    never finds half a model. The exported weights are the ones the monitored value measured:
    the weight average's (``trainer.ema``, ``trainer.swa``) for ``val_ema/...`` and
    ``val_swa/...``, the trained weights otherwise. The best value is part of the training
    state, so a resumed run exports only what beats the whole run's best. Every worker keeps
    the best value; only the chief writes.

    Args:
        directory: where the SavedModel goes, relative to the run directory.
        monitor: an epoch log, such as ``val/loss`` or ``val/accuracy``.
        mode: ``"min"`` or ``"max"``: whether a smaller or a larger value is better.
        min_delta: the smallest change that counts as improvement.
    """

    state_key = "export"

    def __init__(self, *, directory: str = "export/saved_model", monitor: str = "val/loss",
                 mode: str = "min", min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise UserError(f"callbacks.export.mode={mode!r} must be 'min' or 'max'")
        if min_delta < 0:
            raise UserError(f"callbacks.export.min_delta={min_delta} must be >= 0")
        self.directory, self.monitor, self.mode = directory, monitor, mode
        self.min_delta = float(min_delta)
        self._best = tf.Variable(math.inf if mode == "min" else -math.inf, dtype=tf.float64,
                                 trainable=False, name="best")
        #: The epochs (1-based) this fit exported in, in order.
        self.exported: list[int] = []

    def state(self, trainer) -> dict:
        return {"best": self._best}

    @property
    def best(self) -> float:
        """The best monitored value so far (``inf``/``-inf`` before the first epoch)."""
        return float(self._best.numpy())

    def on_fit_start(self, trainer):
        # At the start, not after the first epoch: a run that cannot be exported says so now.
        if "model" not in trainer.models:
            raise UserError(f"callbacks.export: the run has no model named 'model' (its "
                            f"models: {sorted(trainer.models)}); remove ~callbacks.export")
        preparation_ops(trainer.data)
        self.exported = []

    def on_validation_end(self, trainer, global_step, logs):
        # Every validation: the epochs' ends, and the steps of trainer.val_every_n_steps.
        if self.monitor not in logs:
            if self.monitor.startswith("val_swa/") and trainer.averages is not None:
                return  # SWA's average is evaluated from the end of its first cycle on
            raise UserError(f"callbacks.export.monitor={self.monitor!r} is not logged; "
                            f"choose one of {sorted(k for k in logs if '/' in k)}")
        value = float(logs[self.monitor])
        if not improved(value, self.best, self.mode, self.min_delta):
            return
        self._best.assign(value)
        if not trainer.is_chief:
            return
        averages = trainer.averages
        averaged = averages is not None and self.monitor.startswith(f"{averages.prefix}/")
        path = resolve(trainer, self.directory)
        with averages.swapped(trainer.data) if averaged else contextlib.nullcontext():
            write_saved_model(trainer.models["model"], trainer.data, path)
        self.exported.append(logs["epoch"])
        log.info("best %s=%.4g: exported %s", self.monitor, value, path)
