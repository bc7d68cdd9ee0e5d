"""What per-layer health costs, robustly on a busy machine: ``python -m benchmarks.health``.

Three trainers on the D workload (``benchmarks.common``: an MLP 32-64-64-1, 1,024 steps per
epoch) at ``steps_per_execution=32``: without the health callback, with it measuring every
execution (``every_n_steps=1``), and with it compiled in but never asked after the first
execution (``every_n_steps`` larger than the run). They run one epoch each in turn, for
``--rounds`` rounds; the best (shortest) epoch of each is kept, since other processes only
ever slow an epoch down. Prints the seconds per epoch and what one measurement costs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.health", description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    from benchmarks.common import workloads
    from trainer import HealthCallback, TapeStep, Trainer
    from trainer.data import Batching, DataModule

    tf.get_logger().setLevel("ERROR")
    w = workloads(False)["D"]
    x, y = w.arrays()
    spe = 32
    variants = {"without": [],
                "every execution": [HealthCallback(every_n_steps=1, min_interval_seconds=0)],
                "compiled in, off": [HealthCallback(every_n_steps=10**9)]}
    runs = {}
    for name, callbacks in variants.items():
        data = DataModule(train=(x, y), val=(x[: w.batch_size], y[: w.batch_size]),
                          task=w.task, batching=Batching(batch_size=w.batch_size))
        step = TapeStep(model=w.model(), optimizer=keras.optimizers.Adam(1e-3), task=w.task)
        trainer = Trainer(epochs=1, steps_per_execution=spe, callbacks=callbacks,
                          run_dir=tempfile.mkdtemp(prefix="bench-health-"))
        trainer.fit(step, data)  # traced and run once
        runs[name] = (trainer, step, data)
    best = {name: float("inf") for name in runs}
    for _ in range(args.rounds):
        for name, (trainer, step, data) in runs.items():
            trainer.epochs += 1
            t0 = time.perf_counter()
            trainer.fit(step, data)
            best[name] = min(best[name], time.perf_counter() - t0)
    steps = runs["without"][0].steps_per_epoch
    executions = steps // spe
    per_measurement = (best["every execution"] - best["without"]) / executions
    step_time = best["without"] / steps
    out = {"seconds_per_epoch": best, "steps_per_epoch": steps,
           "measurement_ms": 1e3 * per_measurement,
           "measurement_in_steps": per_measurement / step_time,
           "off_cost": best["compiled in, off"] / best["without"] - 1,
           "cost_at_every_100_steps": per_measurement * steps / 100 / best["without"]}
    for name, seconds in best.items():
        print(f"{name:>18}: {seconds:.3f} s per epoch of {steps} steps")
    print(f"one measurement: {out['measurement_ms']:.2f} ms "
          f"({out['measurement_in_steps']:.1f} steps' time)")
    print(f"compiled in, off: {100 * out['off_cost']:+.1f}%; at every_n_steps=100: "
          f"{100 * out['cost_at_every_100_steps']:+.1f}%")
    return out


if __name__ == "__main__":
    main()
