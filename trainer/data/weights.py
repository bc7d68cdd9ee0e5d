"""Per-example weights: class weights (``balanced`` or a mapping) and sample weights.

As Keras' ``fit(class_weight=..., sample_weight=...)``: a training example weighs its
sample weight times its class's weight; validation examples weigh their own sample
weights only (class weights reweigh training, they do not redefine the validation loss).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from trainer.common.errors import UserError

_CLASS_ID = re.compile(r"[+-]?\d+")


def class_weight_table(class_weight, labels, *, num_classes: int, name: str) -> np.ndarray:
    """The weight of each class ``0..num_classes-1`` (float64) from ``data.class_weight``.

    ``"balanced"`` is scikit-learn's ``n_samples / (n_classes * bincount(labels))`` over
    the classes present in ``labels`` (the training labels); a mapping gives weights by
    class id (ints, or strings of ints as YAML and the command line may write them),
    and the classes it does not list weigh 1.0.
    """
    table = np.ones(num_classes, np.float64)
    classes = f"classes 0-{num_classes - 1}"
    if isinstance(class_weight, str):
        if class_weight != "balanced":
            raise UserError(f"data.class_weight={class_weight!r} is not 'balanced' or a mapping "
                            "class -> weight; e.g. data.class_weight=balanced or "
                            "data.class_weight='{0:1.0,1:5.0}'")
        present = np.unique(labels)
        counts = np.bincount(labels, minlength=num_classes)
        table[present] = len(labels) / (len(present) * counts[present])
        return table
    if not isinstance(class_weight, Mapping):
        raise UserError(f"data.class_weight={class_weight!r} is not 'balanced' or a mapping "
                        "class -> weight; e.g. data.class_weight='{0:1.0,1:5.0}'")
    given: dict[int, object] = {}
    for key, value in class_weight.items():
        if isinstance(key, bool) or not (
                isinstance(key, int | np.integer)
                or (isinstance(key, str) and _CLASS_ID.fullmatch(key.strip()))):
            raise UserError(f"data.class_weight: key {key!r} is not a class id; key the mapping "
                            f"by the integer ids of {name}'s {classes}")
        c = int(key.strip()) if isinstance(key, str) else int(key)
        if not 0 <= c < num_classes:
            raise UserError(f"data.class_weight: class {c} is not a class of {name} ({classes}); "
                            "remove it or key the mapping by class id")
        if c in given:
            raise UserError(f"data.class_weight: class {c} is given twice ({given[c]!r} and "
                            f"{key!r}); keep one")
        # bool is an int to Python, but `true` as a weight is a slip, not 1.0.
        number = isinstance(value, int | float | np.integer | np.floating) and not isinstance(
            value, bool | np.bool_)
        # 0 is allowed, as in Keras: it leaves a class out of the training loss.
        if not number or not np.isfinite(value) or value < 0:
            shown = value.item() if isinstance(value, np.generic) else value
            raise UserError(f"data.class_weight: class {c} has weight {shown!r}; class weights "
                            "must be finite numbers >= 0")
        given[c] = key
        table[c] = float(value)
    return table


def check_sample_weights(w, *, rows: int, where: str) -> np.ndarray:
    """``w`` as float32 of shape ``[rows]``, or a ``UserError`` naming ``where`` and the first
    bad row: weights must be finite numbers >= 0, and not all zero (nothing would be learnt,
    and a weighted mean over them would be 0 / 0)."""
    w = np.asarray(w)
    if w.ndim == 2 and w.shape[1] == 1:
        w = w[:, 0]
    if w.ndim != 1 or len(w) != rows:
        raise UserError(f"{where}: sample weights of shape {w.shape}, expected ({rows},): one "
                        "weight per example")
    if not np.issubdtype(w.dtype, np.integer) and not np.issubdtype(w.dtype, np.floating):
        raise UserError(f"{where}: sample weights of dtype {w.dtype}; they must be numbers")
    with np.errstate(over="ignore"):  # a weight too large for float32 is reported below
        w32 = w.astype(np.float32)
    bad = ~np.isfinite(w32) | (w32 < 0)
    if bad.any():
        row = int(np.argmax(bad))
        raise UserError(f"{where}: row {row} has sample weight {w[row].item()!r}; sample "
                        "weights must be finite and >= 0")
    if not (w32 > 0).any():
        raise UserError(f"{where}: every sample weight is 0; give some example a positive weight")
    return w32
