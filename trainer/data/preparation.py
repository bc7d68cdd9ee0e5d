"""Preparation: what a data set does to raw features before the model sees them, in a form
a TFRecord export's meta.json can record (so a run on the shards prepares new inputs alike).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: The keys of a recorded preparation (``meta.json``'s ``"preparation"``).
KEYS = ("subtract", "divide_by")


@dataclass(frozen=True)
class Scaling:
    """``prepared = (raw - subtract) / divide_by``, element by element, in float32.

    Pass one as a ``DataModule``'s ``preprocess`` (the digits pass ``Scaling(divide_by=16)``):
    ``prepare`` applies it to new raw inputs, and ``python -m trainer.export_data`` records
    it in ``meta.json`` as ``{"subtract": 0.0, "divide_by": 16.0}``, so that a run trained
    on the shards prepares new inputs the same way. A plain function as ``preprocess``
    works for prediction too, but an export cannot record it.
    """

    divide_by: float = 1.0
    subtract: float = 0.0

    def __post_init__(self):
        for key in KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value)):
                raise ValueError(f"{key} {value!r} is not a finite number")
        if self.divide_by == 0:
            raise ValueError("divide_by is 0")

    def __call__(self, x):
        x = np.asarray(x, np.float32)
        return ((x - np.float32(self.subtract)) / np.float32(self.divide_by)).astype(np.float32)

    def in_graph(self, x):
        """The same on a float32 tensor, as TensorFlow ops: what a serving signature holds
        (``python -m trainer.export``), so served inputs are prepared as ``prepare`` does."""
        import tensorflow as tf

        return (x - tf.constant(self.subtract, tf.float32)) / tf.constant(self.divide_by,
                                                                          tf.float32)

    def undo(self, x) -> np.ndarray:
        """Prepared features back to raw ones (``raw * divide_by + subtract``), to feed the
        validation data to a model that prepares its own inputs."""
        x = np.asarray(x, np.float32)
        return (x * np.float32(self.divide_by) + np.float32(self.subtract)).astype(np.float32)

    def to_json(self) -> dict:
        """The record ``meta.json`` holds: ``{"subtract": ..., "divide_by": ...}``."""
        return {"subtract": float(self.subtract), "divide_by": float(self.divide_by)}

    @classmethod
    def from_json(cls, record) -> Scaling | None:
        """The preparation ``record`` describes (None: the features are used as given);
        a ``ValueError`` says what is wrong with it."""
        if record is None:
            return None
        if not isinstance(record, dict) or set(record) - set(KEYS) or "divide_by" not in record:
            raise ValueError(f"{record!r} is neither null nor "
                             '{"subtract": NUMBER, "divide_by": NUMBER}')
        return cls(divide_by=record["divide_by"], subtract=record.get("subtract", 0.0))


def describe(preprocess) -> dict | None:
    """``preprocess`` as ``meta.json`` records it (None for none); a ``ValueError`` if it is
    a function the record cannot hold."""
    if preprocess is None:
        return None
    if isinstance(preprocess, Scaling):
        return preprocess.to_json()
    raise ValueError(f"{getattr(preprocess, '__qualname__', preprocess)!r} is a function")


def reshape_rows(x, shape) -> np.ndarray:
    """``x`` as float32, its rows reshaped (row-major) to ``shape`` when they hold that many
    values in another shape: a CSV's flat rows for a model that takes images."""
    x = np.asarray(x, np.float32)
    shape = tuple(shape)
    if x.ndim >= 1 and x.shape[1:] != shape and math.prod(x.shape[1:]) == math.prod(shape):
        return x.reshape(len(x), *shape)
    return x
