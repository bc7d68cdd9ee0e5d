"""How many steps each compiled execution runs: a fixed number, or tuned to a duration."""

from __future__ import annotations

from trainer.errors import UserError

#: ``steps_per_execution="auto"`` aims for executions of this many seconds ...
TARGET_SECONDS = 0.5
#: ... and re-tunes when one would take less or more than these.
BAND_SECONDS = (0.2, 1.0)
#: The first execution's steps; also the most the count grows per execution is 16x.
FIRST_STEPS = 16
MAX_STEPS = 1 << 20


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
    """

    def __init__(self, steps_per_execution):
        value = check_steps_per_execution(steps_per_execution)
        self.setting = value
        self.auto = value == "auto"
        self.steps = FIRST_STEPS if self.auto else value
        self._ramping = self.auto  # the count is still growing toward the target

    def observe(self, steps: int, seconds: float, traced: bool) -> None:
        """Record an execution of ``steps`` steps that took ``seconds``."""
        if not self.auto or traced or seconds <= 0:
            return
        rate = steps / seconds
        low, high = BAND_SECONDS
        if low <= self.steps / rate <= high and not self._ramping:
            return
        wanted = max(1, min(round(TARGET_SECONDS * rate), MAX_STEPS))
        self.steps = min(wanted, 16 * self.steps)
        self._ramping = self.steps < wanted


#: ``jit_compile="auto"`` uses XLA for in-memory runs of at least this many steps: the
#: compilation takes 1-3 s here, and XLA saves ~0.1 ms a step on a small MLP.
AUTO_XLA_MIN_STEPS = 10_000
JIT_CHOICES = (True, False, "auto")


def check_jit_compile(value):
    """``True``, ``False`` or ``"auto"``."""
    if not (isinstance(value, bool) or value == "auto"):
        raise UserError(f"trainer.jit_compile={value!r} must be auto, true or false")
    return value


def choose_xla(jit_compile, *, fused: bool, run_eagerly: bool, planned_steps: float) -> bool:
    """Whether to compile with XLA: as configured, or for ``"auto"`` when the whole
    execution can be one XLA program (an in-memory source) and the run is long
    enough for the compilation to pay back."""
    if jit_compile != "auto":
        return bool(jit_compile)
    return fused and not run_eagerly and planned_steps >= AUTO_XLA_MIN_STEPS
