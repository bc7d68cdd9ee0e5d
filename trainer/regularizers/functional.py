"""Functional cores of the regularizers: plain functions of tensors, models and tapes.

Every function here returns a scalar tensor, runs eagerly, under ``tf.function`` and
under XLA, and is differentiable with respect to the model's variables when called
inside a recording tape (that is how a penalty reaches the update: the outer tape
records the inner tapes' gradient computations, so the update is a higher-order
gradient). Random draws are stateless: they are a pure function of a ``[2]`` int64
seed (see ``fold_seed``), so nothing retraces and a run is reproducible from its seed.
"""

from __future__ import annotations

import math
import zlib

import keras
import tensorflow as tf

from trainer.distribute.replicas import (
    global_batch_size,
    in_replicas,
    local_rows,
    share,
    sum_over_replicas,
)

_TWO_POW_M24 = 2.0**-24


# --- random draws -------------------------------------------------------------------------
def fold_seed(seed: int, salt: str | int, *counters) -> tf.Tensor:
    """A ``[2]`` int64 seed from a base seed, a salt and any number of step counters.

    ``salt`` (a regularizer's name, say) keeps the draws of two regularizers that
    share the run's seed apart; the counters (the global step, the critic update)
    give every step its own draws without any state to save or retrace on.
    """
    if isinstance(salt, str):
        salt = zlib.crc32(salt.encode())
    out = tf.constant([int(seed), int(salt)], tf.int64)
    for c in counters:
        out = tf.random.experimental.stateless_fold_in(out, tf.cast(c, tf.int64), alg="philox")
    return out


def _bits(shape, seed):
    # The raw Philox stream is identical eager, compiled and under XLA; the library's
    # float conversions are not (XLA converts differently), so floats are made here.
    return tf.random.stateless_uniform(shape, seed, minval=None, maxval=None,
                                       dtype=tf.uint32, alg="philox")


def uniform(shape, seed, dtype=tf.float32) -> tf.Tensor:
    """Uniform draws in [0, 1) with 24 random bits, the same eagerly and under XLA."""
    top = tf.bitwise.right_shift(_bits(shape, seed), 8)
    return tf.cast(tf.cast(top, tf.float32) * _TWO_POW_M24, dtype)


def normal(shape, seed, dtype=tf.float32) -> tf.Tensor:
    """Standard normal draws by the Box-Muller transform of two ``uniform`` draws."""
    seeds = tf.random.experimental.stateless_split(seed, 2, alg="philox")
    u1 = 1.0 - uniform(shape, seeds[0])  # in (0, 1]: the log is finite
    u2 = uniform(shape, seeds[1])
    z = tf.sqrt(-2.0 * tf.math.log(u1)) * tf.cos(2.0 * math.pi * u2)
    return tf.cast(z, dtype)


def rademacher(shape, seed, dtype=tf.float32) -> tf.Tensor:
    """Independent signs, +1 or -1 with equal probability."""
    top = tf.bitwise.right_shift(_bits(shape, seed), 31)
    return tf.cast(2 * tf.cast(top, tf.int32) - 1, dtype)


# --- norms ----------------------------------------------------------------------------
def per_example_squared_norm(g) -> tf.Tensor:
    """Squared Euclidean norm of each example's slice (every axis but the first)."""
    g = tf.reshape(g, [tf.shape(g)[0], -1])
    return tf.reduce_sum(tf.square(g), axis=1)


def safe_sqrt(x) -> tf.Tensor:
    """``sqrt(x)`` whose gradient is 0 rather than NaN where ``x == 0``.

    The derivative of sqrt is infinite at 0 and times a zero upstream gradient
    gives NaN; the double ``tf.where`` keeps 0 out of the differentiated branch.
    """
    positive = x > 0
    root = tf.sqrt(tf.where(positive, x, tf.ones_like(x)))
    return tf.where(positive, root, tf.zeros_like(x))


def _mean(x):
    return tf.reduce_mean(tf.cast(x, tf.float32))


def _batch(x):
    return tf.cast(tf.shape(x)[0], tf.float32)


def _watchable(sources) -> list:
    # A tape watches tf.Variables and tensors; a Keras 3 variable wraps its tf.Variable.
    return [s.value if isinstance(s, keras.Variable) else s for s in sources]


def _zeros_for_none(grads, sources):
    return [tf.zeros_like(s) if g is None else g for g, s in zip(grads, sources)]


# --- supervised penalties -------------------------------------------------------------
def input_gradient_penalty(loss_gradient, x=None) -> tf.Tensor:
    """Double backpropagation: ``mean_i ||d loss_i / d x_i||^2``.

    ``loss_gradient`` is ``d loss / d x`` of the batch-mean loss, which is each
    example's own gradient divided by the batch size; it is scaled back here so
    the penalty does not change with the batch size.
    """
    scale = _batch(loss_gradient)
    return _mean(per_example_squared_norm(loss_gradient * scale))


def per_example(draw, shape, seed, *args):
    """``draw(shape, seed, *args)`` for a batch: drawn for the global batch and sliced to
    this replica's rows (``trainer.distribute.strategies.local_rows``), so an example gets the draw
    one device would give it. One device: ``draw(shape, seed, *args)``."""
    rows = tf.reshape(global_batch_size(shape[0]), [1])
    return local_rows(draw(tf.concat([rows, shape[1:]], 0), seed, *args))


def jacobian_norm(tape, outputs, inputs, *, seed, n_projections: int = 1) -> tf.Tensor:
    """Hoffman et al. (2019): ``mean_i ||J_i||_F^2`` by random projections.

    ``J_i = d outputs_i / d inputs_i``. For ``v`` uniform on the unit sphere of the
    ``C`` output dimensions, ``C * ||v^T J||^2`` is an unbiased estimate of
    ``||J||_F^2``; each projection costs one backward pass on ``tape`` (which
    recorded ``outputs`` from ``inputs``, and must be persistent for more than one).
    """
    flat = tf.reshape(outputs, [tf.shape(outputs)[0], -1])
    c = tf.cast(tf.shape(flat)[1], tf.float32)
    total = tf.constant(0.0)
    for k in range(n_projections):
        v = per_example(normal, tf.shape(flat),
                        tf.random.experimental.stateless_fold_in(seed, k, "philox"))
        v = v / safe_sqrt(tf.reduce_sum(tf.square(v), axis=1, keepdims=True))
        v = tf.reshape(tf.cast(v, outputs.dtype), tf.shape(outputs))
        vjp = tape.gradient(outputs, inputs, output_gradients=v)
        total += _mean(per_example_squared_norm(vjp))
    return c * total / n_projections


def hessian_trace(loss_fn, sources, *, seed, n_probes: int = 1) -> tf.Tensor:
    """Hutchinson's estimator of ``tr(d^2 loss / d sources^2)`` with Rademacher probes.

    ``loss_fn()`` recomputes the loss from ``sources`` (tensors or variables) under
    two nested tapes: the inner one gives ``g = d loss / d sources``, the outer one
    ``H v = d (g . v) / d sources`` for each probe ``v``; ``v . H v`` averaged over
    the probes is unbiased, and exact for a diagonal Hessian.
    """
    sources = _watchable(sources)
    with tf.GradientTape(persistent=n_probes > 1, watch_accessed_variables=False) as outer:
        outer.watch(sources)
        with tf.GradientTape(watch_accessed_variables=False) as inner:
            inner.watch(sources)
            loss = loss_fn()
        grads = _zeros_for_none(inner.gradient(loss, sources), sources)
        probes, gvs = [], []
        for k in range(n_probes):
            probe_seed = tf.random.experimental.stateless_fold_in(seed, k, "philox")
            seeds = tf.random.experimental.stateless_split(probe_seed, len(sources), "philox")
            # Probes of an input batch are per example; of parameters, one for all.
            v = [rademacher(tf.shape(s), seeds[j], s.dtype) if isinstance(s, tf.Variable)
                 else per_example(rademacher, tf.shape(s), seeds[j], s.dtype)
                 for j, s in enumerate(sources)]
            probes.append(v)
            gvs.append(tf.add_n([tf.reduce_sum(g * vj) for g, vj in zip(grads, v)]))
    total = tf.constant(0.0)
    for v, gv in zip(probes, gvs):
        hv = _zeros_for_none(outer.gradient(gv, sources), sources)
        total += tf.cast(tf.add_n([tf.reduce_sum(vj * h) for vj, h in zip(v, hv)]), tf.float32)
    del outer
    return total / n_probes


def parameter_gradient_norm(loss_fn, variables) -> tf.Tensor:
    """``||d loss / d theta||^2`` over ``variables``, recomputing the loss on a nested tape."""
    variables = _watchable(variables)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(variables)
        loss = loss_fn()
    grads = [tf.cast(g, tf.float32) for g in tape.gradient(loss, variables) if g is not None]
    if not in_replicas():
        return tf.add_n([tf.reduce_sum(tf.square(g)) for g in grads])
    # Under a strategy the penalty is of the global batch's gradient G = sum_r share_r g_r,
    # not of this replica's g_r. With G held fixed, 2 G.g_r - |G|^2 has share-weighted sum
    # |G|^2 over the replicas and gradient 2 H_r G, whose share-weighted sum is the gradient
    # of |G|^2: the framework's weighting then gives the one-device penalty and update.
    total = sum_over_replicas([tf.stop_gradient(g) * share() for g in grads])
    return tf.add_n([2.0 * tf.reduce_sum(t * g) - tf.reduce_sum(tf.square(t))
                     for t, g in zip(total, grads)])


# --- critic penalties -----------------------------------------------------------------
def critic_input_gradient(critic, x) -> tf.Tensor:
    """``d critic(x_i) / d x_i`` for every example, from one backward pass.

    Summing the scores first is exact because a critic scores examples
    independently (no batch normalization in a critic, as WGAN-GP requires).
    """
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(x)
        total = tf.reduce_sum(critic(x, training=True))
    return tape.gradient(total, x)


def gradient_penalty(critic, real, fake, *, seed, target: float = 1.0) -> tf.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): ``mean (||d critic / d x_hat|| - target)^2``.

    ``x_hat = real + alpha (fake - real)`` with one ``alpha ~ U[0, 1)`` per example.
    The norm uses ``safe_sqrt``, so a critic with zero input gradient gives a
    finite (zero) gradient instead of NaN.
    """
    real = tf.convert_to_tensor(real)
    fake = tf.cast(fake, real.dtype)
    # Drawn for the global batch and sliced: under a strategy each replica's examples get
    # the draws one device would give them.
    shape = tf.concat([tf.shape(real)[:1], tf.ones([tf.rank(real) - 1], tf.int32)], 0)
    alpha = per_example(uniform, shape, seed, real.dtype)
    x_hat = real + alpha * (fake - real)
    norm = safe_sqrt(per_example_squared_norm(critic_input_gradient(critic, x_hat)))
    return _mean(tf.square(norm - target))


def r1_penalty(critic, real) -> tf.Tensor:
    """R1 (Mescheder et al. 2018): ``mean ||d critic / d x||^2`` on real samples."""
    return _mean(per_example_squared_norm(critic_input_gradient(critic, real)))


def r2_penalty(critic, fake) -> tf.Tensor:
    """R2: ``mean ||d critic / d x||^2`` on generated samples."""
    return _mean(per_example_squared_norm(critic_input_gradient(critic, fake)))
