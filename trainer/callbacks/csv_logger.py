"""``CsvLogger``: the run's logged points in a plain CSV file, one row per logged step."""

from __future__ import annotations

import csv
from pathlib import Path

from trainer.callbacks.base import resolve
from trainer.callbacks.metric_logger import MetricLogger
from trainer.common.atomic import atomic_write

STEP = "step"


class CsvLogger(MetricLogger):
    """Writes ``metrics.csv``: a ``step`` column, then one column per log key in the order
    the keys were first logged; one row per global step at which anything was logged
    (an execution's end, and the epoch's end at the same step, share a row), an empty
    cell where a key was not logged at that step.

    A row is appended when the next step's points arrive (and at the end of fit); a key
    first logged later (the first epoch's ``val/loss``) widens the header, and the file is
    written again whole, atomically. A resumed run keeps the rows up to the global step
    it resumes from and drops the interrupted run's later ones, so each step has one row,
    as TensorBoard shows it.

    Args:
        path: the CSV file, relative to the run directory unless absolute.
    """

    def __init__(self, *, path: str = "metrics.csv"):
        self.path = path
        self._file: Path | None = None
        self._columns: list[str] = []
        self._pending: dict | None = None  # the latest step's row, until the next step

    def on_fit_start(self, trainer):
        self._file = resolve(trainer, self.path)
        self._file.parent.mkdir(parents=True, exist_ok=True)
        self._pending = None
        header, rows = _read(self._file)
        self._columns = header
        if not rows:
            return
        step = trainer.current_step
        kept = [r for r in rows if int(r[STEP]) < step]
        at_step = [r for r in rows if int(r[STEP]) == step]
        if at_step:  # open again: an epoch evaluated again at this step replaces its values
            self._pending = {k: v for k, v in at_step[-1].items() if v != ""}
        if len(kept) != len(rows):
            self._rewrite(kept)

    def write(self, step, metrics):
        if self._pending is not None and int(self._pending[STEP]) != step:
            self._flush()
        if self._pending is None:
            self._pending = {STEP: step}
        self._pending.update(metrics)

    def on_epoch_end(self, trainer, epoch, logs):
        super().on_epoch_end(trainer, epoch, logs)
        self._flush()  # the step's row is complete: the next execution ends at a later step

    def on_fit_end(self, trainer, logs):
        self._flush()

    def _flush(self) -> None:
        row, self._pending = self._pending, None
        if row is None or self._file is None:
            return
        new = [k for k in row if k not in self._columns]
        if new or not self._file.exists():
            _, rows = _read(self._file)
            self._columns = [*self._columns, *new]  # a row's first key is its step
            self._rewrite([*rows, row])
            return
        with self._file.open("a", newline="") as f:
            csv.DictWriter(f, self._columns).writerow(row)

    def _rewrite(self, rows: list[dict]) -> None:
        def write(path):
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, self._columns)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self._file, write)


def _read(path: Path) -> tuple[list[str], list[dict]]:
    """``path``'s header and rows (empty when there is no file)."""
    if not path.exists():
        return [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows
