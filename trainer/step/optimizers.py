"""GroupedOptimizer: per-group learning rates, and optimizer state that follows unfreezing."""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

from trainer.common.errors import UserError
from trainer.distribute.replicas import any_replica, step_variable
from trainer.step.clipping import GradientClipping
from trainer.step.freezing import matches

log = logging.getLogger(__name__)


class _Scaled(keras.optimizers.schedules.LearningRateSchedule):
    """A learning-rate schedule multiplied by a constant."""

    def __init__(self, schedule, scale):
        self.schedule, self.scale = schedule, scale

    def __call__(self, step):
        return self.schedule(step) * self.scale

    def get_config(self):
        return {"schedule": keras.saving.serialize_keras_object(self.schedule),
                "scale": self.scale}


class _RateScaled(_Scaled):
    """A schedule times a variable (rollback's cumulative scale): installed on the optimizers
    in use, never serialized (clones are made from the schedule inside)."""


def _clone(template, lr_scale: float = 1.0):
    lr = template._learning_rate
    if isinstance(lr, _RateScaled):  # the template is the base group's optimizer in use
        template._learning_rate = lr.schedule
    try:
        config = template.get_config()
    finally:
        template._learning_rate = lr
    if lr_scale != 1.0:
        lr = template._learning_rate
        if isinstance(lr, _RateScaled):
            lr = lr.schedule
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
            config["learning_rate"] = _Scaled(lr, lr_scale)
        else:
            config["learning_rate"] = float(config["learning_rate"]) * lr_scale
    return template.__class__.from_config(config)


class LossScale(tf.Module):
    """Dynamic loss scaling for ``precision=mixed_float16``, shared by a step's optimizers.

    The step's gradients come out multiplied by ``value`` (``Step.gradient_scale``:
    the backward pass starts from it, so small float16 gradients do not underflow);
    each optimizer divides them back before its update. A step whose gradients are
    not finite is skipped (no variable, slot or iteration changes), counted in
    ``overflows``, and halves the scale; ``growth_interval`` good steps in a row
    double it. What Keras' ``LossScaleOptimizer`` does, for several optimizers and
    parameter groups at once, with the same defaults.

    Args:
        initial_scale: the starting scale (2**15).
        growth_interval: finite updates in a row before the scale doubles.
    """

    def __init__(self, *, initial_scale: float = 2.0**15, growth_interval: int = 2000):
        super().__init__(name="loss_scale")
        self.growth_interval = int(growth_interval)
        self.value = step_variable(float(initial_scale), name="loss_scale")
        self.good_steps = step_variable(0, dtype=tf.int64, name="loss_scale_good_steps")
        self.overflows = step_variable(0, dtype=tf.int64, name="loss_scale_overflows")
        # The scale the last gradients were multiplied by (``value`` may have moved on since,
        # in the same update): what a gradient norm logged after the update divides out.
        # Assigned by every update before any norm of its gradients is read: not saved.
        applied = step_variable(float(initial_scale), name="loss_scale_applied")
        self.applied = lambda: applied

    def state(self) -> dict:
        return {"value": self.value, "good_steps": self.good_steps, "overflows": self.overflows}

    def state_logs(self) -> dict:
        """``precision/loss_scale`` and ``precision/overflows`` (skipped updates so far)."""
        return {"precision/loss_scale": self.value, "precision/overflows": self.overflows}

    def unscale(self, grads) -> tuple[list, tf.Tensor]:
        """``(grads / scale, finite)``; ``finite`` agreed across replicas."""
        self.applied().assign(self.value)
        grads = [None if g is None else g / tf.cast(self.value, g.dtype) for g in grads]
        flags = [tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None]
        finite = tf.reduce_all(flags) if flags else tf.constant(True)
        return grads, tf.logical_not(any_replica(tf.logical_not(finite)))

    def update(self, finite) -> None:
        """After an update: count a good step (doubling the scale every
        ``growth_interval``), or an overflow (halving it)."""
        good = tf.where(finite, self.good_steps + 1, tf.zeros_like(self.good_steps))
        grow = good >= self.growth_interval
        factor = tf.where(finite, tf.where(grow, 2.0, 1.0), 0.5)
        self.value.assign(self.value * factor)
        self.good_steps.assign(tf.where(grow, tf.zeros_like(good), good))
        self.overflows.assign_add(tf.cast(tf.logical_not(finite), tf.int64))


class GroupedOptimizer(tf.Module):
    """A Keras optimizer split into parameter groups, each with a learning-rate multiplier.

    ``groups`` is a list of ``{"patterns": [...], "lr_scale": s}``; a variable goes
    to the first group with a matching pattern (see ``trainer.step.freezing.matches``),
    else to the base group, which is ``optimizer`` itself. Each group is a clone of
    ``optimizer`` (same class and config) with its learning rate times ``lr_scale``.

    ``build(variables)`` runs outside ``tf.function`` whenever the trainable set
    changes. A group whose variables changed gets a fresh optimizer built for its
    new variables, with the old one's slots (moments, iteration count) copied over
    for the variables it already had, so unfreezing never creates variables inside
    a traced step, and frozen variables never get slots.

    Clipping (``clipnorm``, ``global_clipnorm`` or ``clipvalue`` of ``optimizer``) is done
    here, not by the Keras optimizers: on the update's gradient, summed over replicas and
    micro-batches, as one device clips it (``trainer.step.clipping``); ``global_clipnorm``
    takes the norm over every group's gradients together.
    """

    def __init__(self, optimizer, *, groups=()):
        super().__init__(name="grouped_optimizer")
        if isinstance(optimizer, GroupedOptimizer):
            raise TypeError("optimizer is already a GroupedOptimizer")
        #: The ``GradientClipping`` taken from ``optimizer`` (which then clips nothing), or None.
        self.clipping = GradientClipping.take_from(optimizer)
        # Closures, not attributes: only the optimizers in use belong in checkpoints.
        self._first = lambda: optimizer
        self._clone = lambda scale: _clone(optimizer, scale)
        self.groups = []
        for i, g in enumerate(groups):
            g = dict(g)
            patterns, scale = list(g.pop("patterns", [])), float(g.pop("lr_scale", 1.0))
            if g or not patterns:
                raise UserError(
                    f"optimizer.groups[{i}] needs 'patterns' (a list) and optional 'lr_scale'; "
                    f"unexpected {sorted(g)}" if g else f"optimizer.groups[{i}] has no patterns"
                )
            self.groups.append((patterns, scale))
        # "group_<i>" or "base" -> the Keras optimizer of that group.
        self.optimizers = {}
        self._members = {}
        self._assignment = {}
        #: A ``LossScale`` shared with the step's other optimizers (mixed_float16), or None.
        self.loss_scale: LossScale | None = None
        #: Micro-batches per update (``trainer.accumulate_steps``): above 1, ``apply_gradients``
        #: adds to float32 accumulators and ``finish_accumulation`` applies them.
        self.accumulate_steps = 1
        # Zero between updates, so never checkpointed: held where tf.Module does not look.
        self._accumulation = _Accumulators()
        # A variable multiplying every scheduled rate (rollbacks lower it), or None; in a
        # closure: its value belongs to the trainer's progress, not to the optimizer's state.
        self._rate_scale = lambda: None

    def _group_of(self, variable) -> str:
        for i, (patterns, _) in enumerate(self.groups):
            if any(matches(variable.path, p) for p in patterns):
                return f"group_{i}"
        return "base"

    def build(self, variables) -> None:
        members: dict[str, list] = {}
        for v in variables:
            members.setdefault(self._group_of(v), []).append(v)
        for i, group_vars in members.items():
            key = [id(v) for v in group_vars]
            if self._members.get(i) == key:
                continue
            old = self.optimizers.get(i)
            if i == "base" and old is None:
                new = self._first()
            else:
                scale = 1.0 if i == "base" else self.groups[int(i.split("_")[1])][1]
                new = self._clone(scale)
            new.build(group_vars)
            if old is not None:
                _copy_state(old, new)
            self.optimizers[i] = new
            self._members[i] = key
        self._assignment = {id(v): i for i, vs in members.items() for v in vs}
        if self.accumulate_steps > 1:
            self._accumulation.build(variables)
        self._scale_schedules()

    def scale_schedules_by(self, variable) -> None:
        """Multiply every group's scheduled rate by ``variable`` from now on (before the step
        is traced: a compiled step keeps the rate it was traced with). A constant rate is
        scaled through ``learning_rate`` instead, since it is a variable of the state."""
        self._rate_scale = lambda: variable
        self._scale_schedules()

    def _scale_schedules(self) -> None:
        variable = self._rate_scale()
        if variable is None:
            return
        for opt in self.optimizers.values():
            rate = opt._learning_rate
            if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule) and not \
                    isinstance(rate, _RateScaled):
                opt._learning_rate = _RateScaled(rate, variable)

    def apply_gradients(self, grads_and_vars, *, skip=None) -> None:
        """Apply ``(gradient, variable)`` pairs, each through its group's optimizer.

        With a ``loss_scale`` the gradients are unscaled first, and an update with
        gradients that are not finite is skipped.

        ``skip`` (a bool tensor) discards the whole update when true: no variable,
        slot or iteration count changes. Under a strategy it must be the same on
        every replica (``trainer.distribute.strategies.any_replica``), and the update is guarded
        in the cross-replica context: a branch that all-reduces gradients cannot run
        inside a replica's ``tf.cond``.
        """
        pairs = list(grads_and_vars)
        if self.loss_scale is not None:
            grads, finite = self.loss_scale.unscale([g for g, _ in pairs])
            pairs = list(zip(grads, [v for _, v in pairs]))
            self.loss_scale.update(finite)
            overflow = tf.logical_not(finite)
            skip = overflow if skip is None else tf.logical_or(skip, overflow)
        if self.accumulate_steps > 1:
            self._accumulation.add(pairs, skip)
            return
        self._guarded(pairs, skip)

    def finish_accumulation(self) -> None:
        """Apply the micro-batches' summed gradients as one update (skipped if any
        micro-batch asked to skip), and zero the sums. A no-op without accumulation."""
        if self.accumulate_steps > 1:
            pairs, skip = self._accumulation.take()
            self._guarded(pairs, skip)
            self._accumulation.zero()

    def accumulated_gradients(self) -> list:
        """The micro-batches' summed gradients so far (before ``finish_accumulation``
        applies them); under a strategy, this replica's sums. Empty without accumulation."""
        return self._accumulation.gradients() if self.accumulate_steps > 1 else []

    def accumulated_pairs(self) -> list:
        """``(summed gradient, variable)`` pairs of ``accumulated_gradients``."""
        return self._accumulation.pairs() if self.accumulate_steps > 1 else []

    def _guarded(self, pairs, skip) -> None:
        if skip is None:
            self._apply(pairs)
        elif tf.executing_eagerly():
            if not bool(skip):
                self._apply(pairs)
        elif _needs_merge_call():
            def guarded(distribution, skip, pairs):
                skip = distribution.experimental_local_results(skip)[0]  # agreed already

                def update():
                    distribution.extended.call_for_each_replica(self._apply, args=(pairs,))
                    return tf.constant(True)

                tf.cond(skip, lambda: tf.constant(False), update)

            tf.distribute.get_replica_context().merge_call(guarded, args=(skip, pairs))
        else:
            def update():
                self._apply(pairs)
                return tf.constant(True)

            tf.cond(skip, lambda: tf.constant(False), update)

    def _apply(self, pairs) -> None:
        if self.clipping is not None:
            pairs = self.clipping.clip(pairs)
        split: dict[str, list] = {}
        for g, v in pairs:
            split.setdefault(self._assignment[id(v)], []).append((g, v))
        for i, group in split.items():
            self.optimizers[i].apply_gradients(group)

    @property
    def learning_rate(self):
        """The base learning rate (the template's, schedules evaluated)."""
        return self._base().learning_rate

    @learning_rate.setter
    def learning_rate(self, value) -> None:
        """Set the base rate; every parameter group follows at its ``lr_scale`` (what
        ``ReduceLROnPlateau`` does through ``model.optimizer.learning_rate``)."""
        value = float(value)
        base = self._base()
        if isinstance(base._learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            raise UserError("the learning rate follows a schedule and cannot be set; drop "
                            "the schedule or the callback that sets it")
        base.learning_rate = value
        for name, opt in self.optimizers.items():
            if name != "base":
                opt.learning_rate = value * self.groups[int(name.split("_")[1])][1]

    @property
    def schedule(self):
        """The base rate's ``keras.optimizers.schedules.LearningRateSchedule``, or None for a
        constant rate."""
        rate = self._base()._learning_rate
        if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
            return rate  # with a rollback's scale, the rate applied
        return None

    @property
    def iterations(self):
        return self._base().iterations

    def _base(self):
        return self.optimizers.get("base") or self._first()

    def slot_paths(self) -> set[str]:
        """Paths of every optimizer variable (for checks that frozen variables have none)."""
        return {v.path for opt in self.optimizers.values() for v in opt.variables}


class _Accumulators:
    """Float32 sums of a group's gradients over the micro-batches of one update.

    Under a strategy each replica sums its own (``ON_READ`` variables); the update
    all-reduces the sums once. ``skip`` remembers whether a micro-batch asked to skip.
    """

    def __init__(self):
        self.sums: dict[int, tuple[tf.Variable, tf.Variable]] = {}
        self.skip = None
        self.skips = False  # whether any traced add passed a skip condition
        # Variables that get gradients in the step (learnt while tracing; never reset while
        # tracing: the replicas of a strategy trace in threads of their own, at once).
        self.touched: dict[int, None] = {}

    def build(self, variables) -> None:
        """Sums for ``variables`` (outside any tf.function: they are variables)."""
        sums = {}
        for v in variables:
            old = self.sums.get(id(v))
            sums[id(v)] = old or (tf.Variable(
                tf.zeros(v.shape, tf.float32), trainable=False, name="grad_sum",
                synchronization=tf.VariableSynchronization.ON_READ,
                aggregation=tf.VariableAggregation.SUM), v)
        self.sums = sums
        self.touched = {}
        if self.skip is None:
            self.skip = step_variable(False, name="accumulation_skip")

    def add(self, pairs, skip) -> None:
        for g, v in pairs:
            self.sums[id(v)][0].assign_add(tf.cast(g, tf.float32))
            self.touched[id(v)] = None
        if skip is not None:
            self.skips = True
            self.skip.assign(tf.logical_or(self.skip, skip))

    def gradients(self) -> list:
        """The float32 sums of the variables that got gradients (a read, nothing else)."""
        return [self.sums[i][0].read_value() for i in self.touched]

    def pairs(self) -> list:
        """``gradients()`` with their variables."""
        return [(self.sums[i][0].read_value(), self.sums[i][1]) for i in self.touched]

    def take(self):
        # Only the variables that got gradients: one the loss never reached stays untouched,
        # as without accumulation (a zero gradient would still move Adam's moments).
        pairs = [(tf.cast(s.read_value(), v.dtype), v)
                 for s, v in (self.sums[i] for i in self.touched)]
        return pairs, (tf.identity(self.skip) if self.skips else None)

    def zero(self) -> None:
        for s, _ in self.sums.values():
            s.assign(tf.zeros_like(s))
        if self.skips:
            self.skip.assign(False)


def _needs_merge_call() -> bool:
    """Whether a guarded update must leave the replica context (``MirroredStrategy``):
    the optimizer all-reduces gradients with a ``merge_call``, which a replica's
    ``tf.cond`` branch cannot hold."""
    return (tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context() is False
            and not tf.__internal__.distribute.strategy_supports_no_merge_call())


def _copy_state(old, new) -> None:
    """Copy optimizer variables that exist in both (Keras names slots after the variable)."""
    by_name = {v.path.split("/", 1)[-1]: v for v in old.variables}
    for v in new.variables:
        src = by_name.get(v.path.split("/", 1)[-1])
        if src is not None and tuple(src.shape) == tuple(v.shape):
            v.assign(src)
