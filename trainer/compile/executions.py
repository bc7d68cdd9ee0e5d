"""The one place where steps are compiled into multi-step executions."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import tensorflow as tf

from trainer.common.keys import EXAMPLES, SAMPLED, WEIGHT, float_logs
from trainer.compile.plan import CompilePlan
from trainer.compile.xla import xla_failure
from trainer.distribute.replicas import (
    MICRO,
    from_weighted_vector,
    replicated,
    rows_of,
    split_rows,
    weighted_vector,
)
from trainer.step.base import StepInfo
from trainer.step.layer_health import PREFIX as HEALTH

log = logging.getLogger(__name__)

_LAST = "last:"

#: ``step_functions(next_batch, jit)`` -> ``{sampled: step_fn}``: the step functions of one
#: execution, by whether they run the execution's sampled step. A ``step_fn()`` pulls its
#: batch with ``next_batch()``, runs one step and returns float32 logs with ``WEIGHT`` and
#: ``SAMPLED`` set; with ``jit`` the step's math is compiled by XLA on its own.
StepFunctions = Callable[[Callable, bool], dict]


def train_step_functions(step, global_step: tf.Variable, strategy=None,
                         accumulate_steps: int = 1, forward_xla: bool = False,
                         after_update: Callable | None = None,
                         health=None) -> StepFunctions:
    """Step functions that run ``step.run_step`` and advance ``global_step`` once per step.

    With a ``tf.distribute`` strategy, ``step.train_step`` runs on every replica with
    its rows of the global batch (``trainer.distribute.strategies.replicated``), and its logs
    come back reduced; the global step still advances once, outside the replicas.
    With ``accumulate_steps=K`` each step is one update from K micro-batches
    (``accumulated``). ``forward_xla`` (the plan's) asks the step to compile its forward
    pass and gradients with XLA (``StepInfo.jit_gradients``). ``after_update(global_step)``
    runs after each update, before the global step advances, outside the replicas (the
    weight average's update). ``health`` (a ``trainer.step.layer_health.LayerHealth``)
    reaches the sampled step (``StepInfo.health``), or, with accumulation, measures the
    summed update after the micro-batches.
    """

    def make(next_batch, jit: bool) -> dict:
        def bound(sampled: bool):
            watch = health if sampled else None
            per_update = watch if accumulate_steps == 1 else None

            def train_step(batch):
                # The variable itself, read where a step uses it: a read made here for every
                # step would be a stateful op the graph keeps even when nothing uses it.
                return step.train_step(batch, StepInfo(global_step=global_step, sampled=sampled,
                                                       jit_gradients=forward_xla,
                                                       health=per_update))

            if accumulate_steps > 1:
                train_step = accumulated(train_step, accumulate_steps,
                                         list(step.optimizers.values()), norm=step.grad_norm,
                                         health=watch)
            if jit:
                # One jit-compiled function per sampling mode: a tf.function's cache does not
                # know the flag, so a single one would serve the sampled trace to every step.
                train_step = tf.function(train_step, jit_compile=True)
            if strategy is not None:
                train_step = replicated(strategy, train_step)

            def step_fn():
                logs = step.run_step(next_batch, train_step)
                if after_update is not None:
                    after_update(global_step)
                global_step.assign_add(1)
                return logs

            return step_fn

        return {sampled: bound(sampled) for sampled in (True, False)}

    return make


def accumulated(train_step: Callable, count: int, optimizers,
                norm: Callable | None = None, health=None) -> Callable:
    """``train_step`` as one update from ``count`` micro-batches of the batch it is given.

    The batch (a replica's rows of it under a strategy) is split into ``count``
    contiguous micro-batches; the step runs on each in turn (unrolled: ``count`` is
    small and fixed) with its gradients scaled by the micro-batch's share of the
    batch and summed by the optimizers (``GroupedOptimizer.accumulate_steps``), which
    then apply the sum once: the update the whole batch would give, at the memory of
    one micro-batch. The logs are the example-weighted means over the micro-batches, but
    for the sampled ``grad_norm``: ``norm`` (``Step.grad_norm``) of the summed gradient, the
    update's, as one device logs it for the whole batch. ``health`` (a
    ``trainer.step.layer_health.LayerHealth``) adds the layers' health of that summed update
    (the sums are unscaled already: the optimizers divide the loss scale out first).
    """

    def run(batch):
        total = None
        for index in range(count):
            micro, rows = split_rows(batch, index, count)
            with rows_of(*rows, MICRO, index, count):
                logs = float_logs(train_step(micro), micro)
            keys = sorted(k for k in logs if k not in (WEIGHT, SAMPLED))
            skeys = sorted(logs[SAMPLED])
            vector = weighted_vector(logs)
            total = vector if total is None else total + vector
        # After every micro-batch's gradients are summed: reads of the sums wait for the
        # adds (program order of the same variables), the update for the last of them.
        grad_norm = None
        if norm is not None and "grad_norm" in skeys:
            # The sums hold unscaled gradients (the optimizers divide the loss scale out).
            grad_norm = norm([g for opt in optimizers for g in opt.accumulated_gradients()],
                             loss_scaled=False)
        if health is not None:
            pairs = [p for opt in optimizers for p in opt.accumulated_pairs()]
            variables = [v for _, v in pairs]
            before = health.weights(variables)
        for optimizer in optimizers:
            optimizer.finish_accumulation()
        logs = from_weighted_vector(total, keys, skeys)
        if grad_norm is not None:
            logs[SAMPLED]["grad_norm"] = grad_norm
        if health is not None:
            logs[SAMPLED].update(health.logs([g for g, _ in pairs], variables, before))
        return logs

    return run


def eval_step_functions(step, strategy=None) -> StepFunctions:
    """Step functions that run ``step.test_step`` on one batch (no update, no sampling);
    with a strategy, on every replica's rows of it."""

    def make(next_batch, jit: bool) -> dict:
        test_step = tf.function(step.test_step, jit_compile=True) if jit else step.test_step
        if strategy is not None:
            test_step = replicated(strategy, test_step)

        def step_fn():
            batch = next_batch()
            return float_logs(test_step(batch), batch)

        return {True: step_fn, False: step_fn}

    return make


def _accumulate(step_fn, sums, keys, unit=None):
    """Run one step; return ``sums`` plus its weighted logs, one vector in ``keys`` order
    with the weight last (one stack, multiply and add per step, not one pair per log),
    the step's ``SAMPLED`` logs, and the unit of the sums.

    The sums are in units of ``unit``: the first step's weight (``unit=None``) when it is
    known while tracing (a full batch's size), else 1.0. A step of that weight adds its
    logs as they are, without the multiply; the sums times ``unit`` are the weighted sums.
    """
    logs = dict(step_fn())
    weight = logs.pop(WEIGHT)
    sample = logs.pop(SAMPLED)
    if not keys:
        keys.extend(sorted(logs))
    static = tf.get_static_value(weight)
    if unit is None:
        unit = 1.0 if static is None else float(static)
    values = tf.stack([logs[k] for k in keys] + [tf.ones([], tf.float32)])
    if static is None or float(static) != unit:
        values = values * (weight if unit == 1.0 else weight / unit)
    return (values if sums is None else sums + values), sample, unit


def _rest_of_execution(step_fn, sums, keys, unit, num_steps):
    """Steps 2 to ``num_steps`` of an execution, added to ``sums`` (``_accumulate``)."""
    # A while loop, not `for _ in tf.range(...)`: AutoGraph gives range loops a
    # maximum_iterations that XLA takes as a compile-time constant, which would
    # recompile the fused execution for every new step count.
    done = tf.constant(1)
    while done < num_steps:
        sums, _, _ = _accumulate(step_fn, sums, keys, unit)
        done += 1
    return sums


def _execute(step_fns: dict, num_steps, loop: bool, *, names: list, state_logs) -> tf.Tensor:
    """The body of one execution: its steps, then the means, the sampled step's logs and
    ``state_logs()`` as one float64 vector whose entries ``names`` lists."""
    keys: list[str] = []
    sums, sample, unit = _accumulate(step_fns[True], None, keys)
    if loop:
        sums = _rest_of_execution(step_fns[False], sums, keys, unit, num_steps)
    rest = {_LAST + k: v for k, v in sample.items()}
    if state_logs is not None:
        rest.update({_LAST + k: v for k, v in state_logs().items()})
    rest[EXAMPLES] = sums[-1] if unit == 1.0 else sums[-1] * unit
    names[:] = keys + sorted(rest)
    # One division for all the means (the unit cancels out of them), then one vector.
    # float64: the state holds counters (the global step) that float32 rounds past 2**24.
    means = tf.cast(tf.math.divide_no_nan(sums[:-1], sums[-1]), tf.float64)
    return tf.concat([means, tf.stack([tf.cast(rest[k], tf.float64) for k in sorted(rest)])], 0)


def make_execution(step_functions: StepFunctions, next_batch: Callable, plan: CompilePlan, *,
                   xla_loop: bool = False, state_logs: Callable[[], dict] | None = None,
                   on_trace: Callable[[], None] | None = None) -> Callable:
    """Build ``run(num_steps) -> (means, state)``.

    One call runs ``num_steps`` steps (Orbit style: the loop runs on the graph
    side) and returns the example-weighted mean of every log over those steps
    (``EXAMPLES`` holds the total weight), the sampled step's ``SAMPLED`` logs
    and the values of ``state_logs()`` at the end (learning rates, counters) in
    ``state``. Everything comes back stacked into one vector, so the host syncs
    once per execution. ``num_steps`` is passed as a scalar int32 tensor so the
    function is traced once whatever the count (a run whose first execution is one
    step, such as ``steps_per_execution=1``, gets a function without the loop first).

    ``xla_loop`` says ``next_batch`` can run inside XLA (an in-memory source):
    with ``plan.update_xla`` the whole execution is then one XLA program, else each
    step's math is compiled on its own; with ``plan.xla_fallback``, a step XLA cannot
    compile runs without it after a warning.
    """
    names: list[str] = []  # of the values in the vector, set when traced

    def compiled(step_jit: bool, whole_jit: bool, loop: bool):
        step_fns = step_functions(next_batch, step_jit)

        def executing(num_steps):
            if on_trace is not None:
                on_trace()
            return _execute(step_fns, num_steps, loop, names=names, state_logs=state_logs)

        return executing if plan.run_eagerly else tf.function(executing, jit_compile=whole_jit)

    jit = plan.update_xla and not plan.run_eagerly
    # Whether the execution uses XLA (cleared once if XLA cannot compile), and its compiled
    # functions by whether they loop, each made on first use.
    made = {"jit": jit, "functions": {}}
    counts: dict[int, tf.Tensor] = {}  # step counts as tensors, made once each

    def call(num_steps: int, count: tf.Tensor) -> tf.Tensor:
        # One step without the loop: a loop that runs no iteration still costs a node for
        # every variable and tensor entering it (dozens for a small model), a tenth of a
        # small model's step without XLA. Used while the looping function has not been
        # needed (steps_per_execution=1, the short last batch's call); once it has, it
        # serves every count, so a run traces at most one more function.
        loop = num_steps > 1 or True in made["functions"]
        fn = made["functions"].get(loop)
        if fn is not None:
            return fn(count)
        on = made["jit"]
        traced = compiled(on and not xla_loop, on and xla_loop, loop)
        out = traced(count)  # the first call traces (and creates what the step creates)
        # From then on the traced graph is called directly: every call has the same
        # signature (a scalar int32), and the tf.function's own dispatch (binding the
        # arguments, looking the trace up by their types) costs about a small model's step
        # per call (python -m benchmarks.dispatch).
        made["functions"][loop] = (traced if plan.run_eagerly
                                   else traced.get_concrete_function(count))
        return out

    def run(num_steps: int):
        count = counts.get(num_steps)
        if count is None:
            count = counts[num_steps] = tf.constant(num_steps, tf.int32)
        try:
            values = call(num_steps, count).numpy().tolist()
        except tf.errors.OpError as e:
            detail = xla_failure(e)
            if not (plan.xla_fallback and made["jit"] and detail):
                raise
            # XLA rejects the graph before running it: nothing has changed yet.
            log.warning("XLA cannot compile the step (%s); running it without XLA "
                        "(trainer.jit_compile=false skips the attempt)", detail)
            made.update(jit=False, functions={})
            values = call(num_steps, count).numpy().tolist()
        means, state = {}, {}
        for name, value in zip(names, values):
            if name.startswith(_LAST):
                state[name[len(_LAST):]] = value
            else:
                means[name] = value
        return means, state

    return run


def merge_executions(first: tuple[dict, dict], second: tuple[dict, dict]) -> tuple[dict, dict]:
    """Two consecutive executions' ``(means, state)`` as one: example-weighted means,
    the later state, but the first one's layer health (of the merged execution's first
    step, as when it runs as one)."""
    (a, first_state), (b, state) = first, second
    state = {**state, **{k: v for k, v in first_state.items() if k.startswith(HEALTH)}}
    ea, eb = a[EXAMPLES], b[EXAMPLES]
    total = ea + eb
    means = {k: (a[k] * ea + b[k] * eb) / total if total else 0.0 for k in a if k != EXAMPLES}
    means[EXAMPLES] = total
    return means, state


def make_source_execution(step_functions: StepFunctions, source, plan: CompilePlan,
                          **kwargs) -> Callable:
    """``make_execution`` over a batch source; returns ``run(num_steps, position)``.

    ``position`` is the number of steps already run in the source's current
    epoch (the trainer derives it from the global step). A source with
    ``xla_loop`` (``trainer.data.sources.TensorSource``) yields full batches of a
    static shape from ``next()`` and, if the batch size does not divide the
    data, the epoch's short last batch from ``next_any()``. Under XLA (static
    shapes), an execution that reaches the end of such an epoch runs as two
    calls: its full steps in the fused function, then the last step in a second
    function traced (once) for the short batch; their logs are merged on the
    host, so callers see one execution. Without XLA, ``next_any()`` serves every
    step of one function, as an iterator would: a second trace costs more than
    it saves on short runs. ``kwargs`` are ``make_execution``'s.
    """
    if not source.tail:
        single = make_execution(step_functions, source.next, plan, xla_loop=source.xla_loop,
                                **kwargs)
        return lambda num_steps, position=0: single(num_steps)
    if not plan.update_xla or plan.run_eagerly:
        single = make_execution(step_functions, source.next_any, plan, **kwargs)
        return lambda num_steps, position=0: single(num_steps)
    fused = make_execution(step_functions, source.next, plan, xla_loop=source.xla_loop,
                           **kwargs)
    last = []  # built on first use: runs that never reach an epoch's end never trace it

    def last_step():
        if not last:
            short = dataclasses.replace(plan, update_xla=plan.short_batch_xla)
            last.append(make_execution(step_functions, source.next_any, short, **kwargs))
        return last[0](1)

    def run(num_steps: int, position: int = 0):
        per_epoch = source.steps_per_epoch
        if position + num_steps < per_epoch:
            return fused(num_steps)
        full = per_epoch - 1 - position
        out = last_step() if full == 0 else merge_executions(fused(full), last_step())
        rest = num_steps - full - 1
        return merge_executions(out, run(rest, 0)) if rest else out

    return run


@dataclasses.dataclass(frozen=True)
class Executions:
    """The compiled functions of one fit, built by ``build_executions``.

    ``train(num_steps, position)`` and ``evaluate(num_steps)`` return ``(means, state)``
    (see ``make_execution``); ``gradients(batch)`` the step's gradients by variable path.
    """

    train: Callable
    evaluate: Callable | None
    gradients: Callable


def build_executions(step, data, plan: CompilePlan, *, global_step: tf.Variable,
                     strategy=None, state_logs: Callable, on_trace: Callable | None = None,
                     evaluation: Callable | None = None,
                     after_update: Callable | None = None, health=None) -> Executions:
    """Compile ``step`` over ``data`` (a ``trainer.data.dataplan.DataPlan``) as ``plan`` says.

    ``state_logs()`` gives the training execution's end-of-execution logs (learning
    rates, the step's state, the Keras metrics, the global step); ``evaluation``, when
    given, the evaluation's (the validation metrics), and asks for the evaluation
    function too (a recompile after an unfreeze rebuilds the training one only).
    ``after_update`` and ``health`` are ``train_step_functions``'.
    """
    train = make_source_execution(
        train_step_functions(step, global_step, strategy, plan.accumulate_steps,
                             forward_xla=plan.forward_xla, after_update=after_update,
                             health=health),
        data.train, plan, state_logs=state_logs, on_trace=on_trace)
    evaluate = None if evaluation is None else make_source_execution(
        eval_step_functions(step, strategy), data.val, plan, state_logs=evaluation,
        on_trace=on_trace)

    def gradients(batch):
        return step.gradients_by_path(batch, StepInfo(global_step=global_step))

    return Executions(train=train, evaluate=evaluate,
                      gradients=gradients if plan.run_eagerly else tf.function(gradients))
