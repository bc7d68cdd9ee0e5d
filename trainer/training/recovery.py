"""Rollback on blow-up: back to the last good state, a lower learning rate, and on.

The tape's reset policy (``trainer.step.tape.ResetPolicy``) discards single bad steps
inside the compiled step. When that is not enough (the loss of a whole execution is not
finite, jumps far above its running mean, or the reset policy gives up after too many
resets in a row), ``Recovery`` puts the whole training state back as it was at the last
good snapshot, scales the learning rate down, and training goes on: the rolled-back
batches are replayed. After ``max_attempts`` rollbacks the next blow-up stops the run
(``Diverged``; ``python -m trainer`` exits ``EXIT_DIVERGED``).

Everything here runs on the host between executions, on the logs each execution returns
anyway: detection adds no device read. Snapshots are the training state's own
``tf.train.Checkpoint`` written to TensorFlow's in-memory file system, so a rollback
restores exactly what a resume would (weights, optimizer slots, counters, step state,
data position, random state, callbacks' state, the trainer's progress). TensorFlow is
imported where it is used: the driver imports this module for the exit status before
TensorFlow starts.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from collections.abc import Mapping

from trainer.common.errors import UserError

log = logging.getLogger(__name__)

#: The exit status of a run that kept blowing up after ``max_attempts`` rollbacks: distinct
#: from a user error (2) and a preemption (75, retry as is): retrying the same command
#: would blow up again; change the config (a lower learning rate) first.
EXIT_DIVERGED = 3

_KEYS = ("enabled", "every_n_steps", "factor", "window", "lr_scale", "max_attempts", "monitor")
_instances = itertools.count()


class Diverged(Exception):
    """The run blew up again after ``max_attempts`` rollbacks (one line: why, and where)."""


class Recovery:
    """When to roll back, to where, and how much to lower the learning rate.

    Args:
        enabled: off by default (``trainer.recovery.enabled``).
        every_n_steps: keep an in-memory snapshot every this many global steps (taken at
            execution boundaries); 0 keeps none and rolls back to the newest checkpoint on
            disk instead.
        factor: an execution whose mean ``monitor`` exceeds ``factor`` times the running
            mean of the last ``window`` executions' is a blow-up (once ``window`` are
            known, and while that mean is positive); null: only non-finite losses count.
        window: executions in that running mean.
        lr_scale: each rollback multiplies every optimizer's learning rate by this (a
            schedule's too: the scale multiplies its value).
        max_attempts: rollbacks allowed in the whole run; one more blow-up stops it.
        monitor: the train log checked (``loss``; a GAN's ``d_loss``, say).
    """

    def __init__(self, *, enabled: bool = False, every_n_steps: int = 100,
                 factor: float | None = 10.0, window: int = 20, lr_scale: float = 0.5,
                 max_attempts: int = 3, monitor: str = "loss"):
        key = "trainer.recovery"
        if every_n_steps < 0:
            raise UserError(f"{key}.every_n_steps={every_n_steps} must be >= 0 (0: roll back "
                            "to the newest checkpoint on disk)")
        if factor is not None and not factor > 1:
            raise UserError(f"{key}.factor={factor} must be > 1 (or null: only non-finite "
                            "losses count as a blow-up)")
        if window < 1:
            raise UserError(f"{key}.window={window} must be at least 1")
        if not 0 < lr_scale <= 1:
            raise UserError(f"{key}.lr_scale={lr_scale} must be in (0, 1], e.g. 0.5")
        if max_attempts < 0:
            raise UserError(f"{key}.max_attempts={max_attempts} must be >= 0")
        self.enabled = bool(enabled)
        self.every_n_steps = int(every_n_steps)
        self.factor = None if factor is None else float(factor)
        self.window = int(window)
        self.lr_scale = float(lr_scale)
        self.max_attempts = int(max_attempts)
        self.monitor = str(monitor)
        self._losses: deque = deque(maxlen=self.window)
        self._prefix = f"ram://trainer-recovery/{next(_instances)}"
        self._names = itertools.count()
        # (path, global step) of the newest confirmed snapshot and of the one taken at the
        # last boundary: a state is good once the execution that starts from it passes
        # (a blow-up in an execution's last update shows only in the next one's loss).
        self.snapshot: tuple[str, int] | None = None
        self._pending: tuple[str, int] | None = None
        #: The newest global step whose state is known good (for the checkpoint fallback).
        self.good_step: int | None = None
        self._scale_variable = None  # a tf.Variable, from scale_variable() on

    @classmethod
    def of(cls, value) -> Recovery:
        """A ``Recovery`` from a ``Recovery``, a config mapping (``trainer.recovery``) or None."""
        if value is None:
            return cls()
        if isinstance(value, Recovery):
            return value
        if not isinstance(value, Mapping):
            raise UserError(f"trainer.recovery={value!r} must be a mapping of {', '.join(_KEYS)}")
        unknown = sorted(set(value) - set(_KEYS))
        if unknown:
            raise UserError(f"trainer.recovery: unknown key {unknown[0]}; the keys are "
                            f"{', '.join(_KEYS)}")
        return cls(**dict(value))

    # --- the learning-rate scale ----------------------------------------------------------
    def scale_variable(self, distribution):
        """The cumulative scale, as the variable a scheduled rate is multiplied by (made in
        ``distribution``'s scope; its value comes from the progress, not the checkpoint)."""
        if self._scale_variable is None:
            import tensorflow as tf

            with distribution.scope():
                self._scale_variable = tf.Variable(
                    1.0, trainable=False, name="recovery_lr_scale",
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        return self._scale_variable

    # --- detection --------------------------------------------------------------------------
    def blow_up(self, out: dict) -> str | None:
        """Why the execution whose mean train logs are ``out`` blew up, or None."""
        if self.monitor not in out:
            raise UserError(f"trainer.recovery.monitor={self.monitor!r} is not a train log of "
                            f"this step ({', '.join(sorted(out))}); set it to one of them")
        value = float(out[self.monitor])
        if not math.isfinite(value):
            return f"train/{self.monitor} is {value}"
        if self.factor is not None and len(self._losses) == self.window:
            mean = sum(self._losses) / self.window
            if mean > 0 and value > self.factor * mean:
                return (f"train/{self.monitor}={value:.4g} is more than {self.factor:g} times "
                        f"its running mean {mean:.4g}")
        return None

    def passed(self, out: dict, start: int, end: int) -> bool:
        """Record the execution from global step ``start`` to ``end`` as good; True when a
        snapshot is due at ``end``."""
        self._losses.append(float(out[self.monitor]))
        if self._pending is not None and self._pending[1] == start:
            self._drop(self.snapshot)
            self.snapshot, self._pending = self._pending, None
        self.good_step = start
        if not self.every_n_steps:
            return False
        last = max((s[1] for s in (self.snapshot, self._pending) if s is not None), default=None)
        return last is None or end - last >= self.every_n_steps

    # --- snapshots ----------------------------------------------------------------------------
    def take(self, checkpoint, global_step: int, *,
             confirmed: bool = False) -> None:
        """Write the training state to memory at ``global_step``: pending until the next
        execution passes, or ``confirmed`` (the state a fit starts from)."""
        # A new name each time (TensorFlow's in-memory files are not rewritten in place
        # cleanly); the snapshot it replaces is deleted.
        path = f"{self._prefix}/{next(self._names)}"
        checkpoint.write(path)
        if confirmed:
            self._drop(self.snapshot, self._pending)
            self.snapshot, self._pending, self.good_step = (path, global_step), None, global_step
        else:
            self._drop(self._pending)
            self._pending = (path, global_step)

    def restore(self, checkpoint) -> int:
        """Read the confirmed snapshot back into the training state; return its global step."""
        path, step = self.snapshot
        status = checkpoint.read(path)
        status.assert_existing_objects_matched()
        status.expect_partial()
        self._drop(self._pending)
        self._pending = None
        return step

    def forget(self) -> None:
        """Drop the snapshots (the end of a fit: memory back)."""
        self._drop(self.snapshot, self._pending)
        self.snapshot = self._pending = None

    @staticmethod
    def _drop(*snapshots) -> None:
        import tensorflow as tf

        for s in snapshots:
            if s is not None:
                for f in tf.io.gfile.glob(f"{s[0]}.*"):
                    tf.io.gfile.remove(f)
