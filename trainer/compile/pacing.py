"""How many steps each compiled execution runs: a fixed number, or tuned to a duration."""

from __future__ import annotations

from trainer.common.errors import UserError

#: ``steps_per_execution="auto"`` aims for executions of this many seconds ...
TARGET_SECONDS = 0.5
#: ... and re-tunes when one would take less or more than these.
BAND_SECONDS = (0.2, 1.0)
#: The first execution's steps; also the most the count grows per execution is 16x.
FIRST_STEPS = 16
MAX_STEPS = 1 << 20
#: ``"auto"`` splits a run of known length into at least this many executions, so its
#: per-execution logs (TensorBoard's training curves) have points enough to draw a curve.
MIN_EXECUTIONS = 20


def check_steps_per_execution(value):
    """``"auto"`` or an int >= 1 (also from a string, as a config may give it)."""
    if value == "auto":
        return value
    try:
        steps = int(value)
    except (TypeError, ValueError):
        steps = 0
    if isinstance(value, bool) or steps < 1 or str(steps) != str(value).strip():
        raise UserError(f"trainer.steps_per_execution={value!r} must be auto or an integer >= 1")
    return steps


class Pacing:
    """The step count of the next execution.

    A fixed count is used as is. With ``"auto"``, every execution is measured
    (except ones that traced or compiled) and the count is re-tuned to
    ``TARGET_SECONDS`` whenever an execution at the current count would last
    less than 0.2 s or more than 1 s: the first executions ramp up (at most 16x
    each) to the target, and later a change of speed (a recompilation after unfreezing, a
    busier machine) is followed, at the latest at the next epoch. An execution
    is also cut short at the end of an epoch or of the step budget, so small
    data sets run one execution per epoch.

    With ``planned_steps`` (the whole run's steps: epochs times steps per epoch, or
    the step budget) ``"auto"`` also caps the count at ``planned_steps //
    MIN_EXECUTIONS``, so a short run still logs a curve of at least ``MIN_EXECUTIONS``
    points instead of one per epoch. It only binds on runs shorter than
    ``MIN_EXECUTIONS`` target-length executions (about 10 s of steps), where it adds
    at most ``MIN_EXECUTIONS`` executions (host syncs, ~1 ms each) to the run.
    """

    def __init__(self, steps_per_execution, planned_steps: int | None = None):
        value = check_steps_per_execution(steps_per_execution)
        self.setting = value
        self.auto = value == "auto"
        self.planned_steps = planned_steps
        self._tuned = FIRST_STEPS if self.auto else value  # the count the timing asks for
        self._ramping = self.auto  # the count is still growing toward the target

    @property
    def steps(self) -> int:
        """The next execution's step count (before the epoch's and the budget's cuts)."""
        if not self.auto or not self.planned_steps:
            return self._tuned
        return min(self._tuned, max(1, self.planned_steps // MIN_EXECUTIONS))

    def steps_for(self, remaining: int) -> int:
        """The next execution's count when ``remaining`` steps are left before a boundary
        (the epoch's end, the step budget): ``steps`` at most. With ``"auto"`` the
        executions up to the boundary are as many as ``steps`` needs, of equal sizes
        (23 steps at most 11 at a time: 8, 8, 7, not 11, 11, 1, whose last point would be
        one batch's); a fixed count is used as is."""
        if not self.auto:
            return min(self.steps, remaining)
        executions = -(-remaining // self.steps)
        return -(-remaining // executions)

    def observe(self, steps: int, seconds: float, traced: bool) -> None:
        """Record an execution of ``steps`` steps that took ``seconds``."""
        if not self.auto or traced or seconds <= 0:
            return
        rate = steps / seconds
        low, high = BAND_SECONDS
        if low <= self._tuned / rate <= high and not self._ramping:
            return
        wanted = max(1, min(round(TARGET_SECONDS * rate), MAX_STEPS))
        self._tuned = min(wanted, 16 * self._tuned)
        self._ramping = self._tuned < wanted
