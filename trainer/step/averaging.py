"""An exponential moving average of the models' weights, updated inside the compiled step."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import tensorflow as tf

from trainer.common.errors import UserError

#: Which weights a run ships (``model.keras``, the best checkpoint, evaluate and predict).
SHIPPED = ("averaged", "trained")


@dataclass(frozen=True)
class EmaSettings:
    """``trainer.ema``: an exponential moving average of the weights, or none.

    Attributes:
        decay: the average's decay in [0, 1) (0.999 is usual), or None for no average.
        warmup: a lower decay early on (``WeightAverage``).
        weights: which weights the run ships: ``"averaged"`` (``model.keras``, the
            best checkpoint as ``evaluate``/``predict`` load it) or ``"trained"``.
    """

    decay: float | None = None
    warmup: bool = False
    weights: str = "averaged"

    @classmethod
    def read(cls, node) -> EmaSettings:
        """From a config node (a mapping, possibly empty) or None, checked."""
        node = dict(node or {})
        unknown = sorted(set(node) - {"decay", "warmup", "weights"})
        if unknown:
            raise UserError(f"trainer.ema.{unknown[0]} is not a setting; use decay, warmup "
                            "or weights")
        settings = cls(**node)
        if settings.decay is not None and not 0.0 <= settings.decay < 1.0:
            raise UserError(f"trainer.ema.decay={settings.decay} must be in [0, 1), e.g. "
                            "trainer.ema.decay=0.999 (or null for no average)")
        if settings.weights not in SHIPPED:
            raise UserError(f"trainer.ema.weights={settings.weights!r} must be one of "
                            f"{', '.join(SHIPPED)}")
        return settings

    @property
    def on(self) -> bool:
        return self.decay is not None


class WeightAverage(tf.Module):
    """``average = decay * average + (1 - decay) * weights`` after every update.

    Every floating-point weight of the models is averaged (trainable or not: batch-norm
    statistics too, frozen weights stay equal to themselves), in float32 whatever the
    weights' dtype, starting from the weights as they are when it is made. ``update`` runs
    once per update inside the compiled execution: after the optimizer's step, in the
    cross-replica context under a strategy (the weights are the same on every replica), and
    after the last micro-batch under gradient accumulation. The averages are part of the
    training state (``averages/...`` in the checkpoint).

    Args:
        models: the step's models by name.
        decay: the average's decay, in [0, 1).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at the ``n``-th update (counted by
            the global step): early averages forget the random start quickly.
    """

    def __init__(self, models: dict, *, decay: float, warmup: bool = False):
        super().__init__(name="weight_average")
        self.decay, self.warmup = float(decay), bool(warmup)
        # Not dropout's random state (a seed, in float32 on some backends).
        weights = {name: [v for v in m.weights if tf.as_dtype(v.dtype).is_floating
                          and v.name != "seed_generator_state"] for name, m in models.items()}
        # A closure, not an attribute: the checkpoint holds the weights under models/ already.
        self._weights = lambda: weights
        #: The averages by model name, aligned with the model's float weights.
        self.averages = {name: [tf.Variable(tf.cast(v, tf.float32), trainable=False,
                                            name="average") for v in ws]
                         for name, ws in weights.items()}

    def _pairs(self):
        for name, ws in self._weights().items():
            yield from zip(self.averages[name], ws)

    def update(self, global_step) -> None:
        """Move the averages towards the weights (``global_step``: updates before this one)."""
        decay = tf.constant(self.decay, tf.float32)
        if self.warmup:
            n = tf.cast(global_step, tf.float32)
            decay = tf.minimum(decay, (1.0 + n) / (10.0 + n))
        for average, weight in self._pairs():
            average.assign(decay * average + (1.0 - decay) * tf.cast(weight, tf.float32))

    def copy_to_models(self) -> None:
        """Give the models the averaged weights (host side, between executions)."""
        for average, weight in self._pairs():
            weight.assign(tf.cast(average, weight.dtype))

    @contextlib.contextmanager
    def swapped(self):
        """The models hold the averages inside the block, their own weights again after."""
        saved = [tf.identity(w) for _, w in self._pairs()]
        self.copy_to_models()
        try:
            yield
        finally:
            for (_, weight), value in zip(self._pairs(), saved):
                weight.assign(value)
