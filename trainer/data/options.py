"""Small option objects the data sets take: how batches are drawn (``Batching``), how a
validation set is split off (``Split``), which columns of a CSV file (``Columns``) and
arrays of an .npz archive (``Keys``) hold what, what synthetic data to generate
(``Generation``), and the arrays of one split (``Arrays``).

Each checks its values when built and names the config key of a bad one
(``data.batch_size=0 must be at least 1``). A data config stays flat
(``data.batch_size=64 data.val_fraction=0.3``): the driver gathers the keys of each
option object a data config's target takes into one (see
``trainer.driver.run.instantiate_data``); the field names are the config keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from trainer.common.errors import UserError


def _set(obj, name: str, value) -> None:
    object.__setattr__(obj, name, value)  # a frozen dataclass normalizing its own fields


@dataclass(frozen=True)
class Batching:
    """How batches are drawn, for every data set.

    Args:
        batch_size: examples per training and validation batch (over all replicas).
        seed: seeds the per-epoch shuffle of the training set (not the split).
        shuffle: shuffle the training set every epoch.
        in_memory: ``True`` holds the data as tensors and slices batches by index inside
            the compiled loop; ``False`` streams it through ``tf.data``; ``"auto"`` holds
            it in memory when it takes at most ``trainer.data.base.IN_MEMORY_MAX_BYTES``
            (each data set says what it does with it).
    """

    batch_size: int = 32
    seed: int = 0
    shuffle: bool = True
    in_memory: Any = "auto"

    def __post_init__(self):
        if not (self.in_memory == "auto" or isinstance(self.in_memory, bool)):
            raise UserError(f"data.in_memory={self.in_memory!r} must be auto, true or false")
        if self.batch_size < 1:
            raise UserError(f"data.batch_size={self.batch_size} must be at least 1")
        _set(self, "batch_size", int(self.batch_size))
        _set(self, "seed", int(self.seed))
        _set(self, "shuffle", bool(self.shuffle))

    def check_fits(self, examples: int, where: str, noun: str = "training example") -> None:
        """A ``UserError`` naming ``where`` unless one batch fits in ``examples``."""
        if self.batch_size > examples:
            raise UserError(f"{where}: data.batch_size={self.batch_size} is larger than the "
                            f"{examples} {noun}{'' if examples == 1 else 's'}; lower "
                            "data.batch_size")


@dataclass(frozen=True)
class Split:
    """How a validation set is split off a data set that has none: a fixed
    ``val_fraction`` of the examples, drawn by ``split_seed`` (not by ``Batching.seed``:
    the split stays when the shuffle seed changes)."""

    val_fraction: float = 0.2
    split_seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction={self.val_fraction} must lie strictly between "
                            "0 and 1")
        _set(self, "split_seed", int(self.split_seed))


def _name(key: str, value, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise UserError(f"data.{key}={value!r} must name {what}")


@dataclass(frozen=True)
class Columns:
    """The columns of a CSV file: ``target`` the label column, ``features`` the inputs (all
    other columns when None), ``weight`` a column of per-example sample weights (never a
    feature) or None."""

    target: str
    features: tuple[str, ...] | None = None
    weight: str | None = None

    def __post_init__(self):
        _name("target", self.target, "the label column")
        if self.weight is not None:
            _name("weight", self.weight, "the column of sample weights, or be null")
        if self.features is not None:
            features = tuple(self.features)
            if not all(isinstance(column, str) and column for column in features):
                raise UserError(f"data.features={list(features)!r} must list column names, "
                                "e.g. [a,b]")
            _set(self, "features", features or None)


@dataclass(frozen=True)
class Keys:
    """The arrays of an .npz archive: features ``x_key`` and targets ``y_key`` (and
    ``<x_key>_val``, ``<y_key>_val`` for a validation set), and ``w_key``, per-example
    sample weights (and ``<w_key>_val``), or None."""

    x_key: str = "x"
    y_key: str = "y"
    w_key: str | None = None

    def __post_init__(self):
        _name("x_key", self.x_key, "the array of features")
        _name("y_key", self.y_key, "the array of targets")
        if self.w_key is not None:
            _name("w_key", self.w_key, "the array of sample weights, or be null")


@dataclass(frozen=True)
class Generation:
    """What ``trainer.data.synthetic`` generates: ``n_samples`` examples of ``n_features``
    features, ``n_classes`` blobs (classification) or targets with Gaussian ``noise``
    (regression); ``data_seed`` fixes the examples and the split."""

    n_samples: int = 512
    n_features: int = 8
    n_classes: int = 3
    noise: float = 0.1
    data_seed: int = 0

    def __post_init__(self):
        if self.n_samples < 2 or self.n_features < 1:
            raise UserError("data.n_samples must be at least 2 and data.n_features at least 1")


class Arrays(NamedTuple):
    """One split's arrays: features ``x``, targets ``y`` and per-example sample weights ``w``
    (None: every example weighs 1). A plain ``(x, y)`` or ``(x, y, w)`` tuple does too;
    ``DataModule`` checks them."""

    x: Any
    y: Any
    w: Any = None


#: The option objects a data config's flat keys can be gathered into.
OPTIONS = (Batching, Split, Columns, Keys, Generation)
