"""Profiling: a TensorFlow profiler trace over a window of steps, for TensorBoard's Profile tab."""

from __future__ import annotations

import logging

import tensorflow as tf

from trainer.callbacks.base import Callback, resolve
from trainer.common.errors import UserError
from trainer.training.periodic import Periodic

log = logging.getLogger(__name__)


class ProfileCallback(Callback):
    """Records a profiler trace from global step ``steps[0]`` to ``steps[1]``.

    The trace starts at the first execution boundary at or after ``steps[0]``
    and stops at the first boundary at or after ``steps[1]`` (at least one
    execution later), since the profiler can only be switched between compiled
    executions; the log line says which steps were recorded. A fixed
    ``trainer.steps_per_execution`` gives finer control than ``auto``.

    The trace goes to ``<log_dir>/plugins/profile/<time>/``; with the default
    ``log_dir`` TensorBoard's Profile tab shows it next to the scalars (install
    the ``profile`` extra, ``pip install 'tape-trainer[profile]'``, for the tab).

    Args:
        steps: ``[start, stop]`` global steps; empty (the default) records nothing.
        log_dir: relative to the run directory unless absolute.
    """

    chief_only = True

    def __init__(self, *, steps=(), log_dir: str = "tb"):
        steps = [int(s) for s in (steps or ())]
        if steps and (len(steps) != 2 or not 0 <= steps[0] < steps[1]):
            raise UserError(
                f"callbacks.profile.steps={steps} must be [start, stop] with 0 <= start < stop"
            )
        self.steps = steps
        self.log_dir = log_dir
        self.recorded: tuple[int, int] | None = None
        self._started_at: int | None = None
        # Fires at the first boundary at or past the start, then at the first one at or past
        # the stop that is at least one execution later: the profiler switches only between
        # compiled executions.
        self._when = Periodic(on_steps=steps)

    def on_fit_start(self, trainer):
        self._update(trainer, trainer.current_step)

    def on_epoch_start(self, trainer, epoch):
        self._update(trainer, trainer.current_step)

    def on_execution_end(self, trainer, global_step, logs):
        self._update(trainer, global_step)

    def on_fit_end(self, trainer, logs):
        if self._started_at is not None:
            self._stop(trainer.current_step)

    def _update(self, trainer, global_step: int) -> None:
        if self.recorded is not None or not self._when.due(global_step):
            return
        if self._started_at is None:
            self._start(trainer, global_step)
        else:
            self._stop(global_step)

    def _start(self, trainer, global_step: int) -> None:
        path = resolve(trainer, self.log_dir)
        path.mkdir(parents=True, exist_ok=True)
        try:
            tf.profiler.experimental.start(str(path))
        except tf.errors.AlreadyExistsError:
            log.warning("profile: another profiler session is running; not profiling")
            self.recorded = (global_step, global_step)
            return
        self._started_at = global_step
        self._path = path

    def _stop(self, global_step: int) -> None:
        tf.profiler.experimental.stop()
        self.recorded = (self._started_at, global_step)
        self._started_at = None
        log.info("profile: steps %d-%d recorded under %s/plugins/profile", *self.recorded,
                 self._path)
