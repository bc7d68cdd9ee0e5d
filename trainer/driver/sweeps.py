"""The runs of a sweep directory, read from their files and ranked
(``python -m trainer.summary``).

Each run directory below ``DIR`` (one with a ``.hydra/`` directory: ``<DIR>/<job number>``
by default) gives one line: its job, the objective, the main metrics of its
``metrics.json`` (``val/*`` and the experiments' own, ``train/loss``, the fit time) and the
overrides that differ between the runs (those shared by all are printed once above).
Runs without ``metrics.json`` are marked ``running`` (their process holds the run dir's
lock on this host) or ``failed`` (it failed, was stopped, or runs on another host) and
listed last.

The objective is ``--metric``, else the runs' ``optimized_metric``; the direction is
``--mode``, else the sweeper's (``hydra.sweeper.direction``, Optuna's) when the objective is
what it optimised, else ``max`` for accuracy-like names and ``min`` for the rest (losses,
errors). Runs tied on the objective are ordered by ``val/loss`` (lower first), then by job
number. Reads files only: TensorFlow is not imported.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import yaml

#: Name parts of metrics where higher is better; any other metric is minimised.
HIGHER_IS_BETTER = ("accuracy", "acc", "auc", "precision", "recall", "f1", "iou", "r2",
                    "coverage", "quality", "reward", "score")
#: Metrics shown after the objective and the validation metrics, when a run has them.
TRAIN_COLUMNS = ("train/loss", "time/fit_seconds")
#: Breaks a tie on the objective: lower first.
TIE_BREAK = "val/loss"
#: How deep below DIR run directories are looked for.
MAX_DEPTH = 3
LOCK_FILES = (".trainer.lock",)


@dataclass
class RunInfo:
    """One run directory of the sweep, as read from its files."""

    name: str  # the path below DIR: the job number by default
    path: Path
    overrides: list[str]
    config: dict
    hydra: dict
    metrics: dict | None = None
    status: str = "done"  # done, running or failed
    sort_key: tuple = field(default=())


def _load_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def find_runs(root: Path) -> list[Path]:
    """The run directories under ``root`` (``root`` itself if it is one), in path order."""
    found = []

    def walk(path: Path, depth: int):
        if (path / ".hydra").is_dir():
            found.append(path)
            return
        if depth >= MAX_DEPTH:
            return
        try:
            children = sorted(p for p in path.iterdir() if p.is_dir()
                              and not p.name.startswith("."))
        except OSError:
            return
        for child in children:
            walk(child, depth + 1)

    walk(root, 0)
    return found


def _lock_holder_alive(path: Path) -> bool:
    """Whether a process on this host named in the run dir's lock file is alive.

    Reads the file and never takes the lock: taking it, even briefly, could make a run
    starting in that directory fail as "in use".
    """
    host = socket.gethostname()
    for lock in [path / name for name in LOCK_FILES] + sorted(path.glob(".trainer-worker-*.lock")):
        try:
            text = lock.read_text()
        except OSError:
            continue
        match = re.match(r"process (\d+) on (\S+)", text.strip())
        if not match or match.group(2) != host:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            return True
        except ProcessLookupError:
            continue
        except PermissionError:  # alive, another user's
            return True
    return False


def read_run(root: Path, path: Path) -> RunInfo:
    name = path.relative_to(root).as_posix() if path != root else "."
    overrides = _load_yaml(path / ".hydra" / "overrides.yaml") or []
    info = RunInfo(name=name, path=path, overrides=[str(o) for o in overrides],
                   config=_load_yaml(path / ".hydra" / "config.yaml") or {},
                   hydra=(_load_yaml(path / ".hydra" / "hydra.yaml") or {}).get("hydra") or {})
    try:
        info.metrics = json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError):
        info.status = "running" if _lock_holder_alive(path) else "failed"
    return info


def higher_is_better(metric: str) -> bool:
    """Whether ``metric``'s name says higher is better (``val/accuracy``, ``val/auc``)."""
    words = re.split(r"[^a-z0-9]+", metric.rsplit("/", 1)[-1].lower())
    return any(word in HIGHER_IS_BETTER for word in words) and "error" not in words


def choose_objective(runs: list[RunInfo], metric: str | None, mode: str | None):
    """``(metric, mode, where the mode comes from)``; raises ``ValueError`` for no metric."""
    optimized = next((r.config.get("optimized_metric") for r in runs
                      if r.config.get("optimized_metric")), None)
    available = sorted({k for r in runs if r.metrics for k in r.metrics})
    if metric is None:
        metric = optimized or next((k for k in ("val/loss", "val/accuracy") if k in available),
                                   None)
        if metric is None:
            raise ValueError("no optimized_metric in the runs' configs; pass --metric "
                             f"(one of {', '.join(available) or 'none: no metrics.json yet'})")
    if available and metric not in available:
        raise ValueError(f"no run has {metric!r} in metrics.json; one of {', '.join(available)}")
    if mode is not None:
        return metric, mode, "--mode"
    direction = next((r.hydra.get("sweeper", {}).get("direction") for r in runs
                      if isinstance(r.hydra.get("sweeper"), dict)
                      and r.hydra["sweeper"].get("direction") is not None), None)
    if isinstance(direction, list) and direction:
        direction = direction[0]
    if metric == optimized and str(direction) in ("maximize", "minimize"):
        return metric, "max" if direction == "maximize" else "min", "hydra.sweeper.direction"
    return metric, "max" if higher_is_better(metric) else "min", "the metric's name"


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def sort_runs(runs: list[RunInfo], metric: str, mode: str) -> list[RunInfo]:
    """Best first; runs without a finite objective, then unfinished runs, last.

    Runs tied on the objective (an accuracy of 0.95 on a small validation set) are ordered
    by ``val/loss``, lower first (a run without a finite one last), then by job number.
    """
    sign = -1 if mode == "max" else 1

    def key(r: RunInfo):
        job = (0, int(r.name), "") if r.name.isdigit() else (1, 0, r.name)
        value = (r.metrics or {}).get(metric)
        if r.metrics is None:
            return (2, 0.0, 0.0, *job)
        if not _finite(value):
            return (1, 0.0, 0.0, *job)
        loss = r.metrics.get(TIE_BREAK)
        return (0, sign * value, loss if _finite(loss) else math.inf, *job)

    return sorted(runs, key=key)


def _columns(runs: list[RunInfo], metric: str) -> list[str]:
    keys = {k for r in runs if r.metrics for k, v in r.metrics.items() if _finite(v)}
    main = sorted(k for k in keys if k != metric and "/" in k
                  and k.split("/", 1)[0] not in ("train", "time", "params"))
    return [metric, *main, *(k for k in TRAIN_COLUMNS if k in keys and k != metric)]


def _short(override: str) -> str:
    """``key=0.0036000911929`` as ``key=0.0036``; the exact values are in .hydra/."""
    key, sep, value = override.partition("=")
    if sep and re.fullmatch(r"-?\d*\.\d{5,}(e-?\d+)?", value):
        return f"{key}={float(value):.4g}"
    return override


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}" if 1e-3 <= abs(value) < 1e3 or value == 0 else f"{value:.4g}"


def format_table(root: Path, runs: list[RunInfo], metric: str, mode: str, source: str) -> str:
    columns = _columns(runs, metric)
    common = [o for o in runs[0].overrides if all(o in r.overrides for r in runs)]
    done = sum(r.metrics is not None for r in runs)
    counts = f"{len(runs)} run{'s' * (len(runs) != 1)} ({done} done"
    counts += "".join(f", {n} {s}" for s in ("running", "failed")
                      if (n := sum(r.status == s for r in runs)))
    trials = next((r.hydra["sweeper"].get("n_trials") for r in runs
                   if isinstance(r.hydra.get("sweeper"), dict)
                   and isinstance(r.hydra["sweeper"].get("n_trials"), int)), None)
    if trials is not None:
        counts += f", of {trials} trials"
    lines = [f"{root}: {counts}), best first by {metric} ({mode}, from {source})"]
    best = _load_yaml(root / "optimization_results.yaml")
    if isinstance(best, dict) and "best_value" in best:
        lines.append(f"optuna best value: {_number(best['best_value'])} "
                     "(optimization_results.yaml)")
    if common and len(runs) > 1:
        lines.append("all runs: " + " ".join(common))
    header = ["job", *columns, "overrides"]
    rows = []
    for r in runs:
        if r.metrics is None:
            cells = [r.status, *([""] * (len(columns) - 1))]
        else:
            cells = [_number(r.metrics.get(c)) for c in columns]
        own = [_short(o) for o in r.overrides if o not in common or len(runs) == 1]
        rows.append([r.name, *cells, " ".join(own)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) if i < len(columns) else c.ljust(w)
                  for i, (c, w) in enumerate(zip(row[1:-1], widths[1:]))]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def summarize(directory: str | os.PathLike, metric: str | None = None,
              mode: str | None = None) -> str:
    """The summary of the sweep in ``directory`` as text; ``ValueError`` if there is none."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    runs = [read_run(root, p) for p in find_runs(root)]
    if not runs:
        raise ValueError(f"{root} holds no runs (no <job>/.hydra/ directory below it)")
    metric, mode, source = choose_objective(runs, metric, mode)
    return format_table(root, sort_runs(runs, metric, mode), metric, mode, source)
