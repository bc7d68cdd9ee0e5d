"""The Edge of Stability figure and table of ``docs/sharpness.md``, measured again.

    python scripts/edge_of_stability.py                    # the shipped step sizes
    python scripts/edge_of_stability.py --rates 0.2 --steps 500 --out /tmp/eos

Runs ``python -m trainer +experiment=edge_of_stability optimizer.learning_rate=ETA`` for
each step size, in a subprocess, into a scratch directory (or ``--out``); reads each run's
``sharpness/top_eigenvalue`` and ``loss`` back from its event files; prints the table of
the plateau (the median sharpness over the last half of the run) divided by ``2/eta``;
and draws ``docs/images/edge_of_stability.png`` (sharpness and training loss against the
step, with the ``2/eta`` lines). Needs matplotlib (``pip install matplotlib``), which the
framework and its tests do not.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "docs" / "images" / "edge_of_stability.png"
RATES = (0.2, 0.15)
STEPS = 1500


def run(rate: float, steps: int, out: Path) -> Path:
    """One run of the experiment at step size ``rate``; returns its directory."""
    run_dir = out / f"eta_{rate}"
    cmd = [sys.executable, "-m", "trainer", "+experiment=edge_of_stability",
           f"optimizer.learning_rate={rate}", f"trainer.epochs={steps}",
           f"hydra.run.dir={run_dir}"]
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, cwd=out, stdout=subprocess.DEVNULL)
    print(f"eta={rate}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return run_dir


def curves(run_dir: Path) -> dict:
    """``{"sharpness": [(step, value)], "loss": [(step, value)]}`` from the run's event files."""
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.util import tensor_util

    acc = pea.EventAccumulator(str(run_dir / "tb" / "train"),
                               size_guidance={pea.TENSORS: 0})
    acc.Reload()

    def read(tag):
        return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
                for e in acc.Tensors(tag)]

    return {"sharpness": read("sharpness/top_eigenvalue"), "loss": read("loss")}


def plateau(points, steps: int) -> float:
    """The median of the measurements over the last half of the run."""
    return statistics.median(v for s, v in points if s >= steps // 2)


def first_crossing(points, level: float):
    """The first step whose measurement reached ``level`` (None if none did)."""
    return next((s for s, v in points if v >= level), None)


def draw(results: dict, steps: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for i, (rate, data) in enumerate(sorted(results.items())):
        color = f"C{i}"
        s, v = zip(*data["sharpness"])
        top.plot(s, v, color=color, label=f"η = {rate}")
        top.axhline(2 / rate, color=color, linestyle="--", linewidth=1)
        s, v = zip(*data["loss"])
        bottom.plot(s, v, color=color, linewidth=1)
    top.set_ylabel("sharpness (top Hessian eigenvalue)")
    top.set_title("Full-batch GD, tanh MLP 64-200-200-5, digits 0-4 (dashed: 2/η)")
    top.legend()
    bottom.set_ylabel("training loss")
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    bottom.set_xlim(0, steps)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"wrote {path}", file=sys.stderr)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=list(RATES))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    parser.add_argument("--image", type=Path, default=IMAGE)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        out = (args.out or Path(scratch)).resolve()
        out.mkdir(parents=True, exist_ok=True)
        results = {rate: curves(run(rate, args.steps, out)) for rate in args.rates}
    print("| η | 2/η | first step at 0.8 x 2/η | plateau (median, last half) | plateau / (2/η) |")
    print("| --- | --- | --- | --- | --- |")
    for rate, data in sorted(results.items()):
        level = plateau(data["sharpness"], args.steps)
        crossing = first_crossing(data["sharpness"], 0.8 * 2 / rate)
        print(f"| {rate} | {2 / rate:.3g} | {crossing} | {level:.2f} | {level * rate / 2:.3f} |")
    draw(results, args.steps, args.image)


if __name__ == "__main__":
    main()
