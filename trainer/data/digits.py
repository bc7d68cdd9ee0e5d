"""The 8x8 handwritten digits that scikit-learn ships (no download)."""

from __future__ import annotations

from trainer.common.errors import UserError
from trainer.data.base import DataModule
from trainer.data.base import split as _split
from trainer.data.options import Batching, Split
from trainer.data.preparation import Scaling


def digits(
    *,
    split: Split = Split(),
    batching: Batching = Batching(),
    classes: list[int] | None = None,
    images: bool = False,
    class_weight=None,
) -> DataModule:
    """1,797 digit images as 64 features scaled to [0, 1], 10 classes, stratified fixed split.

    ``classes`` keeps only those digits, relabelled ``0..k-1`` in the order given
    (``[5, 6, 7, 8, 9]``: digit 5 becomes class 0). The split is made first, so a
    subset's validation images are exactly the full split's images of those digits.
    ``images`` gives each example as an 8x8x1 image (height, width, channels; for
    convolutional models) instead of 64 flat features: the same pixels and split.
    ``class_weight`` (see ``DataModule``) is keyed by these class ids, after the
    relabelling, and ``balanced`` counts the subset's training split. ``split`` (a
    ``trainer.data.Split``, stratified by class) and ``batching``: see ``trainer.data``.
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    x_tr, x_va, y_tr, y_va = _split(
        x, y, val_fraction=split.val_fraction, split_seed=split.split_seed, stratify=True,
        name="digits")
    if classes is not None:
        x_tr, y_tr = _keep(x_tr, y_tr, classes)
        x_va, y_va = _keep(x_va, y_va, classes)
    if images:
        x_tr, x_va = x_tr.reshape(-1, 8, 8, 1), x_va.reshape(-1, 8, 8, 1)
    return DataModule(
        train=(x_tr, y_tr), val=(x_va, y_va), task="classification", batching=batching,
        class_weight=class_weight, name="digits",
        # The scaling above, for new raw inputs (pixels 0-16, as load_digits gives them, flat
        # rows reshaped to images by prepare) and for the meta.json of an export.
        preprocess=Scaling(divide_by=16),
    )


def _keep(x, y, classes):
    """The rows whose label is in ``classes``, relabelled by position in ``classes``."""
    import numpy as np

    classes = [int(c) for c in classes]
    if not classes or len(set(classes)) != len(classes) or not set(classes) <= set(range(10)):
        raise UserError(f"data.classes={classes} must list distinct digits 0-9, e.g. [5,6,7]")
    mask = np.isin(y, classes)
    relabel = np.full(10, -1)
    relabel[classes] = np.arange(len(classes))
    return x[mask], relabel[y[mask]]
