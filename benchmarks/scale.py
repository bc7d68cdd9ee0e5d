"""Group F, "scale": mixed precision, streaming from shards, gradient accumulation, a
mirrored strategy, and ``jit_compile=auto``'s choice. Rows in the format of
``bench.py``'s groups; ``report.py`` reads the targets off them (``summarize``) and
writes their section of RESULTS.md (``report_lines``).

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

from benchmarks.streaming import ShardVariant
from benchmarks.variants import HandVariant, TrainerVariant, Workload, _TrainerClock

ROOT = Path(__file__).resolve().parents[1]
DENSE_EXPERIMENT = ROOT / "configs" / "experiment" / "dense.yaml"
DIGITS_TRAIN = 1437  # the digits' training split (1,797 at val_fraction 0.2)
ACCUMULATE = 4
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
    from benchmarks.bench import workloads

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

        import trainer.trainer as trainer_module
        from trainer import TapeStep, Trainer
        from trainer.data import DataModule
        from trainer.distribute import NoDistribution
        from trainer.optim import LossScale

        w = self.workload
        x, y = w.arrays()
        in_memory = {"memory": True, "iterator": False}.get(self.source, "auto")
        n = self.val_examples
        self.data = DataModule(x_train=x, y_train=y, x_val=x[:n], y_val=y[:n], task=w.task,
                               batch_size=w.batch_size, in_memory=in_memory)
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
    ``trainer.distribute.split_cpu(2)`` before TensorFlow starts."""
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
    """``bench.measure``'s rows, each with the CPU time per step of its timed windows
    (``cpu_ms_per_step``, window by window, and ``cpu_ms_per_step_median``)."""
    from benchmarks.bench import measure

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


# --- the report ------------------------------------------------------------------------------
def _ratio(a, b):
    from benchmarks.report import ratio

    return ratio(a, b) if a and b else None


def _by(group: dict, prefix: str, suffix: str):
    """The row of ``group`` whose name starts with ``prefix`` and ends with ``suffix``."""
    return next((r for name, r in group.items()
                 if name.startswith(prefix) and name.endswith(suffix)), None)


def cpu_flags() -> set:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def summarize(group: dict, target) -> dict:
    """Group F's case, calling ``target(case, what, value, op, threshold)`` for each target."""
    case = {"cpu_avx512_bf16": "avx512_bf16" in cpu_flags()}
    fp32, bf16, hand, hand32, fp16 = (
        _by(group, "F/precision/", s) for s in ("/trainer-memory", "/trainer-memory-bf16",
                                                "/hand-memory-bf16", "/hand-memory",
                                                "/trainer-memory-fp16"))
    case["bf16_vs_fp32"] = _ratio(bf16, fp32)
    case["bf16_trainer_vs_hand"] = _ratio(bf16, hand)
    case["hand_bf16_vs_fp32"] = _ratio(hand, hand32)
    case["fp32_trainer_vs_hand"] = _ratio(fp32, hand32)
    case["fp16_vs_fp32"] = _ratio(fp16, fp32)
    target("F", "B mixed_bfloat16 / float32 (trainer, memory)", case["bf16_vs_fp32"], ">=", 1.4)
    target("F", "B mixed_bfloat16 trainer/hand (memory)", case["bf16_trainer_vs_hand"], ">=",
           0.95)
    memory, iterator, shards = (_by(group, "F/streaming/", s) for s in (
        "/trainer-memory", "/trainer-iterator", "/trainer-tfrecord"))
    case["tfrecord_vs_memory"] = _ratio(shards, memory)
    case["tfrecord_vs_iterator"] = _ratio(shards, iterator)
    case["iterator_vs_memory"] = _ratio(iterator, memory)
    target("F", "B TFRecord shards / memory (trainer)", case["tfrecord_vs_memory"], ">=", 0.9)
    target("F", "B TFRecord shards / tf.data iterator (trainer)", case["tfrecord_vs_iterator"],
           ">=", 0.9)
    plain = _by(group, "F/accumulation/B/", "/trainer-memory")
    accum = _by(group, f"F/accumulation/B-accum{ACCUMULATE}/", "/trainer-memory")
    case["accumulate_micro_vs_plain"] = _ratio(accum, plain)
    target("F", f"B accumulate_steps={ACCUMULATE}: micro-batches/s / plain steps/s",
           case["accumulate_micro_vs_plain"], ">=", 0.95)
    one, two = (_by(group, "F/mirrored/", s) for s in ("/trainer-memory-1device",
                                                       "/trainer-memory-mirrored2"))
    case["mirrored2_vs_one_device"] = _ratio(two, one)
    auto = {}
    labels = sorted({n.split("/")[2] for n in group if n.startswith("F/auto/")})
    for label in labels:
        rows = {k: group.get(f"F/auto/{label}/jit-{k}") for k in ("false", "true", "auto")}
        if not all(rows.values()):
            continue
        faster = "true" if rows["true"]["median"] > rows["false"]["median"] else "false"
        entry = {
            "steps_per_s": {k: r["median"] for k, r in rows.items()},
            "xla_vs_no_xla": _ratio(rows["true"], rows["false"]),
            "faster_fixed": faster,
            "auto_chose": "true" if rows["auto"]["xla"] else "false",
            "auto_vs_faster": _ratio(rows["auto"], rows[faster]),
            "calibration_ms_per_step": rows["auto"].get("calibration_ms_per_step"),
            "cpu_ms_per_step": {k: r.get("cpu_ms_per_step_median") for k, r in rows.items()},
        }
        auto[label] = entry
        target("F", f"jit_compile=auto / faster fixed ({label}; auto chose "
               f"{'XLA' if entry['auto_chose'] == 'true' else 'no XLA'})",
               entry["auto_vs_faster"], ">=", 0.95)
    case["auto"] = auto
    return case


READING = """\
Reading F:

- bf16: the matmuls run about twice as fast in bfloat16 on this CPU (avx512_bf16), while
  Adam's float32 update of the 1.9M parameters, memory-bound and about a quarter of the
  float32 step, does not change; the hand-written loop gains what the trainer gains.
  float16 has no fast CPU kernels (and pays the loss scale's checks).
- TFRecord: reading, shuffling and parsing 256 records costs about 1.2 ms of CPU per batch
  (the in-memory arrays through tf.data: about 0.15 ms), taken from the two cores the
  step's matmuls use: the CPU column shows the difference per step.
- Accumulation: the micro-batches can outrun plain steps, because the optimizer's update
  runs once per 4 micro-batches.
- Mirrored: two replicas on two cores split each product in two and add an all-reduce of
  the gradients, where one device already used both cores.
- `jit_compile=auto` times executions inside one epoch (at most 100 steps, the epoch's
  full batches); per-epoch costs (the evaluation, the short last batch's separate call)
  are not in that measurement and weigh most on short epochs such as the digits' 23."""


def report_lines(result: dict) -> list:
    """The F section of RESULTS.md."""
    f = result["cases"].get("F")
    if not f:
        return []

    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    out = ["", "## F: scale", "",
           "B (MLP 784-1024-1024-10, batch 256, `steps_per_execution=32`, in memory, no XLA) "
           "unless said otherwise. Each subgroup (the prefix after `F/`) is timed round robin "
           "on its own with its own float32 baseline, in twice the windows of half the "
           "length (the same time, twice the back-to-back pairs); ratios are medians of the "
           "paired windows' ratios.", "",
           f"- Precision (this CPU {'has' if f['cpu_avx512_bf16'] else 'lacks'} avx512_bf16): "
           f"mixed_bfloat16 / float32 {fmt(f['bf16_vs_fp32'])} (the hand-written loop's: "
           f"{fmt(f['hand_bf16_vs_fp32'])}), trainer / hand-written loop "
           f"{fmt(f['bf16_trainer_vs_hand'])} in bf16, {fmt(f['fp32_trainer_vs_hand'])} in "
           f"float32; mixed_float16 / float32 {fmt(f['fp16_vs_fp32'])} (no float16 matmul "
           "kernels of use on CPU: no target)",
           f"- TFRecord shards (8 on local disk, shuffle buffer 10,000): / in memory (fused) "
           f"{fmt(f['tfrecord_vs_memory'])}, / the arrays through tf.data (iterator) "
           f"{fmt(f['tfrecord_vs_iterator'])}; iterator / in memory "
           f"{fmt(f['iterator_vs_memory'])}",
           f"- accumulate_steps={ACCUMULATE} at batch {256 * ACCUMULATE} (micro-batches of 256) "
           f"/ batch 256: {fmt(f['accumulate_micro_vs_plain'])} in micro-batches per second",
           f"- Mirrored over 2 logical CPUs / one device (in a child process): "
           f"{fmt(f['mirrored2_vs_one_device'])} (2 cores: no gain expected, no target)",
           "", READING,
           "", "`jit_compile=auto` (dense: the dense experiment's model and batch size on "
           "random data of the digits' size; B-bf16: B under mixed_bfloat16):", "",
           "| model | steps/s: false | true | auto | auto chose | faster fixed | auto / "
           "faster | true / false | CPU ms/step: false, true | calibration ms/step: "
           "XLA, no XLA |",
           "|---|---:|---:|---:|---|---|---:|---:|---|---|"]
    for label, e in f["auto"].items():
        s, cal = e["steps_per_s"], e.get("calibration_ms_per_step") or {}
        cpu = e.get("cpu_ms_per_step") or {}
        timing = f"{cal['xla']:.3f}, {cal['no_xla']:.3f}" if cal else "-"
        cpus = (f"{cpu['false']:.3f}, {cpu['true']:.3f}" if cpu.get("false") and cpu.get("true")
                else "-")
        out.append(f"| {label} | {s['false']:,.0f} | {s['true']:,.0f} | {s['auto']:,.0f} | "
                   f"{e['auto_chose']} | {e['faster_fixed']} | {fmt(e['auto_vs_faster'])} | "
                   f"{fmt(e['xla_vs_no_xla'])} | {cpus} | {timing} |")
    rows = result.get("groups", {}).get("F", {})
    if rows:
        out += ["", "Every F variant, with the process's CPU time per step (all threads; "
                "other processes stretch a window's wall time, hardly its CPU time):", "",
                "| variant | steps/s (median) | min | max | spread | CPU ms per step (median) |",
                "|---|---:|---:|---:|---:|---:|"]
        for name, r in rows.items():
            cpu = r.get("cpu_ms_per_step_median")
            unit = " (micro-batches)" if r.get("unit") == "micro-batches" else ""
            out.append(f"| {name}{unit} | {r['median']:,.1f} | {r['min']:,.1f} | "
                       f"{r['max']:,.1f} | {100 * r['spread']:.0f}% | "
                       f"{'-' if cpu is None else f'{cpu:.2f}'} |")
    return out


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
