"""Stateless per-batch metrics; the loop averages them over examples."""

from __future__ import annotations

import tensorflow as tf


def accuracy(y_true, logits):
    """Share of examples whose largest logit is the true class."""
    pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.reduce_mean(tf.cast(tf.equal(pred, tf.cast(y_true, tf.int32)), tf.float32))


def mae(y_true, y_pred):
    """Mean absolute error."""
    return tf.reduce_mean(tf.abs(tf.cast(y_true, y_pred.dtype) - y_pred))


DEFAULT_METRICS = {"classification": {"accuracy": accuracy}, "regression": {"mae": mae}}
