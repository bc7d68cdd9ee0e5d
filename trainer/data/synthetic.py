"""Tiny generated data sets for tests and quick experiments."""

from __future__ import annotations

import numpy as np

from trainer.common.errors import UserError
from trainer.data.base import DataModule, split


def synthetic(
    *,
    task: str = "regression",
    n_samples: int = 512,
    n_features: int = 8,
    n_classes: int = 3,
    noise: float = 0.1,
    data_seed: int = 0,
    val_fraction: float = 0.25,
    batch_size: int = 32,
    seed: int = 0,
    shuffle: bool = True,
    in_memory="auto",
    class_weight=None,
) -> DataModule:
    """A linear regression problem, or Gaussian blobs for classification.

    ``data_seed`` fixes the generated examples; ``seed`` only drives the shuffle.
    ``class_weight`` (classification only): see ``DataModule``.
    """
    if n_samples < 2 or n_features < 1:
        raise UserError("data.n_samples must be at least 2 and data.n_features at least 1")
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
    return DataModule(
        x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va, task=task,
        batch_size=batch_size, seed=seed, shuffle=shuffle, name=f"synthetic {task}",
        in_memory=in_memory, class_weight=class_weight,
    )
