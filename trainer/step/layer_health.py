"""Per-layer training health, computed inside the compiled step on request.

``LayerHealth`` groups a model's trainable variables by their Keras layer (the path
without its last part: ``mlp/dense_0/kernel`` belongs to ``mlp/dense_0``) and, on the
sampled step of an execution whose ``requested`` flag the host set, computes for each
layer the norm of its gradient, the norm of its weights before the update, the norm of
the update actually applied over that weight norm, the fraction of gradient entries that
are not finite, and, for layers with a ReLU-like output, the fraction of units that
output zero for every example of a fixed probe batch. The flag is a variable read in the
graph: one trace serves executions with and without health, and an execution without it
pays for one ``tf.cond`` that takes its empty branch and a read of the weights.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from trainer.distribute.replicas import flat, in_replicas, sum_over_replicas

log = logging.getLogger(__name__)

#: Log keys are ``health/<layer>/<stat>``.
PREFIX = "health/"
#: The statistics of every layer, then the one of ReLU-like layers.
STATS = ("grad_norm", "weight_norm", "update_ratio", "nonfinite_fraction")
DEAD = "dead_fraction"
#: Activations whose zero output means a unit is off (a dead unit outputs zero always).
RELU_LIKE = ("relu", "relu6")


def layer_of(path: str) -> str:
    """The layer part of a variable's Keras path (``mlp/dense_0/kernel`` -> ``mlp/dense_0``)."""
    return path.rsplit("/", 1)[0] if "/" in path else path


def key(layer: str, stat: str) -> str:
    """The log key of one statistic of one layer."""
    return f"{PREFIX}{layer}/{stat}"


def relu_layers(model) -> list:
    """The layers of ``model`` (nested ones included) whose output is ReLU-like: a
    ``ReLU`` layer, or a layer whose ``activation`` is ``relu`` or ``relu6``."""
    import keras

    found = []
    for layer in _walk(model):
        # Dense, Conv and Activation layers name their activation function.
        name = getattr(getattr(layer, "activation", None), "__name__", None)
        relu = isinstance(layer, keras.layers.ReLU) and not layer.negative_slope
        if relu or name in RELU_LIKE:
            found.append(layer)
    return found


def _walk(model):
    for layer in getattr(model, "layers", []):
        yield layer
        if hasattr(layer, "layers"):
            yield from _walk(layer)


def _layer_path(layer) -> str:
    """The path a layer's variables start with, or its name for a layer without any."""
    variables = getattr(layer, "variables", [])
    return layer_of(variables[0].path) if variables else layer.name


class LayerHealth:
    """The per-layer health of one model, computed in the graph when requested.

    Create it outside any ``tf.function`` (in the strategy's scope under one: the flag
    is a variable every replica reads).

    Args:
        model: the Keras model whose trainable variables are watched.
        probe_x: the inputs of a fixed batch, for the dead-unit fractions; None leaves
            them out.
    """

    def __init__(self, model, *, probe_x=None):
        self.model = model
        #: Whether the coming execution's sampled step computes health (set on the host
        #: with ``request``; the graph reads it).
        self.flag = tf.Variable(False, trainable=False, name="health_requested",
                                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.requested = False
        self.probe_x = probe_x
        self._features = None
        self.dead_layers: list[str] = []
        layers = relu_layers(model) if probe_x is not None else []
        if layers:
            import keras

            try:  # a functional or Sequential model: its layers' outputs are graph nodes
                self._features = keras.Model(model.inputs, [layer.output for layer in layers])
                self.dead_layers = [_layer_path(layer) for layer in layers]
            except (AttributeError, ValueError, TypeError) as e:
                log.info("health: no dead-unit fractions for %s (%s: its layers' outputs are "
                         "not reachable from its inputs)", model.name, type(e).__name__)

    def request(self, on: bool) -> None:
        """Host side, between executions: whether the next one computes health."""
        on = bool(on)
        if on != self.requested:  # an assign only when it changes
            self.flag.assign(on)
            self.requested = on

    def layers(self) -> list[str]:
        """The layers reported, in order: those of the trainable variables, then the
        ReLU-like layers without variables of their own."""
        names = list(dict.fromkeys(layer_of(v.path) for v in self.model.trainable_variables))
        return names + [n for n in self.dead_layers if n not in names]

    def keys(self) -> list[str]:
        """Every log key ``logs`` may return, for dashboards laid out before training."""
        out = [key(layer, s) for layer in self.layers() for s in STATS]
        return out + [key(layer, DEAD) for layer in self.dead_layers]

    def weights(self, variables) -> list:
        """The values of ``variables`` now: call before the update (its ``before``)."""
        # A read, not a copy: TensorFlow copies the buffer only if the update writes it while
        # this value is still needed.
        return [tf.convert_to_tensor(v) for v in variables]

    def logs(self, grads, variables, before, *, scale=None) -> dict:
        """The health logs of the update that just ran.

        ``grads`` are this replica's gradients of ``variables`` (None for a variable the
        loss does not reach), scaled as ``Step.gradients`` returns them; ``scale`` (the
        loss scale, or None) is divided out. Under a strategy they are summed over the
        replicas (one all-reduce, outside the branch) so that the norms are the
        one-device gradient's. ``before`` is ``weights(variables)`` taken before the
        update. When the flag is off every value is 0.
        """
        pairs = [(g, v, b) for g, v, b in zip(grads, variables, before) if g is not None]
        if not pairs:
            return {}

        def flat_grads():
            grads = flat([g for g, _, _ in pairs])
            return grads if scale is None else grads / tf.cast(scale, tf.float32)

        # The replicas' sum outside the branch: every replica must join the all-reduce.
        summed = sum_over_replicas(flat_grads()) if in_replicas() else None
        after = [tf.convert_to_tensor(v) for _, v, _ in pairs]
        layers = list(dict.fromkeys(layer_of(v.path) for _, v, _ in pairs))
        index = [layers.index(layer_of(v.path)) for _, v, _ in pairs]
        sizes = [v.shape.num_elements() for _, v, _ in pairs]
        entries = np.bincount(index, weights=sizes, minlength=len(layers)).astype("float32")
        names = [key(layer, s) for layer in layers for s in STATS]
        names += [key(layer, DEAD) for layer in self.dead_layers]

        def compute():
            # Whole-model vectors and one segment sum per statistic: a handful of ops
            # whatever the number of variables (each op costs ~10-50 us on a CPU).
            grads = flat_grads() if summed is None else summed
            w0 = flat([b for _, _, b in pairs])
            ids = tf.repeat(tf.constant(index, tf.int32), sizes)
            finite = tf.math.is_finite(grads)
            # A non-finite entry would make its layer's norm NaN: the norm is of the finite
            # entries, and the fraction says how many were not.
            per_layer = tf.math.unsorted_segment_sum(tf.stack([
                tf.square(tf.where(finite, grads, 0.0)), tf.square(w0),
                tf.square(flat(after) - w0), tf.cast(tf.logical_not(finite), tf.float32)],
                axis=1), ids, len(layers))
            grad, weight, delta = tf.unstack(tf.sqrt(per_layer[:, :3]), axis=1)
            values = tf.stack([grad, weight, tf.math.divide_no_nan(delta, weight),
                               per_layer[:, 3] / entries], axis=1)
            return tf.concat([tf.reshape(values, [-1]), *self._dead_fractions()], 0)

        vector = tf.cond(self.flag, compute, lambda: tf.zeros([len(names)], tf.float32))
        return dict(zip(names, tf.unstack(vector, num=len(names))))

    def _dead_fractions(self) -> list:
        """``[fractions]`` (one vector, a value per ReLU-like layer), or ``[]``."""
        if self._features is None:
            return []
        outputs = self._features(self.probe_x, training=False)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        fractions = []
        for out in outputs:
            out = tf.cast(out, tf.float32)
            # A unit (the last axis: a Dense unit, a convolution's channel) is dead when
            # it outputs zero for every example and every position.
            alive = tf.reduce_any(tf.reshape(out, [-1, out.shape[-1]]) > 0.0, axis=0)
            fractions.append(1.0 - tf.reduce_mean(tf.cast(alive, tf.float32)))
        return [tf.stack(fractions)]
