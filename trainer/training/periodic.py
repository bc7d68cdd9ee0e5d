"""Periodic: the one answer to "is this action due now?" for every callback.

Callbacks say *what* to do (write histograms, save a checkpoint, draw an image);
a ``Periodic`` says *when*, as google CommonLoopUtils' ``PeriodicAction`` and
Orbit's ``ConditionalAction``/``IntervalTrigger`` do. Pure Python, no TensorFlow.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Periodic:
    """Decides whether a callback's action is due, from any combination of triggers.

    The trainer runs several steps per compiled execution, so callbacks only see
    the global step at execution boundaries; step triggers therefore fire at the
    first boundary *at or past* each multiple, not exactly on it.

    Triggers (0 or False turns one off; any that is due makes the action due):

    - ``every_n_steps=n``: when ``global_step // n`` differs from its value at the
      last firing (or at ``reset``): the first boundary at or past each multiple
      of ``n``. Several multiples passed in one execution give one firing.
    - ``every_n_epochs=n``: at an epoch end (``due(..., epoch_end=epoch)``) when
      ``(epoch + 1) // n`` (epochs completed, in multiples of ``n``) differs from
      its value at the last firing or ``reset``.
    - ``on_steps=[a, b, ...]``: at the first boundary at or past each listed step,
      one listed step per firing: a step passed at the boundary of the previous
      firing waits for the next boundary (a profiler window's start and stop are
      then at least one execution apart). ``reset`` leaves them alone.
    - ``every_seconds=s``: when ``s`` seconds have passed since the last firing
      (or the ``reset``), at whatever boundary ``due`` is next called; independent
      of steps and epochs.
    - ``at_start``/``at_end``: when ``due`` is called with ``start=True``/``end=True``
      (at the start and at the end of ``fit``).

    Throttle: ``min_seconds=s`` holds back the step and epoch triggers for ``s``
    seconds after the last firing. A held-back trigger stays pending and fires at
    the next boundary once the time has passed (so no multiple is silently lost;
    histograms and checkpoints of fast loops use this to bound their cost). The
    time triggers, the start and the end are never held back.

    Whatever the triggers, the action never fires twice at the same global step: a
    trigger that comes due at the step of the last firing counts as served by it.

    Args:
        every_n_steps: step interval; 0 turns the step trigger off.
        on_steps: global steps to fire at (at the first boundary at or past each).
        every_n_epochs: epoch interval; 0 turns the epoch trigger off.
        every_seconds: time interval; 0 turns the time trigger off.
        min_seconds: the throttle on the step and epoch triggers; 0 turns it off.
        at_start: due when asked with ``start=True``.
        at_end: due when asked with ``end=True``.
        clock: seconds as a float (``time.monotonic``; tests inject a fake clock).

    Example::

        when = Periodic(every_n_steps=100, min_seconds=10.0, at_start=True)
        when.reset(trainer.current_step)                  # in on_fit_start
        if when.due(trainer.current_step, start=True): ...
        if when.due(global_step): ...                     # in on_execution_end
    """

    def __init__(
        self,
        *,
        every_n_steps: int = 0,
        on_steps=(),
        every_n_epochs: int = 0,
        every_seconds: float = 0.0,
        min_seconds: float = 0.0,
        at_start: bool = False,
        at_end: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs),
                            ("every_seconds", every_seconds), ("min_seconds", min_seconds)):
            if value < 0:
                raise ValueError(f"Periodic: {name}={value} must be >= 0 (0 turns it off)")
        self.every_n_steps = int(every_n_steps)
        self.on_steps = sorted({int(s) for s in on_steps})
        self._pending = list(self.on_steps)  # listed steps not fired at yet
        self.every_n_epochs = int(every_n_epochs)
        self.every_seconds = float(every_seconds)
        self.min_seconds = float(min_seconds)
        self.at_start = bool(at_start)
        self.at_end = bool(at_end)
        self._clock = clock
        #: Global step of the last firing, or None before the first one.
        self.last_step: int | None = None
        #: Clock reading of the last firing, or None before the first one.
        self.last_time: float | None = None
        self._step_bucket = 0
        self._epoch_bucket = 0
        self._since: float | None = None  # the every_seconds origin: last firing or reset

    def use_clock(self, clock: Callable[[], float]) -> None:
        """Read time from ``clock`` from now on (the trainer's: under several workers, the
        chief's, so every worker's timed actions fire at the same boundaries)."""
        self._clock = clock

    def reset(self, global_step: int, *, epoch: int = 0) -> None:
        """Count from ``global_step`` (and ``epoch``, the 0-based epoch that starts next).

        Call it at the start of ``fit``: a run resumed at step 1,050 with
        ``every_n_steps=100`` then fires first at or past 1,100, not at once for
        the ten multiples it passed before the restart. The time trigger counts
        from now. The throttle and the never-twice-at-one-step rule keep counting
        from the last firing, so they hold across repeated ``fit`` calls.
        """
        self._step_bucket = self._bucket(global_step, self.every_n_steps)
        self._epoch_bucket = self._bucket(epoch, self.every_n_epochs)
        self._since = self._clock()

    def due(self, global_step: int, *, epoch_end: int | None = None, start: bool = False,
            end: bool = False) -> bool:
        """Whether the action is due at ``global_step``; a True answer records a firing.

        Args:
            global_step: the trainer's global step at this boundary.
            epoch_end: the 0-based epoch that just ended, when asked from an epoch
                end (the only place the epoch trigger is checked).
            start: asked at the start of ``fit`` (the ``at_start`` trigger).
            end: asked at the end of ``fit`` (the ``at_end`` trigger).
        """
        global_step = int(global_step)
        now = self._clock()
        if self._since is None:
            self._since = now
        if global_step == self.last_step:
            # The action already ran at this step: what came due since is served by it.
            self._consume(global_step, epoch_end)
            return False
        listed = bool(self._pending) and global_step >= self._pending[0]
        counted = self._step_due(global_step) or self._epoch_due(epoch_end) or listed
        held = (self.min_seconds > 0 and self.last_time is not None
                and now - self.last_time < self.min_seconds)
        timed = self.every_seconds > 0 and now - self._since >= self.every_seconds
        if not ((counted and not held) or timed or (start and self.at_start)
                or (end and self.at_end)):
            return False
        self.last_step, self.last_time, self._since = global_step, now, now
        self._consume(global_step, epoch_end)
        if listed:
            self._pending.pop(0)
        return True

    def _step_due(self, global_step: int) -> bool:
        n = self.every_n_steps
        return n > 0 and global_step // n != self._step_bucket

    def _epoch_due(self, epoch_end: int | None) -> bool:
        n = self.every_n_epochs
        return n > 0 and epoch_end is not None and (epoch_end + 1) // n != self._epoch_bucket

    def _consume(self, global_step: int, epoch_end: int | None) -> None:
        self._step_bucket = self._bucket(global_step, self.every_n_steps)
        if epoch_end is not None:
            self._epoch_bucket = self._bucket(epoch_end + 1, self.every_n_epochs)

    @staticmethod
    def _bucket(count: int, n: int) -> int:
        return count // n if n > 0 else 0

    def __repr__(self) -> str:
        on = {k: v for k, v in (("every_n_steps", self.every_n_steps),
                                ("on_steps", self.on_steps),
                                ("every_n_epochs", self.every_n_epochs),
                                ("every_seconds", self.every_seconds),
                                ("min_seconds", self.min_seconds),
                                ("at_start", self.at_start), ("at_end", self.at_end)) if v}
        return f"Periodic({', '.join(f'{k}={v!r}' for k, v in on.items())})"
