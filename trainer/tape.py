"""Gradients over lists and dicts of variables, with an explicit unconnected-gradient policy."""

from __future__ import annotations

import tensorflow as tf

from trainer.errors import UserError

UNCONNECTED = ("none", "zero")


def check_unconnected(policy: str) -> str:
    if policy not in UNCONNECTED:
        raise UserError(f"tape.unconnected_gradients={policy!r} must be one of {UNCONNECTED}")
    return policy


def gradients(tape: tf.GradientTape, target, sources, *, unconnected: str = "none"):
    """``tape.gradient(target, sources)`` for a list or a dict of variables.

    The result has the structure of ``sources``. With ``unconnected="zero"``
    variables the target does not reach get zeros of their shape. TensorFlow's own
    ``UnconnectedGradients.ZERO`` fails on Keras 3 variables in some graphs
    (``'str' object has no attribute '_type_enum'``), so zeros are filled in here
    from each variable's shape and dtype instead.
    """
    grads = tape.gradient(target, sources)
    if unconnected == "none":
        return grads
    return tf.nest.map_structure(
        lambda g, v: tf.zeros(v.shape, v.dtype) if g is None else g,
        grads,
        sources,
        check_types=False,
    )
