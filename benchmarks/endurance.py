"""Endurance: resident memory and open file handles over a long run, expected flat.

``python -m benchmarks.endurance [--quick]`` (the harness runs it as group E, in a
child process of its own, so neither the other groups' memory nor their files are
counted). Each run trains ``steps`` steps with everything a long run keeps doing:
TensorBoard scalars every execution, histograms and a checkpoint every 100 steps,
an evaluation every epoch, and for the PINN an image every 500 steps. Two steps
cover the tape features a leak would most likely hide in:

- ``pinn``: ``PinnStep``, the Poisson PINN, whose loss takes ``u''`` from two nested
  tapes inside the training tape;
- ``multitask``: ``MultitaskStep``, per-task gradients from one persistent tape, then
  PCGrad surgery.

Memory is the process's resident set (``VmRSS`` in ``/proc/self/status``), file handles
the entries of ``/proc/self/fd``, both sampled (after a garbage collection) at every
epoch end. The baseline is the end of the first epoch, by which everything has been
traced and run once (training, evaluation, histograms, checkpoints, images); growth
is measured from there to the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

STEPS, QUICK_STEPS = 5000, 1000
STEPS_PER_EXECUTION = 50  # fixed: the number of executions, and so of callbacks, is too
EPOCH_STEPS = 250
CHECKPOINT_EVERY = 100
RUNS = ("pinn", "multitask")


def rss_mb() -> float:
    """This process's resident set size in MiB (``VmRSS``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # reported in kB
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_files() -> int:
    """File descriptors this process holds open."""
    return len(os.listdir("/proc/self/fd"))


def _sample(step: int) -> dict:
    gc.collect()  # unreachable Python objects are not a leak; count what survives a collection
    return {"step": step, "rss_mb": rss_mb(), "open_files": open_files(),
            "time": time.perf_counter()}


def _pinn():
    import keras

    from trainer.experiments.pinn import PinnStep, Poisson1D, SolutionImage, poisson_data
    from trainer.models import mlp

    problem = Poisson1D(frequency=2.0)
    batch = 64
    data = poisson_data(problem=problem, n_collocation=batch * EPOCH_STEPS, n_val=201,
                        batch_size=batch)
    model = mlp(input_shape=data.input_shape, num_outputs=1, hidden_units=[32, 32],
                activation="tanh", name="pinn_mlp")
    step = PinnStep(model=model, optimizer=keras.optimizers.Adam(1e-3), problem=problem,
                    pde_scale=10.0)
    return step, data, [SolutionImage(every_n_steps=500, size=128)]


def _multitask():
    import keras
    import numpy as np

    from trainer.data import Batching, DataModule
    from trainer.experiments.multitask import MultitaskStep, two_head_mlp

    batch, features, classes = 64, 64, 10
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * EPOCH_STEPS, features)).astype(np.float32)
    y = (x[:, :classes].argmax(axis=1)).astype(np.int32)  # learnable, so PCGrad has work
    data = DataModule(train=(x, y), val=(x[:256], y[:256]), task="classification",
                      batching=Batching(batch_size=batch))
    model = two_head_mlp(input_shape=(features,), num_outputs=classes, hidden_units=[64, 32])
    return MultitaskStep(model=model, optimizer=keras.optimizers.Adam(1e-3)), data, []


def endure(name: str, steps: int, run_dir: Path, log=print) -> dict:
    """Train run ``name`` for ``steps`` steps in ``run_dir``; its memory and file samples."""
    import keras

    from trainer import CheckpointCallback, TensorBoardCallback, Trainer
    from trainer.callbacks import Callback

    keras.utils.set_random_seed(0)
    step, data, extra = {"pinn": _pinn, "multitask": _multitask}[name]()

    class Probe(Callback):
        def __init__(self):
            self.first_execution, self.samples = None, []

        def on_execution_end(self, trainer, global_step, logs):
            if self.first_execution is None:
                self.first_execution = _sample(global_step)

        def on_epoch_end(self, trainer, epoch, logs):
            self.samples.append(_sample(logs["step"]))

    probe = Probe()
    callbacks = [
        TensorBoardCallback(histogram_every_n_steps=CHECKPOINT_EVERY,
                            histogram_min_interval_seconds=0),
        # Checkpoints by step only, every time they are due: 50 saves in 5,000 steps.
        CheckpointCallback(every_n_steps=CHECKPOINT_EVERY, every_n_epochs=0, every_seconds=0,
                           min_interval_seconds=0, max_to_keep=3),
        *extra, probe,
    ]
    trainer = Trainer(epochs=steps // EPOCH_STEPS, steps_per_execution=STEPS_PER_EXECUTION,
                      callbacks=callbacks, run_dir=str(run_dir))
    t0 = time.perf_counter()
    trainer.fit(step, data)
    seconds = time.perf_counter() - t0
    start, end = probe.samples[0], probe.samples[-1]
    # The second half alone: a one-time settling after the start (the first image, the
    # first checkpoint deleted) shows in the growth, a leak in this slope too.
    middle = probe.samples[len(probe.samples) // 2]
    span, late_span = end["step"] - start["step"], end["step"] - middle["step"]
    out = {
        "steps": trainer.current_step, "seconds": seconds,
        "steps_per_second": span / (end["time"] - start["time"]),
        "checkpoints": len(list((run_dir / "checkpoints").glob("ckpt-*.index"))),
        "first_execution": {k: v for k, v in probe.first_execution.items() if k != "time"},
        "start": {k: v for k, v in start.items() if k != "time"},
        "end": {k: v for k, v in end.items() if k != "time"},
        "rss_growth": (end["rss_mb"] - start["rss_mb"]) / start["rss_mb"],
        "rss_mb_per_1000_steps": (end["rss_mb"] - start["rss_mb"]) * 1000 / span,
        "late_rss_mb_per_1000_steps": (end["rss_mb"] - middle["rss_mb"]) * 1000 / late_span,
        "open_files_growth": end["open_files"] - start["open_files"],
        "samples": [[s["step"], round(s["rss_mb"], 1), s["open_files"]] for s in probe.samples],
    }
    log(f"  endurance {name}: {out['steps']} steps in {seconds:.0f}s; RSS "
        f"{start['rss_mb']:.0f} -> {end['rss_mb']:.0f} MiB ({100 * out['rss_growth']:+.1f}%, "
        f"{out['rss_mb_per_1000_steps']:+.1f} MiB per 1,000 steps; second half "
        f"{out['late_rss_mb_per_1000_steps']:+.1f}), open files "
        f"{start['open_files']} -> {end['open_files']}")
    return out


def run(quick: bool = False, log=print) -> dict:
    """Every endurance run in this process, each in its own temporary run directory."""
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    steps = QUICK_STEPS if quick else STEPS
    result = {"settings": {"steps": steps, "steps_per_execution": STEPS_PER_EXECUTION,
                           "epoch_steps": EPOCH_STEPS, "checkpoint_every": CHECKPOINT_EVERY},
              "runs": {}}
    for name in RUNS:
        with tempfile.TemporaryDirectory(prefix=f"endurance-{name}-") as tmp:
            result["runs"][name] = endure(name, steps, Path(tmp), log=log)
    return result


def run_in_subprocess(quick: bool, log=print) -> dict:
    """``run`` in a fresh Python process: its memory and files are the runs' alone."""
    with tempfile.TemporaryDirectory(prefix="endurance-") as tmp:
        out = Path(tmp) / "endurance.json"
        cmd = [sys.executable, "-m", "benchmarks.endurance", "--out", str(out)]
        # stderr passes through: the child's progress lines appear in the harness's log.
        p = subprocess.run(cmd + (["--quick"] if quick else []),
                           cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {p.returncode}")
        return json.loads(out.read_text())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.endurance", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_STEPS:,} steps per run instead of {STEPS:,}")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    args = parser.parse_args(argv)
    result = run(args.quick, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return result


if __name__ == "__main__":
    main()
