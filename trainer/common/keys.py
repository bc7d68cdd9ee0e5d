"""Reserved log keys that steps and the compiled loop share, and the batch-size rule."""

from __future__ import annotations

import tensorflow as tf

#: The loop's total example weight of an execution (the denominator of its means).
EXAMPLES = "__examples__"
#: A step may return this key: the weight of its logs in the averages (default: batch size).
WEIGHT = "__weight__"
#: A step may return this key: logs computed only on its execution's sampled step
#: (``StepInfo.sampled``), reported as that step's values rather than averaged.
SAMPLED = "__sampled__"


def batch_size(batch) -> tf.Tensor:
    """Examples in a batch: the leading dimension of its first tensor, as float32 (a
    constant when the shape says it: the compiled loop then needs no multiply by it)."""
    first = tf.nest.flatten(batch)[0]
    rows = first.shape[0] if first.shape.rank else None
    if rows is not None:
        return tf.constant(float(rows))
    return tf.cast(tf.shape(first)[0], tf.float32)


def float_logs(logs: dict, batch) -> dict:
    """A step's logs as the loop sums them: float32 values, ``WEIGHT`` defaulting to the
    batch size, and ``SAMPLED`` (possibly empty) as a dict of float32 values."""
    logs = dict(logs)
    logs.setdefault(WEIGHT, batch_size(batch))
    sampled = {k: tf.cast(v, tf.float32) for k, v in logs.pop(SAMPLED, {}).items()}
    return {SAMPLED: sampled, **{k: tf.cast(v, tf.float32) for k, v in logs.items()}}
