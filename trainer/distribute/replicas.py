"""Inside the replicas: which rows of the global batch a step sees, and the helpers that
make a step written for one device right under a strategy and gradient accumulation.

Every helper is an identity on one device. Under a ``tf.distribute`` strategy each
replica traces the step on its rows of the global batch (``replicated``); under gradient
accumulation each micro-batch is rows of those rows (``trainer.compile.executions.accumulated``).
``share()`` is the fraction of the global batch the traced code sees: ``Step.gradients``
scales gradients by it, so the optimizers' sums are the one-device gradient.
"""

from __future__ import annotations

import contextlib
import threading

import tensorflow as tf

from trainer.common.keys import SAMPLED, WEIGHT, float_logs

# The rows of the global batch the code being traced sees, as a stack of levels: a replica's
# rows, then a micro-batch's rows within them (gradient accumulation). Per thread:
# MirroredStrategy traces each replica in a thread of its own.
_replica = threading.local()
REPLICA, MICRO = "replica", "micro"


def _levels() -> tuple:
    return getattr(_replica, "levels", ())


@contextlib.contextmanager
def rows_of(start, stop, total, kind: str, index: int = 0, count: int = 1):
    """Trace the block as seeing rows ``[start, stop)`` of a batch of ``total`` rows: a
    replica's rows (``kind=REPLICA``) or micro-batch ``index`` of ``count`` (``MICRO``)."""
    previous = _levels()
    _replica.levels = (*previous, (start, stop, total, kind, index, count))
    try:
        yield
    finally:
        _replica.levels = previous


def split_rows(batch, index, count):
    """``(rows, (start, stop, total))``: part ``index`` of ``count`` of ``batch`` (a nest of
    tensors), contiguous and as even as they go (the first part takes the first rows)."""
    total = tf.shape(tf.nest.flatten(batch)[0])[0]
    start, stop = total * index // count, total * (index + 1) // count
    return tf.nest.map_structure(lambda t: t[start:stop], batch), (start, stop, total)


def share():
    """This replica's (and micro-batch's) fraction of the global batch (1.0 on one device).

    ``Step.gradients`` multiplies gradients by it: the optimizer sums the replicas'
    gradients (and the micro-batches' under accumulation), and the sum of
    ``share * mean over the rows`` is the global batch's mean.
    """
    out = 1.0
    for start, stop, total, *_ in _levels():
        out = out * (tf.cast(stop - start, tf.float32) / tf.cast(total, tf.float32))
    return out


def local_rows(tensor):
    """This replica's (micro-batch's) rows of ``tensor``, drawn for the whole global batch.

    Random draws made per example (a GAN's noise, interpolation weights) are drawn
    for the global batch and sliced, so every replica's rows are the ones a single
    device would give the same examples. One device: ``tensor`` itself.
    """
    for start, stop, *_ in _levels():
        tensor = tensor[start:stop]
    return tensor


def global_batch_size(local_size):
    """The global batch's size, given this replica's (the same on one device)."""
    levels = _levels()
    return local_size if not levels else levels[0][2]


def in_replicas() -> bool:
    """Whether this code runs in one of several replicas (traced under ``strategy.run``)."""
    return any(level[3] == REPLICA for level in _levels())


def micro_batch() -> tuple[int, int] | None:
    """``(index, count)`` of the micro-batch being traced under gradient accumulation
    (Python ints), else None."""
    for *_, kind, index, count in _levels():
        if kind == MICRO:
            return index, count
    return None


def sum_over_replicas(values):
    """``values`` (a nest of tensors) summed over the replicas; themselves on one device."""
    if not in_replicas():
        return values
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, values)


def flat(tensors, dtype=tf.float32):
    """``tensors`` as one vector of ``dtype`` (the inverse of ``unflat``)."""
    return tf.concat([tf.reshape(tf.cast(t, dtype), [-1]) for t in tensors], 0)


def unflat(vector, like) -> list:
    """``vector`` cut into tensors shaped as those of ``like`` (the inverse of ``flat``)."""
    sizes = tf.stack([tf.size(t) for t in like])
    return [tf.reshape(part, tf.shape(t)) for part, t in zip(tf.split(vector, sizes), like)]


def summed_flat(tensors, dtype=tf.float32):
    """``tensors`` as one vector of ``dtype``, summed over the replicas (itself on one device).

    One flat vector makes one all-reduce: a list would be packed differently per replica
    when run eagerly, and the collectives would not match.
    """
    return sum_over_replicas(flat(tensors, dtype))


def global_mean(value):
    """A per-replica batch mean as the global batch's mean, on every replica."""
    if not in_replicas():
        return value
    value = tf.cast(value, tf.float32)
    return sum_over_replicas(value * share())


def any_replica(flag):
    """Whether ``flag`` (a bool tensor) is true on any replica, on every replica."""
    if not in_replicas():
        return flag
    return sum_over_replicas(tf.cast(flag, tf.float32)) > 0


def batch_mean(loss):
    """A Keras loss object as the plain mean over the batch it is given.

    Keras losses divide their value by the replica count under a strategy; the
    framework's steps compute losses as on one device and scale gradients by
    ``share()`` instead, so a Keras loss must not divide as well. Returns a
    callable ``loss(y_true, y_pred)``; other callables are returned as they are.
    """
    import keras

    if not isinstance(loss, keras.losses.Loss):
        return loss
    if loss.reduction not in ("sum_over_batch_size", "mean"):
        return loss
    config = loss.get_config()
    config["reduction"] = "none"
    per_example = type(loss).from_config(config)

    def mean_loss(y_true, y_pred, sample_weight=None):
        return tf.reduce_mean(per_example(y_true, y_pred, sample_weight=sample_weight))

    mean_loss.loss = per_example
    return mean_loss


def replicated(strategy, fn):
    """``fn(batch) -> logs`` run on every replica of ``strategy``, each on its rows.

    The returned function takes the global batch (in the cross-replica context of
    a compiled execution) and returns the logs reduced across replicas to what one
    device would report: every log is the example-weighted mean over the replicas,
    ``WEIGHT`` their total weight, ``SAMPLED`` logs likewise.
    """

    def replica_fn(batch):
        ctx = tf.distribute.get_replica_context()
        local, rows = split_rows(batch, ctx.replica_id_in_sync_group, ctx.num_replicas_in_sync)
        with rows_of(*rows, REPLICA):
            logs = float_logs(fn(local), local)
        with lock:  # replicas trace in threads of their own; all give the same keys
            keys[:], skeys[:] = sorted(k for k in logs if k not in (WEIGHT, SAMPLED)), sorted(
                logs[SAMPLED])
        # One vector, one all-reduce: the weighted logs, the weight, the sampled logs.
        return weighted_vector(logs)

    keys: list[str] = []
    skeys: list[str] = []
    lock = threading.Lock()

    def run(batch):
        per_replica = strategy.run(replica_fn, args=(batch,))
        sums = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        return from_weighted_vector(sums, keys, skeys)

    return run


def weighted_vector(logs: dict) -> tf.Tensor:
    """Float logs (``float_logs``) as one vector: each log times the weight, the weight,
    each sampled log times the weight; keys sorted. Summed over parts of a batch, then
    ``from_weighted_vector``, it gives the example-weighted means of the whole batch."""
    weight, sampled = logs[WEIGHT], logs[SAMPLED]
    plain = sorted(k for k in logs if k not in (WEIGHT, SAMPLED))
    return tf.stack([logs[k] * weight for k in plain] + [weight]
                    + [sampled[k] * weight for k in sorted(sampled)])


def from_weighted_vector(sums, keys, sampled_keys) -> dict:
    """Float logs back from a sum of ``weighted_vector``s (``keys`` and ``sampled_keys``
    sorted)."""
    n = len(keys)
    weight = sums[n]
    logs = {k: tf.math.divide_no_nan(sums[j], weight) for j, k in enumerate(keys)}
    logs[SAMPLED] = {k: tf.math.divide_no_nan(sums[n + 1 + j], weight)
                     for j, k in enumerate(sampled_keys)}
    logs[WEIGHT] = weight
    return logs


def step_variable(initial_value, *, name: str, dtype=None) -> tf.Variable:
    """A non-trainable state variable of a step (a counter, a last value).

    Steps write such state inside their replicas, with the same value on every
    replica (decided on global values: ``global_mean``, ``any_replica``); the first
    replica's write is kept. A plain ``tf.Variable`` could not be written there.
    """
    return tf.Variable(initial_value, dtype=dtype, trainable=False, name=name,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
