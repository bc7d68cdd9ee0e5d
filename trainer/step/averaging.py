"""Averages of the models' weights: an exponential moving average updated inside the compiled
step (``trainer.ema``), and stochastic weight averaging (``trainer.swa``)."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import keras
import tensorflow as tf

from trainer.common.errors import UserError

#: Which weights a run ships (``model.keras``, the best checkpoint, evaluate and predict).
SHIPPED = ("averaged", "trained")


def _read(cls, node, where: str):
    """``cls`` (a settings dataclass) from a config node (a mapping or None), keys checked."""
    node = dict(node or {})
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(node) - set(names))
    if unknown:
        raise UserError(f"{where}.{unknown[0]} is not a setting; use {', '.join(names)}")
    settings = cls(**node)
    if settings.weights not in SHIPPED:
        raise UserError(f"{where}.weights={settings.weights!r} must be one of "
                        f"{', '.join(SHIPPED)}")
    return settings


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
        settings = _read(cls, node, "trainer.ema")
        if settings.decay is not None and not 0.0 <= settings.decay < 1.0:
            raise UserError(f"trainer.ema.decay={settings.decay} must be in [0, 1), e.g. "
                            "trainer.ema.decay=0.999 (or null for no average)")
        return settings

    @property
    def on(self) -> bool:
        return self.decay is not None


@dataclass(frozen=True)
class SwaSettings:
    """``trainer.swa``: stochastic weight averaging (Izmailov et al. 2018), or none.

    Attributes:
        start_epoch: the epochs trained before averaging starts (None: no averaging).
        lr: the learning rate from then on (None: the run's rate or schedule goes on).
        lr_min: with ``lr``, a cyclic rate: from ``lr`` down to ``lr_min`` over each cycle.
        cycle_epochs: the epochs of one cycle; the average takes the weights at the end
            of each (with a constant rate, every ``cycle_epochs`` epochs).
        batch_norm: recompute batch-norm statistics for the averaged weights, over one
            pass of the training data, before they are evaluated or shipped.
        weights: which weights the run ships, as for ``EmaSettings``.
    """

    start_epoch: int | None = None
    lr: float | None = None
    lr_min: float | None = None
    cycle_epochs: int = 1
    batch_norm: bool = True
    weights: str = "averaged"

    @classmethod
    def read(cls, node) -> SwaSettings:
        settings = _read(cls, node, "trainer.swa")
        if settings.start_epoch is not None and settings.start_epoch < 0:
            raise UserError(f"trainer.swa.start_epoch={settings.start_epoch} must be >= 0")
        if settings.cycle_epochs < 1:
            raise UserError(f"trainer.swa.cycle_epochs={settings.cycle_epochs} must be >= 1")
        for key in ("lr", "lr_min"):
            value = getattr(settings, key)
            if value is not None and not value >= 0:
                raise UserError(f"trainer.swa.{key}={value} must be a number >= 0")
        if settings.lr_min is not None and settings.lr is None:
            raise UserError("trainer.swa.lr_min needs trainer.swa.lr (the cycle's top rate)")
        return settings

    @property
    def on(self) -> bool:
        return self.start_epoch is not None


class Average(tf.Module):
    """Float32 averages of every floating-point weight of the models (trainable or not:
    batch-norm statistics too), starting from the weights as they are when it is made,
    and the means to evaluate or ship them. Part of the training state (``averages/...``).

    ``prefix`` names the evaluation of the averaged weights (``val_ema``, ``val_swa``);
    ``in_step`` says whether ``update(global_step)`` runs inside the compiled step.
    """

    prefix = ""
    in_step = False

    def __init__(self, models: dict, name: str):
        super().__init__(name=name)
        # Not dropout's random state (a seed, in float32 on some backends).
        weights = {n: [v for v in m.weights if tf.as_dtype(v.dtype).is_floating
                       and v.name != "seed_generator_state"] for n, m in models.items()}
        # A closure, not an attribute: the checkpoint holds the weights under models/ already.
        self._weights = lambda: weights
        self._models = lambda: models
        #: The averages by model name, aligned with the model's float weights.
        self.averages = {n: [tf.Variable(tf.cast(v, tf.float32), trainable=False,
                                         name="average") for v in ws]
                         for n, ws in weights.items()}

    def _pairs(self):
        for name, ws in self._weights().items():
            yield from zip(self.averages[name], ws)

    def copy_to_models(self) -> None:
        """Give the models the averaged weights (host side, between executions)."""
        for average, weight in self._pairs():
            weight.assign(tf.cast(average, weight.dtype))

    def ready(self, data) -> None:
        """After ``copy_to_models``: what the averaged weights need before use (nothing)."""

    @contextlib.contextmanager
    def swapped(self, data=None):
        """The models hold the averages inside the block (made ``ready`` on ``data``),
        their own weights again, exactly, after."""
        saved = [tf.identity(w) for _, w in self._pairs()]
        self.copy_to_models()
        self.ready(data)
        try:
            yield
        finally:
            for (_, weight), value in zip(self._pairs(), saved):
                weight.assign(value)


class WeightAverage(Average):
    """``average = decay * average + (1 - decay) * weights`` after every update.

    ``update`` runs once per update inside the compiled execution: after the optimizer's
    step, in the cross-replica context under a strategy (the weights are the same on every
    replica), and after the last micro-batch under gradient accumulation.

    Args:
        models: the step's models by name.
        decay: the average's decay, in [0, 1).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` at the ``n``-th update (counted by
            the global step): early averages forget the random start quickly.
    """

    prefix = "val_ema"
    in_step = True

    def __init__(self, models: dict, *, decay: float, warmup: bool = False):
        super().__init__(models, name="weight_average")
        self.decay, self.warmup = float(decay), bool(warmup)

    def update(self, global_step) -> None:
        """Move the averages towards the weights (``global_step``: updates before this one)."""
        decay = tf.constant(self.decay, tf.float32)
        if self.warmup:
            n = tf.cast(global_step, tf.float32)
            decay = tf.minimum(decay, (1.0 + n) / (10.0 + n))
        for average, weight in self._pairs():
            average.assign(decay * average + (1.0 - decay) * tf.cast(weight, tf.float32))


class StochasticWeightAverage(Average):
    """The equal-weight mean of the weights taken at the end of each cycle (SWA).

    ``add()`` runs on the host at a cycle's end; ``count`` (part of the training state)
    is the number of weights averaged so far. Before the first, the average is the
    weights it was made from. ``ready`` recomputes batch-norm statistics for the average
    (``batch_norm``): statistics gathered for other weights do not fit it.
    """

    prefix = "val_swa"

    def __init__(self, models: dict, *, batch_norm: bool = True):
        super().__init__(models, name="stochastic_weight_average")
        self.batch_norm = bool(batch_norm)
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="count")

    def add(self) -> None:
        """Take the weights into the mean."""
        n = float(self.count.numpy())
        for average, weight in self._pairs():
            average.assign(average + (tf.cast(weight, tf.float32) - average) / (n + 1.0))
        self.count.assign_add(1)

    def ready(self, data) -> None:
        if self.batch_norm and data is not None:
            recompute_batch_norm(self._models().values(), data)


def recompute_batch_norm(models, data) -> int:
    """Set every ``BatchNormalization`` layer's moving statistics to the mean of its batch
    statistics over one pass of ``data``'s training set (a source of its own: the run's
    data position is left alone); returns the batches used (0 without such layers)."""
    layers = [layer for m in models for layer in m._flatten_layers()
              if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    # Forward passes in training mode draw dropout masks: the random state goes back after,
    # so that looking at the average leaves training as it would have been.
    seeds = [v for m in models for v in m.variables if v.name == "seed_generator_state"]
    saved = [tf.identity(v) for v in seeds]
    source = data.train_source()
    source.start_epoch(0)
    steps = data.steps_per_epoch("train")
    try:
        for k in range(steps):
            for layer in layers:
                # moving = m * moving + (1 - m) * batch: with m = k / (k + 1), the running
                # mean of the batches' statistics (the first batch replaces the old ones).
                layer.momentum = k / (k + 1.0)
            batch = source.next_any()
            for m in models:
                m(batch[0], training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        for v, value in zip(seeds, saved):
            v.assign(value)
    return steps


@keras.saving.register_keras_serializable(package="trainer")
class SwaLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """The run's rate (a number or a schedule) until ``start_step``, then SWA's: ``lr``,
    or with ``lr_min`` a cycle of ``cycle_steps`` updates falling linearly from ``lr`` to
    ``lr_min`` (Izmailov et al. 2018, eq. 2), ending each cycle at ``lr_min``."""

    def __init__(self, before, *, start_step: int, lr: float, lr_min: float | None = None,
                 cycle_steps: int = 1):
        self.before, self.start_step, self.lr = before, int(start_step), float(lr)
        self.lr_min = None if lr_min is None else float(lr_min)
        self.cycle_steps = max(1, int(cycle_steps))

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        before = self.before(step) if callable(self.before) else self.before
        after = tf.constant(self.lr, tf.float32)
        if self.lr_min is not None:
            # t goes 1/c, 2/c, ..., 1 over each cycle's updates.
            i = step - self.start_step
            t = (tf.math.floormod(i, self.cycle_steps) + 1.0) / self.cycle_steps
            after = (1.0 - t) * self.lr + t * self.lr_min
        return tf.where(step < self.start_step, tf.cast(before, tf.float32), after)

    def get_config(self):
        before = self.before
        if isinstance(before, keras.optimizers.schedules.LearningRateSchedule):
            before = keras.saving.serialize_keras_object(before)
        return {"before": before, "start_step": self.start_step, "lr": self.lr,
                "lr_min": self.lr_min, "cycle_steps": self.cycle_steps}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config["before"], dict):
            config["before"] = keras.saving.deserialize_keras_object(config["before"])
        return cls(config.pop("before"), **config)
