"""The Hessian of a loss: its top eigenvalue and its trace (sharpness). Pure TensorFlow.

Both are measured from Hessian-vector products (``hvp``) taken with nested
``tf.GradientTape``s, never forming the Hessian: the top eigenvalue by power
iteration, the trace by Hutchinson's estimator with Rademacher probes. Random
draws are stateless, from a ``[2]`` int seed, so a measurement is the same
eagerly and compiled.
"""

from __future__ import annotations

from dataclasses import dataclass

import tensorflow as tf


@dataclass(frozen=True)
class SharpnessOptions:
    """How a measurement is made.

    Attributes:
        iterations: the most power iterations (Hessian-vector products) for the top
            eigenvalue; twice that when the Hessian's largest-magnitude eigenvalue is
            negative (a second, shifted pass then finds the top one).
        tolerance: stop early once the eigenvalue estimate changes by at most this
            fraction of itself between two iterations; 0 always runs ``iterations``.
        trace_probes: Rademacher probes of the Hutchinson trace estimate; 0 skips it.
    """

    iterations: int = 20
    tolerance: float = 1e-3
    trace_probes: int = 10


def hvp(loss_fn, variables, vector):
    """The Hessian of ``loss_fn()`` for ``variables`` times ``vector`` (a list like them).

    Forward and backward on an inner tape, the gradient's dot product with
    ``vector`` differentiated on an outer one (a variable the loss does not reach
    has a zero row and column).
    """
    zero = tf.UnconnectedGradients.ZERO
    # Both tapes watch the variables the loss reads (a Keras variable cannot be watched by
    # hand): the inner one for the gradient, the outer one for the gradient's derivative.
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = tf.cast(loss_fn(), tf.float32)
        grads = inner.gradient(loss, variables, unconnected_gradients=zero)
        dot = tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32) * v)
                        for g, v in zip(grads, vector)])
    return [tf.cast(h, tf.float32)
            for h in outer.gradient(dot, variables, unconnected_gradients=zero)]


def _dot(a, b):
    return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(a, b)])


def _normalized(vector):
    norm = tf.sqrt(_dot(vector, vector))
    return [v / tf.maximum(norm, 1e-30) for v in vector]


def _random_vector(variables, seed, kind: str):
    """A stateless random vector shaped like ``variables``: standard normal, or Rademacher
    (+-1), each variable's part from its own seed derived from ``seed``."""
    out = []
    for i, v in enumerate(variables):
        s = tf.random.experimental.stateless_fold_in(seed, i)
        if kind == "normal":
            out.append(tf.random.stateless_normal(v.shape, s, dtype=tf.float32))
        else:
            bits = tf.random.stateless_uniform(v.shape, s, minval=0, maxval=2, dtype=tf.int32)
            out.append(tf.cast(2 * bits - 1, tf.float32))
    return out


def _power_iteration(product, start, iterations: int, tolerance: float, skip):
    """The largest-magnitude eigenvalue of the symmetric operator ``product`` (its Rayleigh
    quotient after at most ``iterations`` steps from ``start``); none run when ``skip``."""
    vector = _normalized(start)

    def cond(i, value, change, vector):
        return tf.logical_and(i < iterations, change > tolerance * tf.abs(value))

    def body(i, value, change, vector):
        hv = product(vector)
        new = _dot(vector, hv)  # the Rayleigh quotient: |vector| = 1
        return i + 1, new, tf.abs(new - value), _normalized(hv)

    start_change = tf.where(skip, tf.constant(-1.0), tf.constant(float("inf")))
    _, value, _, _ = tf.while_loop(
        cond, body, (tf.constant(0), tf.constant(0.0), start_change, vector))
    return value


def top_eigenvalue(loss_fn, variables, seed, options: SharpnessOptions = SharpnessOptions()):
    """The largest (most positive) eigenvalue of the Hessian of ``loss_fn()``.

    Power iteration finds the eigenvalue of largest magnitude, ``m``; when it is
    negative, a second pass on ``H - m I`` (whose largest-magnitude eigenvalue is
    ``top - m >= 0``) gives the top one. Starts from a standard normal vector drawn
    from ``seed``.
    """
    start = _random_vector(variables, seed, "normal")

    def product(vector):
        return hvp(loss_fn, variables, vector)

    largest = _power_iteration(product, start, options.iterations, options.tolerance,
                               skip=tf.constant(False))
    shift = tf.minimum(largest, 0.0)

    def shifted(vector):
        return [h - shift * v for h, v in zip(product(vector), vector)]

    top = _power_iteration(shifted, start, options.iterations, options.tolerance,
                           skip=largest >= 0.0)
    return tf.where(largest >= 0.0, largest, top + shift)


def hutchinson_trace(loss_fn, variables, seed, probes: int):
    """Hutchinson's estimate of the Hessian's trace: the mean of ``z . H z`` over
    ``probes`` Rademacher vectors ``z`` (unbiased; exact when the Hessian is diagonal).
    Returns ``(mean, standard_error)`` (the error is 0 with one probe)."""

    def body(i, total, squares):
        z = _random_vector(variables, tf.random.experimental.stateless_fold_in(seed, i),
                           "rademacher")
        sample = _dot(z, hvp(loss_fn, variables, z))
        return i + 1, total + sample, squares + sample * sample

    _, total, squares = tf.while_loop(lambda i, *_: i < probes, body,
                                      (tf.constant(0), tf.constant(0.0), tf.constant(0.0)))
    n = float(probes)
    mean = total / n
    variance = tf.maximum(squares / n - mean * mean, 0.0) * (n / max(n - 1.0, 1.0))
    return mean, tf.sqrt(variance / n)


def sharpness(loss_fn, variables, seed, options: SharpnessOptions = SharpnessOptions()) -> dict:
    """``{"top_eigenvalue", "trace", "trace_stderr"}`` of the Hessian of ``loss_fn()`` for
    ``variables``, from ``seed`` (a ``[2]`` int tensor); without trace probes, the
    trace and its error are NaN."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    out = {"top_eigenvalue": top_eigenvalue(loss_fn, variables, seeds[0], options)}
    if options.trace_probes > 0:
        out["trace"], out["trace_stderr"] = hutchinson_trace(loss_fn, variables, seeds[1],
                                                             options.trace_probes)
    else:
        out["trace"] = out["trace_stderr"] = tf.constant(float("nan"))
    return out
