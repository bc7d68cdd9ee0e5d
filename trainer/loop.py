"""The one place where step functions are compiled into multi-step executions."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

EXAMPLES = "__examples__"


def batch_size(batch) -> tf.Tensor:
    """Examples in a batch: the leading dimension of its first tensor."""
    return tf.cast(tf.shape(tf.nest.flatten(batch)[0])[0], tf.float32)


def _accumulate(step_fn, next_batch, sums):
    batch = next_batch()
    logs = step_fn(batch)
    weight = batch_size(batch)
    if sums is None:
        sums = {k: tf.zeros([], tf.float32) for k in logs}
        sums[EXAMPLES] = tf.zeros([], tf.float32)
    new = {k: sums[k] + tf.cast(logs[k], tf.float32) * weight for k in logs}
    new[EXAMPLES] = sums[EXAMPLES] + weight
    return new


def make_execution(
    step_fn: Callable,
    next_batch: Callable,
    *,
    run_eagerly: bool,
    jit_compile: bool,
    xla_loop: bool = False,
    extra_logs: Callable[[], dict] | None = None,
    on_trace: Callable[[], None] | None = None,
) -> Callable:
    """Build ``execute(num_steps) -> (names, values)``.

    One call runs ``num_steps`` steps (Orbit style: the loop is ``tf.range`` on
    the graph side) and returns the example-weighted mean of every log over those
    steps, plus ``__examples__``, stacked into one float32 vector so the host
    syncs once per execution. ``num_steps`` must be a scalar int32 tensor so the
    function is traced once whatever the count.

    ``run_eagerly`` runs the very same Python code without tf.function.
    ``jit_compile`` compiles the step with XLA; with ``xla_loop`` (a source whose
    batches XLA can produce) the whole execution is compiled as one XLA program.
    """
    names: list[str] = []
    if jit_compile and not run_eagerly and not xla_loop:
        step_fn = tf.function(step_fn, jit_compile=True)

    def execute(num_steps):
        if on_trace is not None:
            on_trace()
        sums = _accumulate(step_fn, next_batch, None)
        for _ in tf.range(num_steps - 1):
            sums = _accumulate(step_fn, next_batch, sums)
        examples = sums.pop(EXAMPLES)
        logs = {k: v / examples for k, v in sums.items()}
        if extra_logs is not None:
            logs.update({k: tf.cast(v, tf.float32) for k, v in extra_logs().items()})
        logs[EXAMPLES] = examples
        names[:] = sorted(logs)
        return tf.stack([logs[k] for k in names])

    if run_eagerly:
        fn = execute
    elif jit_compile and xla_loop:
        fn = tf.function(execute, jit_compile=True)
    else:
        fn = tf.function(execute)

    def run(num_steps: int):
        values = fn(tf.constant(num_steps, tf.int32)).numpy()
        return dict(zip(names, values.tolist()))

    return run
