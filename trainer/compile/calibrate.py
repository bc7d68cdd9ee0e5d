"""``jit_compile=auto``: time the training execution with and without XLA, keep the faster.

XLA is not always the faster compilation: on this kind of CPU a model with Keras
``Dropout`` runs slower under XLA, and a bfloat16 model gains nothing from it. So a run
long enough to pay for the measurement times both, from the same training state, and
puts that state back before training: the measurement changes nothing but the choice.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: XLA is kept only when it is faster than this fraction: timings on a shared machine
#: vary by a few percent, and without XLA nothing needs compiling again.
MARGIN = 0.03
#: Timed rounds: each round times both compilations back to back (alternating which goes
#: first), so a change of the machine's load hits both alike.
TRIALS = 7
#: Executions per timing: one execution of a small step is a few milliseconds.
EXECUTIONS = 3


def choose_faster(seconds: dict[bool, list[float]], margin: float = MARGIN) -> bool:
    """Whether to use XLA, from ``{use_xla: [seconds of each timed round]}``: only if the
    median of the rounds' ratios (XLA over without, each pair timed back to back) is
    below ``1 - margin``. A ratio per round, not the best of each: a load change
    between two timings would otherwise decide."""
    ratios = sorted(x / p for x, p in zip(seconds[True], seconds[False]) if p > 0)
    if not ratios:
        return False
    return statistics.median(ratios) < 1.0 - margin


def time_compilations(runs: dict[bool, Callable[[int], object]], checkpoint, *, steps: int,
                      trials: int = TRIALS, executions: int = EXECUTIONS,
                      clock: Callable[[], float] = time.perf_counter) -> dict[bool, list]:
    """Seconds per ``executions`` executions of ``steps`` steps for each compilation in
    ``runs`` (``{use_xla: run(num_steps)}``), in ``trials`` interleaved rounds, after one
    execution of each that traces (and compiles) it.

    ``checkpoint`` (the trainer's, which holds all the training state) is written
    first and read back at the end, so training continues from that state as if
    nothing had run.
    """
    with tempfile.TemporaryDirectory(prefix="trainer-calibrate-") as tmp:
        saved = checkpoint.write(os.path.join(tmp, "state"))
        for run in runs.values():
            run(steps)  # traces (and compiles with XLA): not timed
        seconds: dict[bool, list] = {jit: [] for jit in runs}
        order = list(runs)
        for trial in range(trials):
            for jit in order if trial % 2 == 0 else order[::-1]:
                start = clock()
                for _ in range(executions):
                    runs[jit](steps)
                seconds[jit].append(clock() - start)
        checkpoint.read(saved).assert_existing_objects_matched()
    return seconds


def describe(seconds: dict[bool, list[float]], steps: int, chosen: bool) -> str:
    """One log line: both timings per step, the rounds' median ratio and the choice."""
    per_step = {k: 1000.0 * statistics.median(v) / (steps * EXECUTIONS)
                for k, v in seconds.items()}
    ratio = statistics.median(x / p for x, p in zip(seconds[True], seconds[False]) if p > 0)
    return (f"trainer.jit_compile=auto: {per_step[True]:.3f} ms/step with XLA, "
            f"{per_step[False]:.3f} without (medians of {len(seconds[True])} interleaved "
            f"rounds of {EXECUTIONS} x {steps} steps; XLA/without {ratio:.2f}): "
            f"running {'with' if chosen else 'without'} XLA")
