"""Regularizer: a weighted penalty added to the loss inside the tape, on a lazy schedule."""

from __future__ import annotations

import tensorflow as tf


class Regularizer:
    """Base class. Subclasses implement ``penalty(ctx)`` and may set ``needs_input_tape``.

    ``contribute(ctx)`` returns ``(weight * penalty, penalty)`` when the penalty
    is due. With ``every=k`` it is computed only on steps where the global step is
    a multiple of k, and then weighted by ``k * weight`` so its average pull on
    the parameters matches computing it every step (lazy regularization, as
    StyleGAN2 does for R1). On the other steps it contributes zero and the logged
    value is the last one computed.

    Args:
        weight: multiplier of the penalty in the loss.
        every: compute every k-th step (1 = every step).
        name: the log key is ``reg/<name>``; defaults to the class's ``name``.
    """

    name = "regularizer"
    #: True if the penalty needs gradients with respect to the inputs (``ctx.input_gradient``).
    needs_input_tape = False

    def __init__(self, *, weight: float = 1.0, every: int = 1, name: str | None = None):
        if every < 1:
            raise ValueError(f"regularizer {name or self.name}: every={every} must be >= 1")
        self.weight = float(weight)
        self.every = int(every)
        if name:
            self.name = name
        self._last = tf.Variable(0.0, trainable=False, name=f"reg_{self.name}_last")

    def penalty(self, ctx):
        """The unweighted penalty as a scalar tensor; runs inside the outer tape."""
        raise NotImplementedError

    def contribute(self, ctx):
        if self.every == 1:
            value = tf.cast(self.penalty(ctx), tf.float32)
            return self.weight * value, value

        def due():
            value = tf.cast(self.penalty(ctx), tf.float32)
            with ctx.tape.stop_recording():
                self._last.assign(value)
            return self.every * self.weight * value

        contribution = tf.cond(
            tf.equal(ctx.iteration % self.every, 0), due, lambda: tf.constant(0.0)
        )
        return contribution, tf.identity(self._last)
