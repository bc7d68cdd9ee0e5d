"""The performance harness, one command: ``python -m benchmarks.bench [--quick]``.

Runs every case in this one process. Within a group the variants (``model.fit``,
hand-written loops, the trainer) are set up and warmed up (compiled, one epoch),
then timed in windows, round robin, so a change in the machine's load hits all
of them alike. Prints a table, writes JSON (``benchmarks/results.json``) and the
Markdown report (``benchmarks/RESULTS.md``) with the ratios against the targets.

Cases: A overhead-bound MLP 32-64-64-1 (steps_per_execution 1, 32, 256);
B compute-bound MLP 784-1024-1024-10 and the machine's matmul peak; C the
input-gradient penalty on A and B, every step and every 16; D overheads
(TensorBoard, checkpoints, per-layer health, the progress line, eager, time to first
step); E endurance (resident memory and open file handles over 5,000 steps of nested- and
persistent-tape steps with TensorBoard and checkpoints on, in a child process:
``benchmarks/endurance.py``); F scale (mixed precision, TFRecord shards, gradient
accumulation, a mirrored strategy in a child process, jit_compile=auto's choice:
``benchmarks/scale.py``); S SAM's step (``step=sam``) against the plain step on B.
``--groups F --merge`` adds one group's results to the recorded ones.

The top of benchmarks/: the timing (``measure``), the workloads and the machine's facts it
shares with the other groups are in ``benchmarks/common.py``, whose docstring draws the
modules' layers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The primitives every group shares; machine() is also read by scripts/results.py from here.
from benchmarks.common import load, machine, measure, workloads

HERE = Path(__file__).resolve().parent

ALL_KINDS = (("iterator", False), ("memory", False), ("memory", True))


def _contest(w, spe, *, fit=True, kinds=ALL_KINDS):
    """model.fit (with and without XLA), hand-written loops and the trainer of each kind."""
    from benchmarks.variants import FitVariant, HandVariant, TrainerVariant

    name = f"{w.name}/spe{spe}"
    out = []
    if fit:
        out += [FitVariant(f"{name}/fit", w, spe, xla=False),
                FitVariant(f"{name}/fit-xla", w, spe, xla=True)]
    for source, jit in kinds:
        tag = source + ("-xla" if jit else "")
        out.append(HandVariant(f"{name}/hand-{tag}", w, spe, source=source, xla=jit))
        out.append(TrainerVariant(f"{name}/trainer-{tag}", w, spe, source=source, xla=jit))
    return out


def plan(quick: bool) -> dict:
    """The groups of variants timed round robin together, by group name.

    ``quick`` keeps every case but fewer variants: the full contest at
    steps_per_execution=32 only, and the XLA kinds elsewhere.
    """
    from benchmarks.progress import progress_on_a_pty
    from benchmarks.variants import MatmulPeak, TrainerVariant
    from trainer import CheckpointCallback, HealthCallback, TensorBoardCallback

    w = workloads(quick)
    xla_only = (("memory", True),)
    groups = {}
    a = []
    for spe in (1, 32, 256):
        a += _contest(w["A"], spe, kinds=ALL_KINDS if spe == 32 or not quick else xla_only)
        # Trainer(steps_per_execution=spe) and nothing else: the data's and XLA's defaults.
        a.append(TrainerVariant(f"A/spe{spe}/trainer-default", w["A"], spe, label="default"))
    a.append(TrainerVariant("A/spe-auto/trainer-memory-xla", w["A"], "auto", source="memory",
                            xla=True))
    a.append(TrainerVariant("A/spe-auto/trainer-default", w["A"], "auto", label="default"))
    for key in ("A+gp", "A+gp/16"):
        a += _contest(w[key], 32, fit=not quick, kinds=xla_only if quick else ALL_KINDS)
    groups["A"] = a
    b = [MatmulPeak("B/matmul-peak", 512 if quick else 2048)]
    for key in ("B", "B+gp", "B+gp/16"):
        kinds = ALL_KINDS if not quick else ALL_KINDS[1:] if key == "B" else xla_only
        b += _contest(w[key], 32, fit=key == "B" or not quick, kinds=kinds)
    groups["B"] = b
    run_dir = Path(tempfile.mkdtemp(prefix="bench-"))
    d = w["D"]
    groups["D"] = [
        TrainerVariant("D/trainer-default", d, "auto"),
        TrainerVariant("D/trainer-default+tensorboard", d, "auto", run_dir=str(run_dir / "tb"),
                       callbacks=[TensorBoardCallback]),
        TrainerVariant("D/trainer-default+checkpoint", d, "auto", run_dir=str(run_dir / "ck"),
                       callbacks=[CheckpointCallback]),
        TrainerVariant("D/trainer-default+health", d, "auto", run_dir=str(run_dir / "health"),
                       callbacks=[HealthCallback]),
        TrainerVariant("D/trainer-default+progress", d, "auto", callbacks=[progress_on_a_pty]),
        # One step per execution: the line's cost per execution, where redraws are throttled.
        TrainerVariant("D/trainer-spe1", d, 1),
        TrainerVariant("D/trainer-spe1+progress", d, 1, callbacks=[progress_on_a_pty]),
        TrainerVariant("D/trainer-spe32", w["D-eager"], 32),
        TrainerVariant("D/trainer-spe32-eager", w["D-eager"], 32, eager=True),
    ]
    # SAM's two gradients per update against the plain step, same source, no XLA.
    groups["S"] = [TrainerVariant(f"S/{key}/spe32/trainer-memory", w[key], 32, source="memory",
                                  xla=False) for key in ("B", "B+sam")]
    return groups


def time_to_first_step(jit_compile: bool) -> dict:
    """Seconds to compose the config, build the objects, and finish the first execution
    (trace and compile included), as ``python -m trainer`` does them."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from trainer.callbacks import Callback
    from trainer.driver.run import build
    from trainer.driver.schemas import register_configs

    class First(Callback):
        def on_execution_end(self, trainer, step, logs):
            if not hasattr(self, "at"):
                self.at = time.perf_counter()

    t0 = time.perf_counter()
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("trainer.configs", version_base="1.3"):
        cfg = compose("config", overrides=[
            "+experiment=dense", "callbacks=none", "trainer.max_steps=1",
            f"trainer.jit_compile={str(jit_compile).lower()}"])
    GlobalHydra.instance().clear()
    t1 = time.perf_counter()
    r = build(cfg, run_dir=tempfile.mkdtemp(prefix="bench-"))
    first = First()
    r.trainer.callbacks.append(first)
    t2 = time.perf_counter()
    r.trainer.fit(r.step, r.data)
    return {"compose_s": t1 - t0, "build_s": t2 - t1, "first_execution_s": first.at - t2,
            "total_s": first.at - t0}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small data, short windows, short endurance runs: a smoke test "
                        "of about 3 minutes")
    parser.add_argument("--windows", type=int, help="timed windows per variant (7; quick 2)")
    parser.add_argument("--window-seconds", type=float,
                        help="seconds per window (0.7; quick 0.1)")
    parser.add_argument("--groups", default="A,B,D,E,F,S", help="groups to run (default "
                        "A,B,D,E,F,S; C is timed within A and B)")
    parser.add_argument("--only", help="comma-separated variant names: time only these "
                        "(side by side, as in a full run), e.g. D/trainer-default,"
                        "D/trainer-default+health; with --out and --markdown elsewhere")
    parser.add_argument("--merge", action="store_true", help="keep the other groups' results "
                        "from the existing JSON output (and report all of them)")
    parser.add_argument("--out", type=Path, help="JSON output (benchmarks/results.json; quick: "
                        "benchmarks/quick.json)")
    parser.add_argument("--markdown", type=Path, help="report (benchmarks/RESULTS.md; quick: "
                        "none)")
    args = parser.parse_args(argv)
    windows = args.windows or (2 if args.quick else 7)
    window_seconds = args.window_seconds or (0.1 if args.quick else 0.7)
    out = args.out or HERE / ("quick.json" if args.quick else "results.json")
    markdown = args.markdown or (None if args.quick else HERE / "RESULTS.md")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    import keras
    import tensorflow as tf

    from benchmarks.report import markdown_report, merge, summarize, table

    # Dozens of trainers trace the same loop code here, which TensorFlow reports as retracing.
    tf.get_logger().setLevel("ERROR")

    started = time.perf_counter()
    result = {"machine": machine(), "load_before": load(),
              "settings": {"quick": args.quick, "windows": windows,
                           "window_seconds": window_seconds, "groups": args.groups.split(",")},
              "first_step": {}, "groups": {}}
    log(f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; "
        f"{result['load_before']}")
    if "D" in args.groups and not args.only:
        for jit in (False, True):
            result["first_step"]["xla" if jit else "compiled"] = time_to_first_step(jit)
    groups = plan(args.quick)
    if args.only:
        names = set(args.only.split(","))
        groups = {k: [v for v in vs if v.name in names] for k, vs in groups.items()}
    for name in args.groups.split(","):
        if name == "E":  # not timed windows: one long run per step, measured as it goes
            from benchmarks.endurance import run_in_subprocess

            log("group E: endurance, in a child process")
            result["endurance"] = run_in_subprocess(args.quick, log=log)
            continue
        if name == "F":  # in-process variants, then a mirrored pair in a child process
            from benchmarks.scale import run_group

            log("group F: scale")
            result["groups"]["F"] = run_group(args.quick, windows=windows,
                                              window_seconds=window_seconds, log=log)
            continue
        log(f"group {name}: {len(groups[name])} variants")
        result["groups"][name] = measure(groups.pop(name), windows=windows,
                                         window_seconds=window_seconds, log=log)
        gc.collect()
        keras.backend.clear_session()
    result["load_after"] = load()
    result["seconds"] = time.perf_counter() - started
    if args.merge and out.exists():
        result = merge(json.loads(out.read_text()), result)
    result["cases"], result["targets"] = summarize(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(table(result))
    if markdown is not None:
        markdown.write_text(markdown_report(result))
    log(f"wrote {out}" + (f" and {markdown}" if markdown else "") +
        f" in {result['seconds']:.0f}s")
    return result


if __name__ == "__main__":
    main()
