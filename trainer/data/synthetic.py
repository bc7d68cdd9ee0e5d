"""Tiny generated data sets for tests and quick experiments."""

from __future__ import annotations

import numpy as np

from trainer.common.errors import UserError
from trainer.data.base import DataModule, split
from trainer.data.options import Batching, Generation


def synthetic(
    *,
    task: str = "regression",
    generation: Generation = Generation(),
    val_fraction: float = 0.25,
    batching: Batching = Batching(),
    class_weight=None,
) -> DataModule:
    """A linear regression problem, or Gaussian blobs for classification.

    ``generation`` (a ``trainer.data.Generation``) says how many examples of how many
    features; its ``data_seed`` fixes the generated examples and the ``val_fraction``
    split off them, ``batching.seed`` only drives the shuffle. ``class_weight``
    (classification only): see ``DataModule``.
    """
    n_samples, n_features, n_classes, noise, data_seed = (
        generation.n_samples, generation.n_features, generation.n_classes, generation.noise,
        generation.data_seed)
    rng = np.random.default_rng(data_seed)
    x = rng.normal(size=(n_samples, n_features)).astype(np.float32)
    if task == "regression":
        w = rng.normal(size=(n_features, 1))
        y = x @ w + noise * rng.normal(size=(n_samples, 1))
    elif task == "classification":
        centers = 3.0 * rng.normal(size=(n_classes, n_features))
        y = rng.integers(0, n_classes, size=n_samples)
        x = (centers[y] + rng.normal(size=(n_samples, n_features))).astype(np.float32)
    else:
        raise UserError(f"data.task={task!r} is not 'regression' or 'classification'")
    x_tr, x_va, y_tr, y_va = split(
        x, y, val_fraction=val_fraction, split_seed=data_seed, stratify=False, name="synthetic"
    )
    return DataModule(train=(x_tr, y_tr), val=(x_va, y_va), task=task, batching=batching,
                      class_weight=class_weight, name=f"synthetic {task}")
