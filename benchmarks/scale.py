"""Group F, "scale": mixed precision, streaming from shards, gradient accumulation, a
mirrored strategy, and ``jit_compile=auto``'s choice. Rows in the format of
``bench.py``'s groups; ``report.py`` reads the targets off them (``summarize``) and
writes their section of RESULTS.md (``report_lines``), both in ``scale_report.py`` (no
TensorFlow there) and importable from here too.

All on the B workload (MLP 784-1024-1024-10, batch 256, in memory, no XLA, the
trainer's default step), unless said otherwise:

- precision: the trainer with ``mixed_bfloat16`` and ``mixed_float16`` against its
  float32 steps/s, and a hand-written bf16 loop (``HandVariant`` built under the
  policy: the same model, data and ``steps_per_execution``);
- streaming: the trainer fed from TFRecord shards on local disk
  (``benchmarks/streaming.py``'s ``ShardVariant``), from memory (the fused loop) and
  from the arrays through tf.data (the iterator path, which pays tf.data too);
- accumulation: batch 1024 with ``accumulate_steps=4`` (micro-batches of 256), its
  rate counted in micro-batches, against batch 256 with one update each;
- ``jit_compile=auto``: false, true and auto on the dense experiment's model (its
  ``configs/experiment/dense.yaml``: hidden units, dropout, batch size, on random data of
  the digits' shape and size), the same without dropout, and B under mixed_bfloat16;
  the trainers plan a run of 10**9 epochs, so auto times both compilations;
- mirrored: one device against ``Mirrored(cpu_replicas=2)``, both in a child process
  of its own (logical CPU devices are set before TensorFlow starts):
  ``python -m benchmarks.scale --mirrored --out FILE``.

Each of these subgroups is timed round robin on its own (with its own float32 baseline),
so the variants a ratio compares run within a second of each other, and every row also
records the process's CPU time per step. ``python -m benchmarks.bench --groups F`` runs
the group (``--merge`` keeps the other groups' recorded results);
``python -m benchmarks.scale --only precision,streaming`` times subgroups alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.common import measure, workloads
from benchmarks.scale_report import ACCUMULATE
from benchmarks.scale_report import report_lines as report_lines
from benchmarks.scale_report import summarize as summarize
from benchmarks.streaming import ShardVariant
from benchmarks.variants import HandVariant, TrainerVariant, Workload, _TrainerClock

ROOT = Path(__file__).resolve().parents[1]
DENSE_EXPERIMENT = ROOT / "configs" / "experiment" / "dense.yaml"
DIGITS_TRAIN = 1437  # the digits' training split (1,797 at val_fraction 0.2)
BF16, FP16 = "mixed_bfloat16", "mixed_float16"


@contextlib.contextmanager
def precision(policy: str):
    """Keras' global dtype policy set to ``policy`` inside, put back after (the policy
    is process-wide and the other variants are float32)."""
    import keras

    before = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def cpu_timed(variant, run):
    """``run()``'s ``(steps, seconds)``, recording the process's CPU time per step (all its
    threads) in ``variant.meta["cpu_ms_per_step"]``: the list is made on the first run (in
    set-up), so ``measure``'s row shares it. Other processes stretch a window's wall time,
    hardly its CPU time: a steadier view of what a variant costs on a shared machine."""
    start = time.process_time()
    steps, seconds = run()
    variant.meta.setdefault("cpu_ms_per_step", []).append(
        1000 * (time.process_time() - start) / max(steps, 1))
    return steps, seconds


@dataclass
class MlpWorkload(Workload):
    """A ``Workload`` whose model is ``trainer.models.mlp`` (dropout after each hidden layer)."""

    dropout: float = 0.0

    def model(self):
        import keras

        from trainer.models.mlp import mlp

        keras.utils.set_random_seed(0)
        return mlp(input_shape=(self.n_features,), num_outputs=self.n_out,
                   hidden_units=list(self.hidden), dropout=self.dropout)


def dense_workload(tiny: bool = False) -> MlpWorkload:
    """The dense experiment's model and batch size (read from its config), on random data
    of the digits' shape (64 features, 10 classes) and training-set size."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(DENSE_EXPERIMENT)
    hidden = [16] if tiny else list(cfg.model.hidden_units)
    return MlpWorkload("dense", "classification", 64, hidden, 10,
                       batch_size=int(cfg.data.batch_size),
                       n_train=256 if tiny else DIGITS_TRAIN, dropout=float(cfg.model.dropout))


def b_workload(quick: bool, tiny: bool) -> Workload:
    """bench's B (quick: hidden 256-256; tiny, for the tests: 32-16-10 on 512 examples)."""
    b = workloads(quick)["B"]
    return replace(b, n_features=32, hidden=[16], n_train=512, batch_size=64) if tiny else b


class ScaleTrainer(TrainerVariant):
    """``TrainerVariant`` under a dtype policy (``mixed_float16`` with the driver's loss
    scale), with ``accumulate_steps`` and a ``distribution``.

    Its validation set is ``val_examples`` (default one batch of 256 at most), so a
    larger batch does not evaluate more; with accumulation its rate counts micro-batches.
    """

    def __init__(self, name, workload, spe, *, source="memory", xla=False, policy="float32",
                 accumulate=1, distribution=None, val_examples=None):
        super().__init__(name, workload, spe, source=source, xla=xla)
        self.policy, self.accumulate, self.distribution = policy, accumulate, distribution
        self.val_examples = val_examples or min(workload.batch_size, 256)
        self.meta.update(precision=policy, accumulate_steps=accumulate, jit_compile=xla,
                         distribute=distribution.kind if distribution else "none",
                         unit="micro-batches" if accumulate > 1 else "steps")

    def setup(self):
        import keras

        import trainer.training.trainer as trainer_module
        from trainer import TapeStep, Trainer
        from trainer.data import Batching, DataModule
        from trainer.distribute import NoDistribution
        from trainer.step.optimizers import LossScale

        w = self.workload
        x, y = w.arrays()
        in_memory = {"memory": True, "iterator": False}.get(self.source, "auto")
        n = self.val_examples
        self.data = DataModule(train=(x, y), val=(x[:n], y[:n]), task=w.task,
                               batching=Batching(batch_size=w.batch_size, in_memory=in_memory))
        distribution = self.distribution or NoDistribution()
        with precision(self.policy):
            with distribution.scope():
                self.step = TapeStep(model=w.model(), optimizer=keras.optimizers.Adam(1e-3),
                                     task=w.task)
                if self.policy == FP16:
                    self.step.use_loss_scale(LossScale())
            self.clock = _TrainerClock()
            self.trainer = Trainer(epochs=10**9, steps_per_execution=self.spe,
                                   jit_compile=self.xla, accumulate_steps=self.accumulate,
                                   distribution=distribution, callbacks=[self.clock],
                                   run_dir=tempfile.mkdtemp(prefix="bench-scale-"))
            # What auto measured (the calibration's own timings), for the report.
            real = trainer_module.time_compilations

            def timed(*args, **kwargs):
                seconds = real(*args, **kwargs)
                steps = kwargs["steps"]
                self.meta["calibration_ms_per_step"] = {
                    "xla" if jit else "no_xla": 1000 * min(t) / steps
                    for jit, t in seconds.items()}
                return seconds

            trainer_module.time_compilations = timed
            try:
                self.run(1)
            finally:
                trainer_module.time_compilations = real
        self.meta["xla"] = self.trainer.xla
        self.meta["source"] = "memory" if self.data.holds_in_memory() else "iterator"

    def run(self, epochs):
        def counted():
            with precision(self.policy):
                steps, seconds = super(ScaleTrainer, self).run(epochs)
            return steps * self.accumulate, seconds

        return cpu_timed(self, counted)


class PolicyHand(HandVariant):
    """``HandVariant`` (in memory, no XLA) with its model built and run under a dtype policy."""

    def __init__(self, name, workload, spe, *, policy: str):
        super().__init__(name, workload, spe, source="memory", xla=False)
        self.policy = policy
        self.meta["precision"] = policy

    def setup(self):
        with precision(self.policy):
            super().setup()

    def run(self, epochs):
        with precision(self.policy):
            return cpu_timed(self, lambda: super(PolicyHand, self).run(epochs))


class Shards(ShardVariant):
    """``ShardVariant`` with its CPU time per step recorded (``cpu_timed``)."""

    def run(self, epochs):
        return cpu_timed(self, lambda: super(Shards, self).run(epochs))


def variants(quick: bool = False, *, directory: str | os.PathLike | None = None,
             tiny: bool = False) -> dict:
    """Group F's in-process variants, by subgroup; each subgroup is timed round robin on its
    own, so the variants a ratio compares run within seconds of each other (each has its
    own float32 baseline). The mirrored pair runs in a child process
    (``mirrored_in_subprocess``). ``directory`` receives the shards (default: a new
    temporary directory); ``tiny``: toy sizes for the tests."""
    b = b_workload(quick, tiny)
    spe = 8 if tiny else 32
    big = replace(b, name="B/accum", batch_size=b.batch_size * ACCUMULATE)
    directory = Path(directory or tempfile.mkdtemp(prefix="bench-shards-")) / "shards"
    out = {}
    name = f"F/precision/B/spe{spe}"
    out["precision"] = [
        ScaleTrainer(f"{name}/trainer-memory", b, spe),
        ScaleTrainer(f"{name}/trainer-memory-bf16", b, spe, policy=BF16),
        PolicyHand(f"{name}/hand-memory-bf16", b, spe, policy=BF16),
        PolicyHand(f"{name}/hand-memory", b, spe, policy="float32"),
        ScaleTrainer(f"{name}/trainer-memory-fp16", b, spe, policy=FP16),
    ]
    name = f"F/streaming/B/spe{spe}"
    out["streaming"] = [
        ScaleTrainer(f"{name}/trainer-memory", b, spe),
        ScaleTrainer(f"{name}/trainer-iterator", b, spe, source="iterator"),
        Shards(f"{name}/trainer-tfrecord", b, spe, directory=directory),
    ]
    out["accumulation"] = [
        ScaleTrainer(f"F/accumulation/B/spe{spe}/trainer-memory", b, spe),
        # As many examples per execution as the plain variant's (spe batches of 256).
        ScaleTrainer(f"F/accumulation/B-accum{ACCUMULATE}/spe{spe // ACCUMULATE}/"
                     "trainer-memory", big, spe // ACCUMULATE, accumulate=ACCUMULATE,
                     val_examples=b.batch_size),
    ]
    # The dense experiment as it runs: steps_per_execution=auto (its executions are epochs).
    dense = dense_workload(tiny)
    cases = [("dense", dense, "auto", "float32"),
             ("dense-nodropout", replace(dense, name="dense-nodropout", dropout=0.0), "auto",
              "float32"),
             ("B-bf16", b, spe, BF16)]
    for label, w, steps, policy in cases:
        out[f"auto/{label}"] = [
            ScaleTrainer(f"F/auto/{label}/jit-{tag}", w, steps, xla=jit, policy=policy)
            for jit, tag in ((False, "false"), (True, "true"), ("auto", "auto"))]
    return out


def mirrored_variants(quick: bool = False, *, tiny: bool = False) -> list:
    """One device and ``Mirrored(cpu_replicas=2)``, on B in memory without XLA (under a
    strategy the trainer never uses XLA). Needs two logical CPU devices: call
    ``trainer.distribute.strategies.split_cpu(2)`` before TensorFlow starts."""
    from trainer.distribute import Mirrored

    b = b_workload(quick, tiny)
    spe = 8 if tiny else 32
    return [ScaleTrainer(f"F/mirrored/B/spe{spe}/trainer-memory-1device", b, spe),
            ScaleTrainer(f"F/mirrored/B/spe{spe}/trainer-memory-mirrored2", b, spe,
                         distribution=Mirrored(cpu_replicas=2))]


def mirrored_in_subprocess(quick: bool, *, windows: int, window_seconds: float, tiny=False,
                           log=print) -> dict:
    """``mirrored_variants`` measured round robin in a fresh Python process: their rows."""
    with tempfile.TemporaryDirectory(prefix="bench-mirrored-") as tmp:
        out = Path(tmp) / "mirrored.json"
        cmd = [sys.executable, "-m", "benchmarks.scale", "--mirrored", "--out", str(out),
               "--windows", str(windows), "--window-seconds", str(window_seconds)]
        cmd += ["--quick"] * quick + ["--tiny"] * tiny
        # stderr passes through: the child's progress lines appear in the harness's log.
        p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed with exit code {p.returncode}")
        return json.loads(out.read_text())


def measure_cpu(variants, *, windows: int, window_seconds: float, log) -> dict:
    """``common.measure``'s rows, each with the CPU time per step of its timed windows
    (``cpu_ms_per_step``, window by window, and ``cpu_ms_per_step_median``)."""
    rows = measure(variants, windows=windows, window_seconds=window_seconds, log=log)
    for r in rows.values():
        if r.get("cpu_ms_per_step"):
            r["cpu_ms_per_step"] = r["cpu_ms_per_step"][-windows:]  # not the set-up's runs
            r["cpu_ms_per_step_median"] = statistics.median(r["cpu_ms_per_step"])
    return rows


def run_group(quick: bool = False, *, windows: int, window_seconds: float, tiny: bool = False,
              directory=None, only=None, log=print) -> dict:
    """All of group F (``only``: the subgroups named, ``"mirrored"`` for the child process's
    pair): each subgroup timed round robin, then the mirrored pair in a child process.

    Twice the ``windows`` of half the ``window_seconds``: the same time, twice the pairs
    of windows run back to back, whose ratios' median is all the more robust.
    """
    windows, window_seconds = 2 * windows, window_seconds / 2
    rows = {}
    for sub, group in variants(quick, directory=directory, tiny=tiny).items():
        if only is None or sub in only:
            log(f"group F, {sub}: {len(group)} variants")
            rows.update(measure_cpu(group, windows=windows, window_seconds=window_seconds,
                                    log=log))
    if only is None or "mirrored" in only:
        log("group F, mirrored over 2 logical CPUs: in a child process")
        rows.update(mirrored_in_subprocess(quick, windows=windows,
                                           window_seconds=window_seconds, tiny=tiny, log=log))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mirrored", action="store_true",
                        help="time only the mirrored pair (what the harness runs in a child)")
    parser.add_argument("--quick", action="store_true", help="bench's quick B")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the tests)")
    parser.add_argument("--windows", type=int, default=7,
                        help="as bench's (the group times twice as many, half as long)")
    parser.add_argument("--window-seconds", type=float, default=0.7)
    parser.add_argument("--only", help="comma-separated subgroups (precision, streaming, "
                        "accumulation, auto/dense, auto/dense-nodropout, auto/B-bf16, mirrored)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if args.mirrored:
        from trainer.distribute import split_cpu

        split_cpu(2)  # before anything runs TensorFlow
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    if args.mirrored:
        rows = measure_cpu(mirrored_variants(args.quick, tiny=args.tiny), windows=args.windows,
                           window_seconds=args.window_seconds, log=log)
    else:
        rows = run_group(args.quick, windows=args.windows, window_seconds=args.window_seconds,
                         tiny=args.tiny, log=log,
                         only=args.only.split(",") if args.only else None)
    text = json.dumps(rows, indent=2, sort_keys=True) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return rows


if __name__ == "__main__":
    main()
