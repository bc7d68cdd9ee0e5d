"""The 8x8 handwritten digits that scikit-learn ships (no download)."""

from __future__ import annotations

from trainer.data.base import DataModule, split


def digits(
    *,
    batch_size: int = 32,
    val_fraction: float = 0.2,
    split_seed: int = 0,
    seed: int = 0,
    shuffle: bool = True,
) -> DataModule:
    """1,797 digit images as 64 features scaled to [0, 1], 10 classes, stratified fixed split."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    x_tr, x_va, y_tr, y_va = split(
        x, y, val_fraction=val_fraction, split_seed=split_seed, stratify=True, name="digits"
    )
    return DataModule(
        x_train=x_tr, y_train=y_tr, x_val=x_va, y_val=y_va, task="classification",
        batch_size=batch_size, seed=seed, shuffle=shuffle, name="digits",
    )
