"""Gradient clipping of the update's gradient, as one device clips it. Pure TensorFlow.

A Keras optimizer clips the gradients it is given. Under a ``tf.distribute`` strategy it is
given each replica's share, before it sums them across replicas: ``clipnorm=0.01`` then clips
every replica's part on its own, and the update is not the one-device update (a half-batch
gradient is smaller, so it is clipped less, and the sum of clipped parts is not the clipped
sum). ``GradientClipping`` takes the clip settings away from the Keras optimizer and clips in
``GroupedOptimizer`` instead, on the gradient the update will apply: summed over the replicas
(one all-reduce of the flattened gradients) and, under ``trainer.accumulate_steps``, over the
micro-batches. Each replica's part is then changed so that the parts still sum to the clipped
gradient, and the optimizer's own all-reduce gives it exactly.
"""

from __future__ import annotations

import tensorflow as tf

from trainer.distribute.replicas import flat, step_variable, unflat

#: The Keras optimizer arguments, in the order Keras checks them (it allows only one).
KINDS = ("clipnorm", "global_clipnorm", "clipvalue")


class GradientClipping(tf.Module):
    """Clip the update's gradient with Keras' semantics, and count the updates clipped.

    Args:
        kind: ``"clipnorm"`` (each variable's gradient to norm ``value``),
            ``"global_clipnorm"`` (all the update's gradients together to global norm
            ``value``; across parameter groups too) or ``"clipvalue"`` (each entry to
            ``[-value, value]``).
        value: the threshold, positive.

    ``clipped`` counts the updates whose gradient was clipped (part of the training state);
    ``state_logs()`` logs it with the fraction of the optimizer's updates it is.
    """

    def __init__(self, kind: str, value: float):
        super().__init__(name="gradient_clipping")
        if kind not in KINDS:
            raise ValueError(f"unknown clipping {kind!r}; one of {', '.join(KINDS)}")
        if not value > 0:
            raise ValueError(f"optimizer.{kind} must be positive, got {value}")
        self.kind, self.value = kind, float(value)
        self.clipped = step_variable(0, dtype=tf.int64, name="clipped_updates")

    @classmethod
    def take_from(cls, optimizer) -> GradientClipping | None:
        """The clipping ``optimizer`` (a Keras optimizer) was built with, which is then
        switched off in it (and in its clones, made from its config); None without one."""
        for kind in KINDS:
            value = getattr(optimizer, kind, None)
            if value:
                for k in KINDS:
                    setattr(optimizer, k, None)
                return cls(kind, value)
        return None

    def clip(self, pairs: list) -> list:
        """``(gradient, variable)`` pairs, this replica's parts of the update, with the
        gradients changed so that their sum over the replicas is the clipped sum."""
        if not pairs:
            return pairs
        grads = [tf.convert_to_tensor(g) for g, _ in pairs]
        context = tf.distribute.get_replica_context()
        replicas = 1 if context is None else context.num_replicas_in_sync
        if replicas > 1:
            total = unflat(context.all_reduce(tf.distribute.ReduceOp.SUM, flat(grads)), grads)
        else:
            total = [tf.cast(g, tf.float32) for g in grads]
        clipped, active, factors = self._clip(total)
        self.clipped.assign_add(tf.cast(active, tf.int64))
        if replicas == 1:
            out = clipped
        elif factors is None:
            # Value clipping is not linear: each part takes an equal share of the correction.
            out = [g + tf.cast((c - t) / replicas, g.dtype)
                   for g, c, t in zip(grads, clipped, total)]
        else:
            # Norm clipping scales the sum, so each part is scaled by the same factor.
            out = [g * tf.cast(f, g.dtype) for g, f in zip(grads, factors)]
        return [(tf.cast(g, v.dtype), v) for g, (_, v) in zip(out, pairs)]

    def _clip(self, total):
        """The clipped gradients (Keras' formulas), whether any was changed, and for norm
        clipping the factor each gradient was multiplied by (None for value clipping)."""
        c = self.value
        if self.kind == "clipvalue":
            active = tf.reduce_any([tf.reduce_any(tf.abs(t) > c) for t in total])
            return [tf.clip_by_value(t, -c, c) for t in total], active, None
        if self.kind == "global_clipnorm":
            norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(t)) for t in total]))
            # Keras' factor: NaN when the norm is not finite, as the gradients are.
            factors = [c * tf.minimum(1.0 / norm, 1.0 / c) + (norm - norm)] * len(total)
            active = norm > c
        else:
            norms = [tf.norm(t) for t in total]
            factors = [c / tf.maximum(n, c) for n in norms]
            active = tf.reduce_any([n > c for n in norms])
        return [t * f for t, f in zip(total, factors)], active, factors

    def state_logs(self, iterations, prefix: str = "optimizer/") -> dict:
        """``clipped_updates`` (so far) and ``clipped_fraction`` (of ``iterations``, the
        updates applied so far)."""
        fraction = tf.math.divide_no_nan(tf.cast(self.clipped, tf.float32),
                                         tf.cast(iterations, tf.float32))
        return {f"{prefix}clipped_updates": self.clipped, f"{prefix}clipped_fraction": fraction}
