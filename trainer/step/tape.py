"""Gradients over lists and dicts of variables, with an explicit unconnected-gradient policy."""

from __future__ import annotations

import tensorflow as tf

from trainer.common.errors import UserError
from trainer.distribute.replicas import micro_batch, step_variable

UNCONNECTED = ("none", "zero")


def check_unconnected(policy: str) -> str:
    if policy not in UNCONNECTED:
        raise UserError(f"tape.unconnected_gradients={policy!r} must be one of {UNCONNECTED}")
    return policy


#: Up to this many gradient entries, ``global_norm`` concatenates them first.
_CONCAT_NORM_MAX = 1 << 16


def global_norm(grads) -> tf.Tensor:
    """The global norm of a list of gradients (``None`` entries skipped), as float32.

    Same value as ``tf.linalg.global_norm``, computed as one reduction over the
    concatenated gradients when they are small: XLA on CPU runs every per-tensor
    reduction as its own kernel, and for a small MLP those six reductions cost a
    fifth of the step (a tenth without XLA). Large or sparse gradients keep the
    per-tensor sums: copying 2M entries made a 784-1024-1024-10 step 3x slower.
    """
    grads = [g for g in grads if g is not None]
    if not grads:
        return tf.constant(0.0)
    sizes = [g.shape.num_elements() for g in grads if isinstance(g, tf.Tensor)]
    if len(sizes) == len(grads) and None not in sizes and sum(sizes) <= _CONCAT_NORM_MAX:
        flat = tf.concat([tf.reshape(tf.cast(g, tf.float32), [-1]) for g in grads], 0)
        # tf.norm's math without its keepdims reshape: one op less.
        return tf.sqrt(tf.reduce_sum(tf.square(flat)))
    return tf.cast(tf.linalg.global_norm(grads), tf.float32)


def gradients(tape: tf.GradientTape, target, sources, *, unconnected: str = "none",
              scale=1.0):
    """``tape.gradient(target, sources)`` for a list or a dict of variables.

    The result has the structure of ``sources``, times ``scale`` (a replica's share
    of the global batch, a loss scale). With ``unconnected="zero"``
    variables the target does not reach get zeros of their shape. TensorFlow's own
    ``UnconnectedGradients.ZERO`` fails on Keras 3 variables in some graphs
    (``'str' object has no attribute '_type_enum'``), so zeros are filled in here
    from each variable's shape and dtype instead.
    """
    if isinstance(scale, float) and scale == 1.0:
        grads = tape.gradient(target, sources)
    else:
        # The scale enters as the target's upstream gradient: nothing is recorded, and
        # every gradient of the backward pass carries it (a loss scale keeps float16
        # gradients from underflowing that way).
        target = tf.convert_to_tensor(target)
        grads = tape.gradient(target, sources,
                              output_gradients=tf.cast(scale, target.dtype) * tf.ones_like(target))
    if unconnected == "none":
        return grads
    return tf.nest.map_structure(
        lambda g, v: tf.zeros(v.shape, v.dtype) if g is None else g,
        grads,
        sources,
        check_types=False,
    )


RESET_WHEN = ("nonfinite", "threshold", "spike")
RESET_ACTIONS = ("skip", "retry")


class ResetPolicy:
    """When to discard a recorded forward pass, and what to do instead.

    The seed's ``if loss > flag: tape.reset()`` as a policy. Conditions
    (``when``, any of):

    - ``nonfinite``: the loss or any gradient is NaN or infinite;
    - ``threshold``: the loss exceeds ``threshold``;
    - ``spike``: the loss exceeds the running mean by ``spike_z`` running standard
      deviations over the last ``spike_window`` accepted steps (once the window is full).

    ``action="skip"`` discards the step: no variable, optimizer slot or optimizer
    iteration changes, but the global step advances. ``action="retry"`` records
    the next batch instead, up to ``max_retries`` times, then skips.
    ``max_consecutive`` resets in a row stop the run with an error naming the step.

    Eagerly the step calls ``tape.reset()`` on the recorded tape, literally;
    compiled, the update is guarded by ``tf.cond`` with the same observable result.
    The statistics are plain ``tf.Variable`` state, updated under
    ``tape.stop_recording()``, so they never reach the gradients.
    """

    def __init__(
        self,
        *,
        when,
        threshold: float | None = None,
        spike_window: int = 50,
        spike_z: float = 6.0,
        action: str = "skip",
        max_retries: int = 3,
        max_consecutive: int = 20,
    ):
        when = [when] if isinstance(when, str) else list(when)
        for w in when:
            if w not in RESET_WHEN:
                raise UserError(f"tape.reset.when: {w!r} is not one of {RESET_WHEN}")
        if "threshold" in when and threshold is None:
            raise UserError("tape.reset.when has 'threshold' but tape.reset.threshold is null; "
                            "set tape.reset.threshold=VALUE")
        if action not in RESET_ACTIONS:
            raise UserError(f"tape.reset.action={action!r} must be one of {RESET_ACTIONS}")
        if spike_window < 2 or max_consecutive < 1 or max_retries < 0:
            raise UserError("tape.reset: spike_window >= 2, max_consecutive >= 1 and "
                            "max_retries >= 0 are required")
        self.when = tuple(when)
        self.threshold = threshold
        self.spike_window = int(spike_window)
        self.spike_z = float(spike_z)
        self.action = action
        self.max_retries = int(max_retries) if action == "retry" else 0
        self.max_consecutive = int(max_consecutive)
        # State lives in variables created here, outside any tf.function.
        self.resets = step_variable(0, dtype=tf.int64, name="tape_resets")
        self.streak = step_variable(0, dtype=tf.int64, name="tape_reset_streak")
        self.failed_at = step_variable(-1, dtype=tf.int64, name="tape_failed_at")
        self.last_reset = step_variable(False, name="tape_last_reset")
        self.window = step_variable(tf.zeros([self.spike_window]), name="tape_loss_window")
        self.seen = step_variable(0, dtype=tf.int64, name="tape_losses_seen")
        # An earlier micro-batch of this update was reset (gradient accumulation).
        self.pending = step_variable(False, name="tape_reset_pending")

    def check_loss(self, loss):
        """Conditions decidable from the loss alone (before any gradient): a bool tensor."""
        loss = tf.cast(loss, tf.float32)
        bad = tf.constant(False)
        if "nonfinite" in self.when:
            bad = tf.logical_or(bad, tf.logical_not(tf.math.is_finite(loss)))
        if "threshold" in self.when:
            bad = tf.logical_or(bad, loss > self.threshold)
        if "spike" in self.when:
            mean = tf.reduce_mean(self.window)
            std = tf.math.reduce_std(self.window)
            full = self.seen >= self.spike_window
            bad = tf.logical_or(bad, tf.logical_and(full, loss > mean + self.spike_z * std))
        return bad

    def check_gradients(self, grads):
        """True if any gradient is non-finite (only with ``nonfinite`` in ``when``)."""
        if "nonfinite" not in self.when:
            return tf.constant(False)
        flags = [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
        return tf.logical_not(tf.reduce_all(flags)) if flags else tf.constant(False)

    def record(self, loss, reset, iteration):
        """Update counters and loss statistics after a step; returns nothing.

        Under gradient accumulation a step is one update of several micro-batches: a
        micro-batch's reset is held until the last one, and the update counts as one
        reset if any of its micro-batches was (the whole update is discarded).
        """
        micro = micro_batch()
        if micro is not None:
            index, count = micro
            if index < count - 1:
                self.pending.assign(tf.logical_or(self.pending, reset))
                return
            reset = tf.logical_or(self.pending, reset)
            self.pending.assign(False)
        self.last_reset.assign(reset)
        self.resets.assign_add(tf.cast(reset, tf.int64))
        streak = tf.where(reset, self.streak + 1, tf.zeros_like(self.streak))
        self.streak.assign(streak)
        failed = tf.logical_and(streak >= self.max_consecutive, self.failed_at < 0)
        self.failed_at.assign(tf.where(failed, iteration, self.failed_at))
        if "spike" in self.when:
            slot = self.seen % self.spike_window
            accepted = tf.logical_not(reset)
            # tf.gather, not window[slot]: XLA takes a slice start as a compile-time constant
            # and would compile the step again for every position of the window.
            value = tf.where(accepted, tf.cast(loss, tf.float32), tf.gather(self.window, slot))
            # A whole assign, not scatter_nd_update: the window is small, and a scatter
            # into a mirrored variable is not allowed inside a replica.
            self.window.assign(tf.tensor_scatter_nd_update(self.window, [[slot]], [value]))
            self.seen.assign_add(tf.cast(accepted, tf.int64))

    def state(self) -> dict:
        """Variables a restart needs: counters, the streak and the loss window.

        Not ``failed_at``: a run resumed after stopping on too many resets (perhaps
        with other settings) starts armed again, with its streak.
        """
        return {"resets": self.resets, "streak": self.streak, "last_reset": self.last_reset,
                "window": self.window, "seen": self.seen}

    def rearm(self) -> None:
        """Forget a failure (``failed_at``): after a rollback the run goes on."""
        self.failed_at.assign(-1)

    def state_logs(self) -> dict:
        """Logged after each execution: resets so far, and the step that failed (or -1)."""
        return {"tape/resets": self.resets, "tape/failed_at_step": self.failed_at}

    def raise_if_failed(self, state: dict) -> None:
        """Host side, after an execution: stop the run after too many resets in a row."""
        failed = int(state.get("tape/failed_at_step", -1))
        if failed >= 0:
            raise TapeResetError(
                f"the tape was reset {self.max_consecutive} times in a row, the last at step "
                f"{failed}; check the data and tape.reset settings (tape.reset.max_consecutive)"
            )


class TapeResetError(UserError):
    """Too many consecutive tape resets."""
