"""The user's own data: NumPy .npz archives and CSV files with a header row."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from trainer.common.errors import UserError
from trainer.data.base import DataModule, split
from trainer.data.options import Batching, Columns, Keys, Split
from trainer.data.weights import check_sample_weights


def _existing(path: str | None, kind: str) -> Path:
    if not path or path == "???":
        raise UserError(f"data.path is not set; pass data.path=/path/to/file.{kind}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{p}: no such file; check data.path")
    return p


def _module(x, y, x_val, y_val, *, w=None, w_val=None, name, split_off: Split,
            **kw) -> DataModule:
    """A ``DataModule`` of the arrays; without a validation set, a split of ``x``/``y``
    (and of the sample weights ``w``, with the same rows)."""
    if x_val is None:
        if len(x) == 0:
            raise UserError(f"{name}: the data set is empty; provide at least one example")
        parts = split(x, y, *([] if w is None else [w]), val_fraction=split_off.val_fraction,
                      split_seed=split_off.split_seed, stratify=False, name=name)
        x, x_val, y, y_val = parts[:4]
        if w is not None:
            w, w_val = parts[4:]
    return DataModule(train=(x, y, w), val=(x_val, y_val, w_val), name=name, **kw)


def npz(
    *,
    path: str,
    keys: Keys = Keys(),
    task: str = "classification",
    split: Split = Split(),
    batching: Batching = Batching(),
    allow_nonfinite: bool = False,
    class_weight=None,
) -> DataModule:
    """Arrays ``keys.x_key``/``keys.y_key`` from an .npz file.

    If the archive also holds ``<x_key>_val`` and ``<y_key>_val`` they are the
    validation set; otherwise ``split`` (a ``trainer.data.Split``: a fixed
    ``val_fraction``) is split off.

    ``keys.w_key`` names an array of per-example sample weights of the training rows,
    and ``<w_key>_val``, if present, those of the validation set (without it,
    validation examples weigh 1); a split set splits the weights with the same rows.
    ``batching``: see ``trainer.data.Batching``; ``class_weight``: see ``DataModule``.
    """
    x_key, y_key, w_key = keys.x_key, keys.y_key, keys.w_key
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
        if w_key is not None and w_key not in archive.files:
            raise UserError(f"{p}: no array {w_key!r} (found {sorted(archive.files)}); "
                            "set data.w_key to the array of sample weights, or null")
        arrays = {k: archive[k] for k in archive.files}
    x, x_val = arrays[x_key], arrays.get(f"{x_key}_val")
    halves = [f"{k}_val" for k in (x_key, y_key) if f"{k}_val" in arrays]
    if len(halves) == 1:
        other = f"{y_key}_val" if halves == [f"{x_key}_val"] else f"{x_key}_val"
        raise UserError(f"{p}: array {halves[0]!r} without {other!r}; a validation set needs "
                        "both (or neither, to split one off)")
    w = w_val = None
    if w_key is not None:
        w = check_sample_weights(arrays[w_key], rows=len(x), where=f"{p}: array {w_key!r}")
        if f"{w_key}_val" in arrays:
            if x_val is None:
                raise UserError(f"{p}: array {w_key + '_val'!r} weighs a validation set the "
                                f"archive lacks (no {x_key + '_val'!r}); remove it or add the "
                                "validation arrays")
            w_val = check_sample_weights(arrays[f"{w_key}_val"], rows=len(x_val),
                                         where=f"{p}: array {w_key + '_val'!r}")
    return _module(
        x, arrays[y_key], x_val, arrays.get(f"{y_key}_val"), w=w, w_val=w_val,
        name=str(p), split_off=split, task=task, batching=batching,
        allow_nonfinite=allow_nonfinite, class_weight=class_weight,
    )


def csv_file(
    *,
    path: str,
    columns: Columns,
    task: str = "classification",
    split: Split = Split(),
    batching: Batching = Batching(),
    allow_nonfinite: bool = False,
    class_weight=None,
) -> DataModule:
    """A CSV file with a header row; ``columns`` (a ``trainer.data.Columns``) names them:
    ``target`` is the label column, ``features`` the inputs (all other columns when
    omitted). Every cell must parse as a number.

    ``columns.weight`` names a column of per-example sample weights (finite, >= 0): never
    a feature, split with the same rows. ``split``, ``batching``: see ``trainer.data``;
    ``class_weight``: see ``DataModule``.
    """
    target, features, weight = columns.target, columns.features, columns.weight
    p = _existing(path, "csv")
    with p.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise UserError(f"{p}: the file is empty; it needs a header row and data rows")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if target not in header:
        raise UserError(f"{p}: no column {target!r} (columns: {header}); set data.target")
    if weight is not None and weight not in header:
        raise UserError(f"{p}: no weight column {weight!r} (columns: {header}); fix data.weight")
    if weight is not None and weight == target:
        raise UserError(f"{p}: data.weight={weight!r} is the target column; name the column "
                        "of sample weights")
    features = list(features) if features else [h for h in header if h not in (target, weight)]
    if weight is not None and weight in features:
        raise UserError(f"{p}: the weight column {weight!r} is also in data.features; a "
                        "sample weight is not an input, remove it from data.features")
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
    read = [*features, target] + ([] if weight is None else [weight])
    n_features = len(features)
    values = np.empty((len(body), len(read)), dtype=np.float64)
    for r, row in enumerate(body):
        if len(row) != len(header):
            raise UserError(
                f"{p}: line {r + 2} has {len(row)} fields, the header has {len(header)}"
            )
        for c, col in enumerate(read):
            cell = row[index[col]].strip()
            try:
                values[r, c] = float(cell)
            except ValueError:
                raise UserError(
                    f"{p}: line {r + 2}, column {col!r}: {cell!r} is not a number"
                ) from None
            # allow_nonfinite frees the features only: targets and weights stay finite.
            feature = c < n_features
            if not (allow_nonfinite and feature) and not np.isfinite(values[r, c]):
                raise UserError(
                    f"{p}: line {r + 2}, column {col!r} is {cell!r}; clean the data"
                    + (" or set data.allow_nonfinite=true" if feature else "")
                )
            if c > n_features and values[r, c] < 0:
                raise UserError(f"{p}: line {r + 2}, column {col!r} is {cell!r}; sample "
                                "weights must be finite and >= 0")
    w = None
    if weight is not None:
        w = check_sample_weights(values[:, -1], rows=len(body), where=f"{p}: column {weight!r}")
    return _module(
        values[:, :n_features], values[:, n_features], None, None, w=w,
        name=str(p), split_off=split, task=task, batching=batching,
        allow_nonfinite=allow_nonfinite, class_weight=class_weight,
    )
