"""The user's own data: NumPy .npz archives and CSV files with a header row."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from trainer.data.base import DataModule, split
from trainer.errors import UserError


def _existing(path: str | None, kind: str) -> Path:
    if not path or path == "???":
        raise UserError(f"data.path is not set; pass data.path=/path/to/file.{kind}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{p}: no such file; check data.path")
    return p


def _module(x, y, x_val, y_val, *, name, task, val_fraction, split_seed, **kw) -> DataModule:
    if x_val is None:
        if len(x) == 0:
            raise UserError(f"{name}: the data set is empty; provide at least one example")
        x, x_val, y, y_val = split(
            x, y, val_fraction=val_fraction, split_seed=split_seed, stratify=False, name=name
        )
    return DataModule(
        x_train=x, y_train=y, x_val=x_val, y_val=y_val, task=task, name=name, **kw
    )


def npz(
    *,
    path: str,
    x_key: str = "x",
    y_key: str = "y",
    task: str = "classification",
    val_fraction: float = 0.2,
    split_seed: int = 0,
    batch_size: int = 32,
    seed: int = 0,
    shuffle: bool = True,
    allow_nonfinite: bool = False,
    in_memory="auto",
) -> DataModule:
    """Arrays ``x_key``/``y_key`` from an .npz file.

    If the archive also holds ``<x_key>_val`` and ``<y_key>_val`` they are the
    validation set; otherwise a fixed ``val_fraction`` is split off.
    """
    p = _existing(path, "npz")
    try:
        archive = np.load(p, allow_pickle=False)
    except Exception as e:  # numpy raises several types for a corrupt archive
        raise UserError(f"{p}: not a readable .npz archive ({e}); check data.path") from e
    with archive:
        for key in (x_key, y_key):
            if key not in archive.files:
                raise UserError(
                    f"{p}: no array {key!r} (found {sorted(archive.files)}); "
                    "set data.x_key / data.y_key"
                )
        arrays = {k: archive[k] for k in archive.files}
    return _module(
        arrays[x_key], arrays[y_key], arrays.get(f"{x_key}_val"), arrays.get(f"{y_key}_val"),
        name=str(p), task=task, val_fraction=val_fraction, split_seed=split_seed,
        batch_size=batch_size, seed=seed, shuffle=shuffle, allow_nonfinite=allow_nonfinite,
        in_memory=in_memory,
    )


def csv_file(
    *,
    path: str,
    target: str,
    features: list[str] | None = None,
    task: str = "classification",
    val_fraction: float = 0.2,
    split_seed: int = 0,
    batch_size: int = 32,
    seed: int = 0,
    shuffle: bool = True,
    allow_nonfinite: bool = False,
    in_memory="auto",
) -> DataModule:
    """A CSV file with a header row: ``target`` is the label column, ``features`` the inputs
    (all other columns when omitted). Every cell must parse as a number."""
    p = _existing(path, "csv")
    with p.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise UserError(f"{p}: the file is empty; it needs a header row and data rows")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if target not in header:
        raise UserError(f"{p}: no column {target!r} (columns: {header}); set data.target")
    features = list(features) if features else [h for h in header if h != target]
    for col in features:
        if col not in header:
            raise UserError(
                f"{p}: no feature column {col!r} (columns: {header}); fix data.features"
            )
    if not features:
        raise UserError(f"{p}: no feature columns besides the target {target!r}")
    if not body:
        raise UserError(f"{p}: the file has a header but no data rows")
    index = {h: i for i, h in enumerate(header)}
    values = np.empty((len(body), len(features) + 1), dtype=np.float64)
    for r, row in enumerate(body):
        if len(row) != len(header):
            raise UserError(
                f"{p}: line {r + 2} has {len(row)} fields, the header has {len(header)}"
            )
        for c, col in enumerate([*features, target]):
            cell = row[index[col]].strip()
            try:
                values[r, c] = float(cell)
            except ValueError:
                raise UserError(
                    f"{p}: line {r + 2}, column {col!r}: {cell!r} is not a number"
                ) from None
            if not (allow_nonfinite and col != target) and not np.isfinite(values[r, c]):
                raise UserError(
                    f"{p}: line {r + 2}, column {col!r} is {cell!r}; clean the data"
                    + ("" if col == target else " or set data.allow_nonfinite=true")
                )
    return _module(
        values[:, :-1], values[:, -1], None, None,
        name=str(p), task=task, val_fraction=val_fraction, split_seed=split_seed,
        batch_size=batch_size, seed=seed, shuffle=shuffle, allow_nonfinite=allow_nonfinite,
        in_memory=in_memory,
    )
