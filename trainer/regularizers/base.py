"""Regularizer: a weighted penalty added to the loss inside the tape, on a lazy schedule."""

from __future__ import annotations

import tensorflow as tf

from trainer.distribute.replicas import global_mean, in_replicas, step_variable
from trainer.regularizers.functional import fold_seed


class Regularizer:
    """Base class. Subclasses implement ``penalty(ctx)`` and may set ``needs_input_tape``.

    ``contribute(ctx)`` returns ``(weight * penalty, penalty)`` when the penalty
    is due. With ``every=k`` it is computed only on steps where the global step is
    a multiple of k, and then weighted by ``k * weight`` so its average pull on
    the parameters matches computing it every step (lazy regularization, as
    StyleGAN2 does for R1). On the other steps it contributes zero and the logged
    value is the last one computed. When every regularizer of a TapeStep is lazy,
    the step takes a plain update on steps where none is due, so those cost what
    a step without regularizers costs; otherwise the penalty runs inside a
    ``tf.cond`` branch within the tape.

    Args:
        weight: multiplier of the penalty in the loss.
        every: compute every k-th step (1 = every step).
        name: the log key is ``reg/<name>``; defaults to the class's ``name``.
    """

    name = "regularizer"
    #: True (or the number of ``gradient`` calls the penalty makes) if the penalty needs
    #: ``ctx.input_tape``, the tape that watched the inputs during the forward pass.
    needs_input_tape: bool | int = False
    #: ``"supervised"`` (added to a TapeStep's loss) or ``"critic"`` (to a GAN critic's loss).
    applies_to = "supervised"
    #: Whether the penalty all-reduces across replicas under a strategy (then a lazy one is
    #: computed every step there and counted when due: a cond branch cannot all-reduce).
    synchronizes = False

    def __init__(self, *, weight: float = 1.0, every: int = 1, name: str | None = None):
        if every < 1:
            raise ValueError(f"regularizer {name or self.name}: every={every} must be >= 1")
        self.weight = float(weight)
        self.every = int(every)
        if name:
            self.name = name
        self._last = step_variable(0.0, name=f"reg_{self.name}_last")

    def penalty(self, ctx):
        """The unweighted penalty as a scalar tensor; runs inside the outer tape."""
        raise NotImplementedError

    @property
    def scope(self) -> str:
        """The name scope of the penalty's ops: XLA errors name it, so the failing
        regularizer can be named (``trainer.compile.xla.raise_if_xla_error``)."""
        return f"regularizer_{self.name}"

    def contribute(self, ctx):
        """``(contribution to the loss, value to log)`` for this step."""
        with tf.name_scope(self.scope):
            return self._contribute(ctx)

    def _contribute(self, ctx):
        if self.every > 1 and self.synchronizes and in_replicas():
            # Its penalty talks to the other replicas, which a tf.cond branch cannot hold:
            # computed every step and counted only when due.
            due = tf.equal(ctx.iteration % self.every, 0)
            value = tf.cast(self.penalty(ctx), tf.float32)
            with ctx.tape.stop_recording():
                self._last.assign(tf.where(due, global_mean(value), self._last))
            return tf.where(due, self.every * self.weight * value, 0.0), self.last_value()
        if self.every == 1:
            value = tf.cast(self.penalty(ctx), tf.float32)
            return self.weight * value, value

        def due():
            value = tf.cast(self.penalty(ctx), tf.float32)
            return self.every * self.weight * value, value

        def not_due():
            return tf.constant(0.0), tf.identity(self._last)

        contribution, value = tf.cond(tf.equal(ctx.iteration % self.every, 0), due, not_due)
        # Written outside the cond: under a strategy a replica's write all-reduces, which a
        # cond branch cannot hold. The logged value is the global batch's.
        with ctx.tape.stop_recording():
            self._last.assign(global_mean(value))
        return contribution, self.last_value()

    def state(self) -> dict:
        """Variables a restart needs: the value computed last (what off-schedule steps log)."""
        return {"last": self._last}

    def last_value(self):
        """The value computed last (what ``reg/<name>`` logs on steps it is not due)."""
        return tf.identity(self._last)

    def __repr__(self):
        kind = type(self).__name__
        return f"{kind}(name={self.name!r}, weight={self.weight}, every={self.every})"


class RandomRegularizer(Regularizer):
    """A regularizer with random draws: stateless, seeded from ``seed``, its name and the step.

    Args:
        seed: base seed (the configs pass the run's ``seed``); the draws of step
            ``t`` are a pure function of ``(seed, name, t)``, identical eager,
            compiled and under XLA, and after resuming from a checkpoint.
    """

    def __init__(self, *, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.seed = int(seed)

    def draw_seed(self, ctx) -> tf.Tensor:
        """The ``[2]`` seed of this step's draws."""
        return fold_seed(self.seed, self.name, ctx.iteration)
