"""The figures of ``docs/results.md``, measured again: run this after any change that can move
them, and commit the page it writes.

    python scripts/results.py                  # everything: about 8 minutes on 2 cores
    python scripts/results.py --only dense     # one section (dense, cnn, precision, replicas)
    python scripts/results.py --seeds 2 --out /tmp/results.md

Every run is the real command (``python -m trainer ...``) in a subprocess, into a scratch
directory; its figures are read back from the run's ``metrics.json`` and its wall-clock time
measured around the process. The page names the date, the machine and the versions, so a
reader knows what the figures describe. Sections not measured (``--only``) keep the text
they had in the page being replaced.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "results.md"
SECTIONS = ("dense", "cnn", "precision", "replicas")
#: Two epochs: the replicas' table compares the ends of short runs.
SHORT = ["+experiment=dense", "trainer.epochs=2"]


def machine() -> str:
    """``2-core AMD EPYC ..., 24 GB, no GPU, Python 3.11.7, TensorFlow 2.21.0, Keras 3.15.1``."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench import machine as facts

    m = facts()
    try:
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
        memory = f", {round(kib / 2**20)} GB"
    except (OSError, StopIteration, ValueError):
        memory = ""
    return (f"{m['cores']}-core {m['cpu']}{memory}, no GPU, Python {m['python']}, "
            f"TensorFlow {m['tensorflow']}, Keras {m['keras']}")


#: Overrides added to every run (``--extra``: a quick check of the script itself).
EXTRA: list[str] = []


def train(*overrides: str, work: Path, module: str = "trainer", workers: int = 0) -> dict:
    """One real run; its ``metrics.json`` plus ``wall_seconds``."""
    overrides = (*overrides, *EXTRA)
    run_dir = Path(tempfile.mkdtemp(dir=work))
    if workers:
        cmd = [sys.executable, "-m", "trainer.launch", "--workers", str(workers), "--",
               *overrides, f"hydra.run.dir={run_dir}"]
    else:
        cmd = [sys.executable, "-m", module, *overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {p.returncode}:\n{p.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"  {' '.join(overrides)}: val/accuracy {metrics.get('val/accuracy', 0):.4f}, "
          f"{wall:.1f} s", file=sys.stderr)
    return {**metrics, "wall_seconds": wall}


def import_seconds(rounds: int = 3) -> float:
    """The median time of ``python -c 'import tensorflow'`` in a fresh process."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import tensorflow"], check=True,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def seed_range(n: int) -> str:
    return "seed 0" if n == 1 else f"seeds 0-{n - 1}"


def span(values, digits: int) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.{digits}f}" if f"{lo:.{digits}f}" == f"{hi:.{digits}f}" else (
        f"{lo:.{digits}f}-{hi:.{digits}f}")


# --- the sections: measure, then render as markdown --------------------------------------
def dense(work: Path, seeds: int) -> str:
    runs = [train("+experiment=dense", f"seed={s}", work=work) for s in range(seeds)]
    acc = [r["val/accuracy"] for r in runs]
    rows = "\n".join(f"| {s} | {r['val/accuracy']:.4f} | {r['val/loss']:.4f} | "
                     f"{r['wall_seconds']:.1f} | {r['time/train_seconds']:.2f} |"
                     for s, r in enumerate(runs))
    return f"""## The dense experiment

`python -m trainer +experiment=dense seed=S` (MLP 64-256-128-10, dropout 0.1, Adam 1e-3,
batch 64, 40 epochs, 920 steps), {seed_range(seeds)}: validation accuracy
**{acc[0]:.4f}** with the shipped defaults (seed 0), {span(acc, 4)} over the seeds; the whole
command took {span([r['wall_seconds'] for r in runs], 1)} s wall clock, of which importing
TensorFlow is {import_seconds():.1f} s (`python -c "import tensorflow"`) and training
{span([r['time/train_seconds'] for r in runs], 2)} s (`time/train_seconds` in `metrics.json`;
most of it is tracing the step once).

| seed | val/accuracy | val/loss | wall clock (s) | time/train_seconds |
| --- | --- | --- | --- | --- |
{rows}
"""


def cnn(work: Path, seeds: int) -> str:
    seeds = min(seeds, 3)
    runs = [train("+experiment=cnn", f"seed={s}", work=work) for s in range(seeds)]
    dense_wall = train("+experiment=dense", work=work)["wall_seconds"]
    acc = ", ".join(f"{r['val/accuracy']:.4f}" for r in runs)
    ratio = statistics.median(r["wall_seconds"] for r in runs) / dense_wall
    return f"""## The convolutional experiment

`python -m trainer +experiment=cnn seed=S` (two Conv2D blocks on the digits as 8x8x1 images):
validation accuracy **{acc}** on {seed_range(seeds)}, {ratio:.1f}x the dense command's wall
time.
"""


def precision(work: Path, seeds: int) -> str:
    rows = []
    for p in ("float32", "mixed_bfloat16", "mixed_float16"):
        r = train("+experiment=dense", f"precision={p}", work=work)
        rows.append(f"| `precision={p}` | {r['val/accuracy']:.4f} | {r['val/loss']:.4f} |")
    body = "\n".join(rows)
    return f"""## Precisions

`python -m trainer +experiment=dense precision=P` (seed 0):

| precision | val/accuracy | val/loss |
| --- | --- | --- |
{body}
"""


def replicas(work: Path, seeds: int) -> str:
    ways = [("one device", []),
            ("`distribute=mirrored distribute.cpu_replicas=2`",
             ["distribute=mirrored", "distribute.cpu_replicas=2"]),
            ("`python -m trainer.launch --workers 2`", "workers"),
            ("`trainer.accumulate_steps=4`", ["trainer.accumulate_steps=4"])]
    rows = []
    for name, extra in ways:
        cells = []
        for dropout in ("0.1", "0"):
            over = [*SHORT, f"model.dropout={dropout}"]
            r = (train(*over, work=work, workers=2) if extra == "workers"
                 else train(*over, *extra, work=work))
            cells.append(f"{r['val/loss']:.4f} | {r['train/loss']:.8f}")
        rows.append(f"| {name} | {' | '.join(cells)} |")
    body = "\n".join(rows)
    return f"""## Replicas, workers, accumulation and dropout

`python -m trainer +experiment=dense trainer.epochs=2 model.dropout=D` and the same over 2
replicas, 2 workers and 4 micro-batches: the losses at the end. Without random layers every
way ends where one device does; with Keras' `Dropout`, which draws its mask for the rows it is
called on, they do not (see [Scaling out](scaling.md#several-devices-distributemirrored)).

| run | val/loss, dropout 0.1 | train/loss, dropout 0.1 | val/loss, dropout 0 | \
train/loss, dropout 0 |
| --- | --- | --- | --- | --- |
{body}
"""


MEASURE = {"dense": dense, "cnn": cnn, "precision": precision, "replicas": replicas}


def render(sections: dict[str, str], *, date: str, machine: str) -> str:
    """The page: a header naming the command, the date and the machine, then the sections
    in their fixed order."""
    body = "".join(sections[name] for name in SECTIONS if name in sections).rstrip("\n")
    return f"""# Results

Measured by `python scripts/results.py`, which wrote every figure on this page; run it again
after a change that can move them, and commit the page. Each section says when it was
measured; the page was last written on {date}, on this machine:

> {machine}

{body}
"""


def previous_sections(text: str) -> dict[str, str]:
    """The sections of an existing page, keyed like ``SECTIONS`` (by their order)."""
    parts = re.split(r"(?m)^(?=## )", text)[1:]
    titles = {"The dense": "dense", "The convolutional": "cnn", "Precisions": "precision",
              "Replicas": "replicas"}
    out = {}
    for part in parts:
        for prefix, name in titles.items():
            if part.startswith(f"## {prefix}"):
                out[name] = part.rstrip("\n") + "\n\n"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/results.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=SECTIONS,
                   help="measure only this section (repeatable); the others are kept")
    p.add_argument("--seeds", type=int, default=8, help="seeds of the dense experiment (8)")
    p.add_argument("--out", type=Path, default=PAGE, help=f"the page (default {PAGE})")
    p.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                   help="an override added to every run (a quick check: trainer.epochs=1)")
    args = p.parse_args(argv)
    EXTRA[:] = args.extra
    sections = previous_sections(args.out.read_text()) if args.out.exists() else {}
    date = datetime.date.today().isoformat()
    with tempfile.TemporaryDirectory() as work:
        for name in args.only or SECTIONS:
            print(f"{name}:", file=sys.stderr)
            text = MEASURE[name](Path(work), args.seeds)
            sections[name] = f"{text}\nMeasured on {date}.\n\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(sections, date=date, machine=machine()))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
