"""The learning-rate finder: a short run at exponentially rising rates from the run's own
weights, with its own step, undone afterwards (Smith 2017, "Cyclical Learning Rates").

``find_learning_rate(step, data, ...)`` trains ``step`` for up to ``num_steps`` updates
through a ``Trainer`` of its own (so the step's regularizers, frozen variables,
accumulation, distribution and compilation all count), the rate of update ``i`` being
``min_lr * (max_lr / min_lr) ** (i / (num_steps - 1))``. It stops early once the smoothed
loss passes ``diverge_factor`` times the best so far, or the loss is not finite. The step's
weights, optimizer variables and state are then put back as they were, bit for bit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from trainer.callbacks.base import Callback
from trainer.common.errors import UserError
from trainer.training.trainer import Trainer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sweep:
    """How the finder raises the rate and when it stops.

    Args:
        min_lr: the rate of the first update.
        max_lr: the rate of the last update (if the loss has not diverged before).
        num_steps: updates at most, each at a rate ``(max_lr / min_lr) ** (1 / (num_steps -
            1))`` times the last one's.
        smoothing: the weight of the past in the loss' exponential moving average
            (0: no smoothing; 0.9: about the last ten updates), bias-corrected as in Adam.
        diverge_factor: stop once the smoothed loss exceeds this many times its best.
    """

    min_lr: float = 1e-6
    max_lr: float = 1.0
    num_steps: int = 100
    smoothing: float = 0.9
    diverge_factor: float = 4.0

    def __post_init__(self):
        if not 0 < self.min_lr < self.max_lr:
            raise UserError(f"lr_find.min_lr={self.min_lr} and lr_find.max_lr={self.max_lr} "
                            "must satisfy 0 < min_lr < max_lr")
        if self.num_steps < 3:
            raise UserError(f"lr_find.num_steps={self.num_steps} must be at least 3")
        if not 0 <= self.smoothing < 1:
            raise UserError(f"lr_find.smoothing={self.smoothing} must be within [0, 1)")
        if not self.diverge_factor > 1:
            raise UserError(f"lr_find.diverge_factor={self.diverge_factor} must be above 1")

    def rates(self) -> np.ndarray:
        """The rate of every planned update, rising exponentially (float64)."""
        return np.geomspace(self.min_lr, self.max_lr, self.num_steps)


@dataclass
class Curve:
    """The finder's result: one row per update it ran.

    Attributes:
        rates: the learning rate of each update.
        losses: the step's ``loss`` log of each update (on its batch, before the update).
        running: the bias-corrected moving average of ``losses`` as the sweep went
            (``Sweep.smoothing``): what the divergence check watches.
        smoothed: ``losses`` smoothed without lag (``smooth_centered``): what the
            suggestion is read from, and what the plot draws.
        diverged: whether the sweep stopped because the loss diverged (not at ``max_lr``).
        suggestion: the rate where ``smoothed`` falls fastest against log(rate).
    """

    rates: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    running: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    diverged: bool = False
    suggestion: float = math.nan

    def rows(self) -> list[dict]:
        """``{"step", "learning_rate", "loss", "running_loss", "smoothed_loss"}`` per update."""
        return [{"step": i, "learning_rate": r, "loss": loss, "running_loss": run,
                 "smoothed_loss": s}
                for i, (r, loss, run, s) in enumerate(zip(self.rates, self.losses,
                                                          self.running, self.smoothed))]


def smooth(losses, smoothing: float) -> np.ndarray:
    """The bias-corrected exponential moving average of ``losses``: after ``i + 1`` values,
    ``avg_i / (1 - smoothing ** (i + 1))`` with ``avg_i = smoothing * avg_{i-1} + (1 -
    smoothing) * loss_i`` (``avg_{-1} = 0``)."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses):
        avg = smoothing * avg + (1 - smoothing) * loss
        out.append(avg / (1 - smoothing ** (i + 1)))
    return np.asarray(out, np.float64)


def smooth_centered(losses, smoothing: float) -> np.ndarray:
    """``smooth`` run forwards, then backwards over its result: a moving average without
    the forward one's lag (which puts its fall some ``smoothing / (1 - smoothing)``
    updates after the loss'), so the rate of steepest descent is not shifted up."""
    forward = smooth(losses, smoothing)
    return smooth(forward[::-1], smoothing)[::-1]


def suggest(rates, smoothed) -> float:
    """The rate of steepest descent of ``smoothed`` against ``log(rates)``, looked for
    before the smoothed loss' minimum (past it the loss only rises); NaN with fewer than
    three points before the minimum."""
    smoothed = np.asarray(smoothed, np.float64)
    finite = np.isfinite(smoothed)
    if finite.sum() < 3:
        return math.nan
    end = int(np.nanargmin(np.where(finite, smoothed, np.nan))) + 1
    if end < 3:
        return math.nan
    slope = np.gradient(smoothed[:end], np.log(np.asarray(rates[:end], np.float64)))
    return float(rates[int(np.argmin(slope))])


def _smoothed(curve: Curve, smoothing: float) -> list[float]:
    """``smooth_centered`` of the losses before the divergence (NaN from it on): the one
    that stopped the sweep, or an infinite one, would leak back into those before it."""
    losses = np.asarray(curve.losses, np.float64)
    keep = len(losses) - 1 if curve.diverged else len(losses)
    bad = np.flatnonzero(~np.isfinite(losses[:keep]))
    keep = int(bad[0]) if len(bad) else keep
    out = np.full(len(losses), np.nan)
    out[:keep] = smooth_centered(losses[:keep], smoothing)
    return out.tolist()


class _RateSweep(Callback):
    """Sets each update's rate before it runs and records its loss (one step per
    execution); stops the fit when the smoothed loss diverges."""

    def __init__(self, sweep: Sweep, monitor: str):
        self.sweep, self.monitor = sweep, monitor
        self.planned = sweep.rates()
        self.curve = Curve()
        self._avg, self._best = 0.0, math.inf

    def _set_rate(self, trainer, rate: float) -> None:
        for opt in trainer.optimizers.values():
            opt.learning_rate = rate

    def on_fit_start(self, trainer) -> None:
        self._set_rate(trainer, float(self.planned[0]))

    def on_execution_end(self, trainer, global_step, logs) -> None:
        key = f"train/{self.monitor}"
        if key not in logs:
            raise UserError(f"lr_find.monitor={self.monitor!r}: the step logs no such value; "
                            f"choose one of {sorted(k[6:] for k in logs if k[:6] == 'train/')}")
        curve, beta = self.curve, self.sweep.smoothing
        i = len(curve.losses)
        loss = float(logs[key])
        self._avg = beta * self._avg + (1 - beta) * loss
        smoothed = self._avg / (1 - beta ** (i + 1))
        curve.rates.append(float(self.planned[i]))
        curve.losses.append(loss)
        curve.running.append(smoothed)
        self._best = min(self._best, smoothed)
        if not math.isfinite(smoothed) or smoothed > self.sweep.diverge_factor * self._best:
            curve.diverged = True
            trainer.stop_training = True
        elif i + 1 < len(self.planned):
            self._set_rate(trainer, float(self.planned[i + 1]))


def _rate(optimizer) -> float:
    """An optimizer's current rate as a float (under a strategy, a mirrored variable)."""
    import keras

    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def _state_variables(step) -> list:
    """Every variable the finder's updates may move: the models' (weights, batch-norm
    statistics, dropout's seed state), the optimizers' (slots, iterations, the rate) and
    the step's state but for its Keras metrics, which every epoch resets."""
    import tensorflow as tf

    variables = [v for m in step.models.values() for v in m.variables]
    for opt in step.optimizers.values():
        variables += [v for o in opt.optimizers.values() for v in o.variables]
    variables += tf.nest.flatten({k: v for k, v in step.state().items() if k != "metrics"})
    unique = {id(v): v for v in variables if hasattr(v, "assign")}
    return list(unique.values())


def find_learning_rate(step, data, *, sweep: Sweep | None = None, monitor: str = "loss",
                       run_eagerly: bool = False, jit_compile: bool | str = "auto",
                       accumulate_steps: int = 1, distribution=None) -> Curve:
    """Run the learning-rate sweep on ``step`` and ``data``; return the ``Curve`` with its
    suggestion. The step is left as it was: weights, optimizer variables (built here if
    they were not) and the step's state are restored bit for bit afterwards.

    ``monitor`` is the step's log whose curve is drawn (``loss``); the compile and
    distribution arguments are the ``Trainer``'s, so the sweep runs as the run would. The
    step must have one optimizer, its rate a constant number (no schedule): the sweep sets
    it.
    """
    sweep = sweep or Sweep()
    if len(step.optimizers) != 1:
        raise UserError(f"the step {type(step).__name__} has {len(step.optimizers)} optimizers "
                        f"({', '.join(step.optimizers)}); the finder sweeps the rate of one")
    for name, opt in step.optimizers.items():
        if opt.schedule is not None:
            raise UserError(f"optimizer {name!r} follows a learning-rate schedule, which the "
                            "finder cannot set; find the rate with schedule=null (the "
                            "suggestion is then the schedule's peak)")
    callback = _RateSweep(sweep, monitor)
    # Every step its own execution: the rate changes between updates, on the host.
    trainer = Trainer(epochs=sweep.num_steps, max_steps=sweep.num_steps, steps_per_execution=1,
                      run_eagerly=run_eagerly, jit_compile=jit_compile,
                      accumulate_steps=accumulate_steps, callbacks=[callback],
                      distribution=distribution)
    # Build the optimizers' state now, so the snapshot holds all of it.
    with trainer.distribution.scope():
        for opt in step.optimizers.values():
            opt.accumulate_steps = accumulate_steps
        step.build()
    variables = _state_variables(step)
    saved = [v.numpy() for v in variables]
    rates = {name: _rate(opt) for name, opt in step.optimizers.items()}
    try:
        trainer.fit(step, data, resume="never")
    except FloatingPointError:
        # The epoch's end refuses a non-finite loss; the curve already ends there.
        if not callback.curve.diverged:
            raise
    finally:
        for v, value in zip(variables, saved):
            v.assign(value)
        for name, opt in step.optimizers.items():
            opt.learning_rate = rates[name]
    curve = callback.curve
    curve.smoothed = _smoothed(curve, sweep.smoothing)
    curve.suggestion = suggest(curve.rates, curve.smoothed)
    log.info("lr_find: %d updates from %.3g to %.3g%s; suggested rate %.3g", len(curve.rates),
             curve.rates[0] if curve.rates else math.nan,
             curve.rates[-1] if curve.rates else math.nan,
             " (the loss diverged)" if curve.diverged else "", curve.suggestion)
    return curve
