"""The one place where step functions are compiled into multi-step executions."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable

import tensorflow as tf

from trainer.errors import UserError

log = logging.getLogger(__name__)

EXAMPLES = "__examples__"
#: A step may return this key: the weight of its logs in the averages (default: batch size).
WEIGHT = "__weight__"
#: A step may return this key: a dict of logs it computes only when ``sampled()``.
SAMPLED = "__sampled__"
_LAST = "last:"
_SAMPLING = [True]


def sampled() -> bool:
    """Whether the step being run (or traced) is its execution's sample.

    The loop runs the first step of each execution with ``sampled()`` true and
    the others with it false; a step called on its own sees true. A step computes
    diagnostics that are costly next to a small model's update (the default
    step's ``grad_norm``) only then, and returns them under ``SAMPLED``: they are
    logged as that step's values at the end of the execution, not averaged over it.
    """
    return _SAMPLING[-1]


@contextlib.contextmanager
def _sampling(on: bool):
    _SAMPLING.append(on)
    try:
        yield
    finally:
        _SAMPLING.pop()


def batch_size(batch) -> tf.Tensor:
    """Examples in a batch: the leading dimension of its first tensor."""
    return tf.cast(tf.shape(tf.nest.flatten(batch)[0])[0], tf.float32)


def _attempt(step_fn, next_batch):
    batch = next_batch()
    logs = dict(step_fn(batch))
    if WEIGHT not in logs:
        logs[WEIGHT] = batch_size(batch)
    sample = {k: tf.cast(v, tf.float32) for k, v in logs.pop(SAMPLED, {}).items()}
    return {SAMPLED: sample, **{k: tf.cast(v, tf.float32) for k, v in logs.items()}}


def _accumulate(step_fn, next_batch, sums, keys, retry_if, max_retries, after_step):
    """Run one step; return ``sums`` plus its weighted logs, one vector in ``keys`` order
    with the weight last (one stack, multiply and add per step, not one pair per log),
    and the step's ``SAMPLED`` logs."""
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
    sample = logs.pop(SAMPLED)
    if not keys:
        keys.extend(sorted(logs))
    values = tf.stack([logs[k] for k in keys] + [tf.ones([], tf.float32)]) * weight
    return (values if sums is None else sums + values), sample


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
    xla_fallback: bool = False,
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
    With ``xla_fallback``, if XLA cannot compile it, a warning says why and the
    execution is traced again without XLA (``trainer.jit_compile=auto``).
    """
    names: list[str] = []
    plain = {True: step_fn, False: step_fn}  # the step to run, by sampling mode
    if jit_compile and not xla_loop:
        # One jit-compiled function per sampling mode: a tf.function's cache does not
        # know the flag, so a single one would serve the sampled trace to every step.
        jit_step = {on: tf.function(step_fn, jit_compile=True) for on in (True, False)}
    else:
        jit_step = None

    def executing(steps):
        # A closure per step dict (not a default argument, which tf.function would
        # bind and hash as an input on every call).
        return lambda num_steps: execute(steps, num_steps)

    def execute(steps, num_steps):
        if on_trace is not None:
            on_trace()
        keys: list[str] = []
        args = (keys, retry_if, max_retries, after_step)
        with _sampling(True):
            sums, sample = _accumulate(steps[True], next_batch, None, *args)
        # A while loop, not `for _ in tf.range(...)`: AutoGraph gives range loops a
        # maximum_iterations that XLA takes as a compile-time constant, which would
        # recompile the fused execution for every new step count.
        done = tf.constant(1)
        with _sampling(False):
            while done < num_steps:
                sums, _ = _accumulate(steps[False], next_batch, sums, *args)
                done += 1
        examples = sums[-1]
        logs = {k: tf.math.divide_no_nan(sums[i], examples) for i, k in enumerate(keys)}
        logs.update({_LAST + k: v for k, v in sample.items()})
        if state_logs is not None:
            logs.update({_LAST + k: tf.cast(v, tf.float32) for k, v in state_logs().items()})
        logs[EXAMPLES] = examples
        names[:] = sorted(logs)
        return tf.stack([logs[k] for k in names])

    if run_eagerly:
        fn = executing(plain)
    elif jit_compile and xla_loop:
        fn = tf.function(executing(plain), jit_compile=True)
    elif jit_step is not None:
        fn = tf.function(executing(jit_step))
    else:
        fn = tf.function(executing(plain))
    compiled = [fn]
    counts: dict[int, tf.Tensor] = {}  # step counts as tensors, made once each

    def run(num_steps: int):
        count = counts.get(num_steps)
        if count is None:
            count = counts[num_steps] = tf.constant(num_steps, tf.int32)
        try:
            values = compiled[0](count).numpy().tolist()
        except tf.errors.OpError as e:
            detail = xla_failure(e)
            if not (xla_fallback and jit_compile and compiled[0] is fn and detail):
                raise
            log.warning("XLA cannot compile %s (%s); running it without XLA "
                        "(trainer.jit_compile=false skips the attempt)",
                        getattr(step_fn, "__qualname__", "the step"), detail)
            compiled[0] = tf.function(executing(plain))
            values = compiled[0](count).numpy().tolist()
        means, state = {}, {}
        for name, value in zip(names, values):
            if name.startswith(_LAST):
                state[name[len(_LAST):]] = value
            else:
                means[name] = value
        return means, state

    return run


class XlaCompileError(UserError):
    """``trainer.jit_compile=true`` and XLA cannot compile part of the step."""


def raise_if_xla_error(error: tf.errors.OpError, what: str) -> None:
    """Turn an XLA compilation failure into one line naming the ops and where they are made.

    XLA's own message is a page of graph names; this keeps the rejected op types
    and the innermost ``File ...`` line of the code that created them. Returns
    quietly for other errors (the caller re-raises them).
    """
    detail = xla_failure(error)
    if detail is None:
        return
    raise XlaCompileError(
        f"trainer.jit_compile=true: XLA cannot compile {what} ({detail}); replace that op with "
        "one XLA supports, or set trainer.jit_compile=false"
    ) from None


def xla_failure(error: Exception) -> str | None:
    """If ``error`` is XLA failing to compile: the rejected ops and where they were made."""
    text = getattr(error, "message", None) or str(error)
    if "XLA" not in text or not ("compile" in text or "tf2xla" in text):
        return None
    ops = sorted(set(re.findall(r"(\w+) \(No registered '", text)))
    where = [line.strip() for line in text.splitlines() if line.strip().startswith("File ")]
    detail = f"no XLA kernel for {', '.join(ops)}" if ops else text.strip().splitlines()[0][:300]
    if where:
        detail += f", created at {where[-1]}"
    return detail


def merge_executions(first: tuple[dict, dict], second: tuple[dict, dict]) -> tuple[dict, dict]:
    """Two consecutive executions' ``(means, state)`` as one: example-weighted means,
    the later state."""
    (a, _), (b, state) = first, second
    ea, eb = a[EXAMPLES], b[EXAMPLES]
    total = ea + eb
    means = {k: (a[k] * ea + b[k] * eb) / total if total else 0.0 for k in a if k != EXAMPLES}
    means[EXAMPLES] = total
    return means, state


def make_source_execution(step_fn: Callable, source, *, last_jit: bool | None = None,
                          **kwargs) -> Callable:
    """``make_execution`` over a batch source, fused wherever the source allows it.

    A source with ``xla_loop`` (``trainer.data.sources.TensorSource``) yields full
    batches of a static shape from ``next()`` and, if the batch size does not
    divide the data, the epoch's short last batch from ``next_any()``. Under XLA
    (static shapes), an execution that reaches the end of such an epoch runs as
    two calls: its full steps in the fused function, then the last step in a
    second function traced (once) for the short batch; their logs are merged on
    the host, so callers see one execution. Without XLA, ``next_any()`` serves
    every step of one function, as an iterator would: a second trace costs more
    than it saves on short runs. ``kwargs`` are ``make_execution``'s; ``last_jit``,
    if given, overrides ``jit_compile`` for the short-batch step (once an epoch,
    so its own XLA compilation seldom pays back).
    """
    if not getattr(source, "tail", 0):
        return make_execution(step_fn, source.next, xla_loop=source.xla_loop, **kwargs)
    if not kwargs.get("jit_compile") or kwargs.get("run_eagerly"):
        return make_execution(step_fn, source.next_any, **kwargs)
    fused = make_execution(step_fn, source.next, xla_loop=source.xla_loop, **kwargs)
    last = []  # built on first use: runs that never reach an epoch's end never trace it

    def last_step():
        if not last:
            kw = kwargs if last_jit is None else {**kwargs, "jit_compile": last_jit}
            last.append(make_execution(step_fn, source.next_any, xla_loop=False, **kw))
        return last[0](1)

    def run(num_steps: int):
        start, per_epoch = source.planned, source.steps_per_epoch
        if start + num_steps < per_epoch:
            source.planned = start + num_steps
            return fused(num_steps)
        full = per_epoch - 1 - start
        out = last_step() if full == 0 else merge_executions(fused(full), last_step())
        source.planned = 0
        rest = num_steps - full - 1
        return merge_executions(out, run(rest)) if rest else out

    return run
