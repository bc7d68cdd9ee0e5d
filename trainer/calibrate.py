"""``jit_compile=auto``: time the training execution with and without XLA, keep the faster.

XLA is not always the faster compilation: on this kind of CPU a model with Keras
``Dropout`` runs slower under XLA, and a bfloat16 model gains nothing from it. So a run
long enough to pay for the measurement times both, from the same training state, and
puts that state back before training: the measurement changes nothing but the choice.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: XLA is kept only when it is faster than this fraction: timings on a shared machine
#: vary by a few percent, and without XLA nothing needs compiling again.
MARGIN = 0.03
#: Timed executions of each compilation, after one that traces and compiles it.
TRIALS = 5


def choose_faster(seconds: dict[bool, list[float]], margin: float = MARGIN) -> bool:
    """Whether to use XLA, from ``{use_xla: [seconds of each timed execution]}``: only
    if its fastest execution beats the fastest without by more than ``margin``."""
    return min(seconds[True]) < min(seconds[False]) * (1.0 - margin)


def time_compilations(runs: dict[bool, Callable[[int], object]], checkpoint, *, steps: int,
                      trials: int = TRIALS,
                      clock: Callable[[], float] = time.perf_counter) -> dict[bool, list]:
    """Seconds of ``trials`` executions of ``steps`` steps for each compilation in ``runs``
    (``{use_xla: run(num_steps)}``), each after a first execution that traces it.

    ``checkpoint`` (the trainer's, which holds all the training state) is written
    first and read back after each compilation's turn, so both start from the same
    state and training continues from it as if nothing had run.
    """
    with tempfile.TemporaryDirectory(prefix="trainer-calibrate-") as tmp:
        saved = checkpoint.write(os.path.join(tmp, "state"))
        seconds = {}
        for jit, run in runs.items():
            run(steps)  # traces (and compiles with XLA): not timed
            times = []
            for _ in range(trials):
                start = clock()
                run(steps)
                times.append(clock() - start)
            seconds[jit] = times
            checkpoint.read(saved).assert_existing_objects_matched()
    return seconds


def describe(seconds: dict[bool, list[float]], steps: int, chosen: bool) -> str:
    """One log line: both timings per step and the choice."""
    per_step = {k: 1000.0 * min(v) / steps for k, v in seconds.items()}
    return (f"trainer.jit_compile=auto: {per_step[True]:.3f} ms/step with XLA, "
            f"{per_step[False]:.3f} without (best of {len(seconds[True])} x {steps} steps): "
            f"running {'with' if chosen else 'without'} XLA")
