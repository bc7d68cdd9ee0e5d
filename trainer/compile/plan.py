"""The compile plan: every decision about how a run is compiled, made in one place.

``plan_compile`` takes the step, the data's facts, whether a strategy runs the step, the
run's options and (for ``jit_compile=auto``) the calibration measurement, and returns a
frozen ``CompilePlan`` with a reason for each choice. Nothing else reads ``jit_compile``:
the executions, the step and the calibration read the plan. The plan is logged as one line
at the start of ``fit`` and kept in the training state, so a resumed run compiles as the
run it resumes did (XLA and non-XLA random numbers and roundings differ).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from trainer.common.errors import UserError

#: ``jit_compile="auto"`` considers XLA for in-memory runs of at least this many steps
#: (the compilation takes 1-3 s here, XLA saves ~0.1 ms a step on a small MLP when it is
#: faster at all), and times both compilations to decide (``trainer.compile.calibrate``).
AUTO_XLA_MIN_STEPS = 10_000
JIT_CHOICES = (True, False, "auto")


@dataclass(frozen=True)
class CompileOptions:
    """What the configuration asks for (``trainer.*`` keys); the plan decides from it.

    Attributes:
        jit_compile: ``True``, ``False`` or ``"auto"`` (XLA where measured faster).
        run_eagerly: run the same step code without ``tf.function``, for debugging.
        steps_per_execution: steps per compiled call, or ``"auto"`` (``Pacing``).
        accumulate_steps: micro-batches per update (gradient accumulation).
    """

    jit_compile: bool | str = "auto"
    run_eagerly: bool = False
    steps_per_execution: int | str = "auto"
    accumulate_steps: int = 1

    def __post_init__(self):
        if not (isinstance(self.jit_compile, bool) or self.jit_compile == "auto"):
            raise UserError(f"trainer.jit_compile={self.jit_compile!r} must be auto, true or "
                            "false")
        if self.accumulate_steps < 1:
            raise UserError(f"trainer.accumulate_steps={self.accumulate_steps} must be at "
                            "least 1")


@dataclass(frozen=True)
class CompilePlan:
    """How the run is compiled, with a reason for each choice.

    Attributes:
        run_eagerly: no ``tf.function`` at all.
        update_xla: the training update runs under XLA: the whole execution as one XLA
            program when ``fused``, else each step.
        fused: the batches come from memory inside the XLA program (an in-memory source).
        forward_xla: only the step's forward pass and gradients run under XLA, the update
            outside it (under a strategy, where a compiled update cannot reach the other
            replicas' variables).
        xla_fallback: if XLA cannot compile the step, warn and run without it (``auto``).
        short_batch_xla: whether an in-memory epoch's short last batch runs under XLA.
        measure: ``auto`` on a long in-memory run, before the measurement: time both
            compilations and plan again with the result.
        steps_per_execution: a fixed count or ``"auto"``.
        accumulate_steps: micro-batches per update.
        reasons: a sentence for each decision, keyed like the fields.
        options: the options it was planned for: a resumed run keeps a stored plan only
            when its own options are these.
    """

    run_eagerly: bool = False
    update_xla: bool = False
    fused: bool = False
    forward_xla: bool = False
    xla_fallback: bool = False
    short_batch_xla: bool = False
    measure: bool = False
    steps_per_execution: int | str = "auto"
    accumulate_steps: int = 1
    reasons: dict = field(default_factory=dict)
    options: list = field(default_factory=list)  # what it was planned for (``_key``)

    def decisions(self) -> tuple:
        """What the plan decides, without its reasons: two plans that compile alike."""
        return (self.run_eagerly, self.update_xla, self.fused, self.forward_xla,
                self.xla_fallback, self.short_batch_xla, self.measure)

    def describe(self) -> str:
        """The plan as one log line."""
        if self.run_eagerly:
            xla = "eager (trainer.run_eagerly=true)"
        elif self.update_xla:
            xla = "XLA for the " + ("whole execution" if self.fused else "step")
        elif self.forward_xla:
            xla = "XLA for the forward pass and gradients, the update without"
        else:
            xla = "no XLA"
        return (f"compile plan: {xla} ({self.reasons.get('xla', '')}); steps per execution "
                f"{self.steps_per_execution}; {self.accumulate_steps} micro-batch(es) per update")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CompilePlan:
        return cls(**json.loads(text))


def plan_compile(step, *, fused_source: bool, planned_steps: int, distributed: bool,
                 options: CompileOptions, measured: bool | None = None,
                 stored: dict | None = None) -> CompilePlan:
    """The compile plan of a run.

    Args:
        step: the ``Step``; ``step.split_xla_blockers()`` says why its forward pass and
            gradients could not be compiled apart from its update (under a strategy).
        fused_source: the training batches can be made inside an XLA program (in memory).
        planned_steps: the whole run's steps (not what is left of it: a resumed run must
            plan as the interrupted one did).
        distributed: a ``tf.distribute`` strategy runs the step on several replicas.
        options: the configured ``CompileOptions``.
        measured: ``jit_compile=auto``'s measurement: whether XLA was the faster (None:
            not measured yet; the plan then asks for it with ``measure``).
        stored: the plan a checkpoint holds (``CompilePlan.to_json``'s dict): a resumed run
            keeps its XLA choices when its options are the ones it was made for.
    """
    common = dict(run_eagerly=options.run_eagerly,
                  steps_per_execution=options.steps_per_execution,
                  accumulate_steps=options.accumulate_steps)
    jit = options.jit_compile
    if stored is not None and stored.get("options") == _key(options, distributed):
        kept = {k: stored[k] for k in ("update_xla", "fused", "forward_xla", "xla_fallback",
                                       "short_batch_xla")}
        reasons = {**stored.get("reasons", {}), "xla": "kept from the checkpoint's plan: "
                   + stored.get("reasons", {}).get("xla", "")}
        return CompilePlan(**common, **kept, reasons=reasons, options=_key(options, distributed))
    plan = dict(common, options=_key(options, distributed))
    if options.run_eagerly:
        return CompilePlan(**plan, reasons={"xla": "trainer.run_eagerly=true: no tf.function"})
    if distributed:
        if jit is not True:
            why = ("a compiled update cannot reach the other replicas' variables, and "
                   "jit_compile=auto does not split the step (jit_compile=true does)"
                   if jit == "auto" else "trainer.jit_compile=false")
            return CompilePlan(**plan, reasons={"xla": why})
        blockers = list(step.split_xla_blockers())
        if blockers:
            return CompilePlan(**plan, reasons={"xla": "trainer.jit_compile=true under a "
                                                "strategy, but " + "; ".join(blockers)})
        return CompilePlan(**plan, forward_xla=True, reasons={
            "xla": "trainer.jit_compile=true under a strategy: the forward pass and gradients "
                   "under XLA, the update outside it (a compiled update cannot reach the "
                   "other replicas' variables)"})
    if jit is True:
        return CompilePlan(**plan, update_xla=True, fused=fused_source, short_batch_xla=True,
                           reasons={"xla": "trainer.jit_compile=true"})
    if jit is False:
        return CompilePlan(**plan, reasons={"xla": "trainer.jit_compile=false"})
    if not fused_source:
        return CompilePlan(**plan, reasons={
            "xla": "jit_compile=auto: the data is streamed, so XLA could compile only the step"})
    if planned_steps < AUTO_XLA_MIN_STEPS:
        return CompilePlan(**plan, reasons={
            "xla": f"jit_compile=auto: {planned_steps} planned steps are too few for XLA's "
                   f"compilation to pay back (it is measured from {AUTO_XLA_MIN_STEPS})"})
    if measured is None:
        # The fallback holds while measuring too: XLA may fail to compile the step.
        return CompilePlan(**plan, measure=True, xla_fallback=True, reasons={
            "xla": "jit_compile=auto: to be measured"})
    return CompilePlan(**plan, update_xla=measured, fused=measured, xla_fallback=True,
                       reasons={"xla": "jit_compile=auto: measured "
                                + ("faster" if measured else "not faster") + " with XLA"})


def _key(options: CompileOptions, distributed: bool) -> list:
    """What a stored plan was made for: a resumed run with other options plans anew."""
    return [options.jit_compile, options.run_eagerly, distributed]
