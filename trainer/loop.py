"""The one place where step functions are compiled into multi-step executions."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

EXAMPLES = "__examples__"
#: A step may return this key: the weight of its logs in the averages (default: batch size).
WEIGHT = "__weight__"
_LAST = "last:"


def batch_size(batch) -> tf.Tensor:
    """Examples in a batch: the leading dimension of its first tensor."""
    return tf.cast(tf.shape(tf.nest.flatten(batch)[0])[0], tf.float32)


def _attempt(step_fn, next_batch):
    batch = next_batch()
    logs = dict(step_fn(batch))
    if WEIGHT not in logs:
        logs[WEIGHT] = batch_size(batch)
    return {k: tf.cast(v, tf.float32) for k, v in logs.items()}


def _accumulate(step_fn, next_batch, sums, retry_if, max_retries, after_step):
    logs = _attempt(step_fn, next_batch)
    if retry_if is not None:
        # Retry: the discarded forward is replaced by the next batch's, within this step.
        for _ in tf.range(max_retries):
            if not retry_if():
                break
            logs = _attempt(step_fn, next_batch)
    if after_step is not None:
        after_step()
    weight = logs.pop(WEIGHT)
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
    state_logs: Callable[[], dict] | None = None,
    after_step: Callable[[], None] | None = None,
    retry_if: Callable[[], tf.Tensor] | None = None,
    max_retries: int = 0,
    on_trace: Callable[[], None] | None = None,
) -> Callable:
    """Build ``execute(num_steps) -> (means, state)``.

    One call runs ``num_steps`` steps (Orbit style: the loop is ``tf.range`` on
    the graph side) and returns the example-weighted mean of every log over those
    steps (``__examples__`` holds the total weight) and the values of
    ``state_logs()`` at the end (learning rates, counters). Everything comes back
    stacked into one float32 vector, so the host syncs once per execution.
    ``num_steps`` is passed as a scalar int32 tensor so the function is traced
    once whatever the count.

    ``after_step`` runs once per step (the trainer advances its global step
    there); ``retry_if()``, if given, is asked after each attempt whether to
    replace it with the next batch, at most ``max_retries`` times per step.

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
        args = (retry_if, max_retries, after_step)
        sums = _accumulate(step_fn, next_batch, None, *args)
        for _ in tf.range(num_steps - 1):
            sums = _accumulate(step_fn, next_batch, sums, *args)
        examples = sums.pop(EXAMPLES)
        logs = {k: tf.math.divide_no_nan(v, examples) for k, v in sums.items()}
        if state_logs is not None:
            logs.update({_LAST + k: tf.cast(v, tf.float32) for k, v in state_logs().items()})
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
        values = fn(tf.constant(num_steps, tf.int32)).numpy().tolist()
        means, state = {}, {}
        for name, value in zip(names, values):
            if name.startswith(_LAST):
                state[name[len(_LAST):]] = value
            else:
                means[name] = value
        return means, state

    return run
