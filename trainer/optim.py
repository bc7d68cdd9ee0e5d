"""GroupedOptimizer: per-group learning rates, and optimizer state that follows unfreezing."""

from __future__ import annotations

import logging

import keras
import tensorflow as tf

from trainer.errors import UserError
from trainer.freeze import matches

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


def _clone(template, lr_scale: float = 1.0):
    config = template.get_config()
    if lr_scale != 1.0:
        lr = template._learning_rate
        if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule):
            config["learning_rate"] = _Scaled(lr, lr_scale)
        else:
            config["learning_rate"] = float(config["learning_rate"]) * lr_scale
    return template.__class__.from_config(config)


class GroupedOptimizer(tf.Module):
    """A Keras optimizer split into parameter groups, each with a learning-rate multiplier.

    ``groups`` is a list of ``{"patterns": [...], "lr_scale": s}``; a variable goes
    to the first group with a matching pattern (see ``trainer.freeze.matches``),
    else to the base group, which is ``optimizer`` itself. Each group is a clone of
    ``optimizer`` (same class and config) with its learning rate times ``lr_scale``.

    ``build(variables)`` runs outside ``tf.function`` whenever the trainable set
    changes. A group whose variables changed gets a fresh optimizer built for its
    new variables, with the old one's slots (moments, iteration count) copied over
    for the variables it already had, so unfreezing never creates variables inside
    a traced step, and frozen variables never get slots.
    """

    def __init__(self, optimizer, *, groups=()):
        super().__init__(name="grouped_optimizer")
        if isinstance(optimizer, GroupedOptimizer):
            raise TypeError("optimizer is already a GroupedOptimizer")
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

    def apply_gradients(self, grads_and_vars) -> None:
        """Apply ``(gradient, variable)`` pairs, each through its group's optimizer."""
        split: dict[str, list] = {}
        for g, v in grads_and_vars:
            split.setdefault(self._assignment[id(v)], []).append((g, v))
        for i, pairs in split.items():
            self.optimizers[i].apply_gradients(pairs)

    @property
    def learning_rate(self):
        """The base learning rate (the template's, schedules evaluated)."""
        return self._base().learning_rate

    @property
    def iterations(self):
        return self._base().iterations

    def _base(self):
        return self.optimizers.get("base") or self._first()

    def slot_paths(self) -> set[str]:
        """Paths of every optimizer variable (for checks that frozen variables have none)."""
        return {v.path for opt in self.optimizers.values() for v in opt.variables}


def _copy_state(old, new) -> None:
    """Copy optimizer variables that exist in both (Keras names slots after the variable)."""
    by_name = {v.path.split("/", 1)[-1]: v for v in old.variables}
    for v in new.variables:
        src = by_name.get(v.path.split("/", 1)[-1])
        if src is not None and tuple(src.shape) == tuple(v.shape):
            v.assign(src)
