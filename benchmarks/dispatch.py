"""What a ``tf.function`` call costs on top of its graph: ``python -m benchmarks.dispatch``.

An execution of the trainer calls its traced graph (the concrete function) directly after
its first call (``trainer.compile.executions.make_execution``); a hand-written loop calls the
``tf.function`` wrapper, which binds the arguments and looks the trace up again each time.
This times both on the same function: one that reads every variable of model A of the
benchmark harness and its Adam optimizer (what an execution captures), and takes a scalar
step count, as an execution does. The best of ``--rounds`` rounds is kept (other processes
only ever slow a round down); prints microseconds per call.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def per_call_microseconds(fn, arg, calls: int, rounds: int) -> float:
    """The best round's mean time of ``fn(arg)``, in microseconds."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn(arg)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per round (500)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds; the best is kept (15)")
    args = parser.parse_args()

    import keras
    import tensorflow as tf

    from benchmarks.common import workloads

    model = workloads(quick=True)["A"].model()
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(model.trainable_variables)
    variables = [*model.variables, *optimizer.variables]

    def read_all(num_steps):
        total = tf.cast(num_steps, tf.float32)
        return total + tf.add_n([tf.reduce_sum(tf.cast(v, tf.float32)) for v in variables])

    wrapper = tf.function(read_all)
    count = tf.constant(32, tf.int32)
    wrapper(count)  # traces
    direct = wrapper.get_concrete_function(count)
    through = per_call_microseconds(wrapper, count, args.calls, args.rounds)
    straight = per_call_microseconds(direct, count, args.calls, args.rounds)
    print(f"{len(variables)} captured variables; best of {args.rounds} rounds of "
          f"{args.calls} calls")
    print(f"through the tf.function wrapper: {through:.0f} us per call")
    print(f"the concrete function directly:  {straight:.0f} us per call")
    print(f"the wrapper's dispatch: {through - straight:.0f} us per call")


if __name__ == "__main__":
    main()
