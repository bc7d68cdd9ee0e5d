"""DataPlan: what the trainer needs of a data set, read from it once and passed down frozen."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from trainer.common.errors import UserError
from trainer.data.base import Data
from trainer.data.sources import FixedBatches, IteratorSource, Source

_KEYS = {"train": "trainer.limit_train_batches", "val": "trainer.limit_val_batches",
         "overfit": "trainer.overfit_batches"}


@dataclass(frozen=True)
class BatchLimits:
    """How much of a data set each epoch runs: ``trainer.limit_train_batches``,
    ``trainer.limit_val_batches`` and ``trainer.overfit_batches``.

    Each is None (the whole split; ``overfit`` also takes 0), an int >= 1 (that many
    batches, at most the split's) or a float in (0, 1] (that fraction of the split's
    batches, rounded down, at least one). ``overfit`` trains on the same first batches
    of the training split every epoch and validates on them; it excludes the two limits.
    """

    train: int | float | None = None
    val: int | float | None = None
    overfit: int | float | None = 0

    def __post_init__(self):
        for name in ("train", "val", "overfit"):
            value = getattr(self, name)
            ok = value is None or (name == "overfit" and value == 0 and value is not False)
            ok = ok or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
            ok = ok or (isinstance(value, float) and 0.0 < value <= 1.0)
            if not ok:
                off = "0 or null" if name == "overfit" else "null"
                raise UserError(f"{_KEYS[name]}={value!r} must be an integer >= 1 (batches), a "
                                f"fraction in (0, 1] of the split's batches, or {off} (all)")
        if self.overfit and (self.train is not None or self.val is not None):
            raise UserError("trainer.overfit_batches is set with trainer.limit_train_batches or "
                            "trainer.limit_val_batches; overfitting runs the same batches for "
                            "both: drop the limits")

    def steps(self, name: str, available: int) -> int:
        """The batches an epoch of ``name`` (``train``, ``val``, ``overfit``) runs, of the
        ``available`` ones."""
        value = getattr(self, name)
        if not value:
            return available
        if isinstance(value, float):
            return max(1, math.floor(value * available))
        return min(value, available)

    def train_steps(self, available: int) -> int:
        """Training steps per epoch, of the ``available`` batches of one pass."""
        return self.steps("overfit" if self.overfit else "train", available)


@dataclass(frozen=True)
class DataPlan:
    """A data set as one fit runs it: its sources, sizes and shapes, read once by ``read``.

    The trainer keeps this one object (not the data set's methods, asked again at every
    turn): the compile plan reads ``fused`` from it, the executions pull batches from
    ``train`` and ``val``, the loop counts ``steps_per_epoch``, and the gradient
    histograms take ``probe``. Under a strategy every replica takes its rows of each
    global batch (``trainer.distribute.replicas``); the sources themselves are not split.
    """

    #: The data set it was read from (``validation_batches`` for callbacks, the identity
    #: that tells ``Trainer.prepare`` whether it has prepared this data already).
    data: Data
    #: Training batches, shuffled per epoch (``trainer.data.sources.Source``).
    train: Source
    #: Validation batches in a fixed order.
    val: Source
    #: A fixed training batch (gradient histograms are taken on it).
    probe: Any
    steps_per_epoch: int
    val_steps: int
    #: Width of the model's output layer, or None when the data set leaves it out.
    num_outputs: int | None
    #: Whether every batch carries per-example weights: ``(x, y, w)``.
    weighted: bool
    #: The limits it was read with (``BatchLimits``), and the steps of a whole pass over
    #: each split (the limits cut ``steps_per_epoch`` and ``val_steps`` from them).
    limits: BatchLimits = field(default_factory=BatchLimits)
    available: tuple = (0, 0)

    @property
    def fused(self) -> bool:
        """Whether the training source runs inside an XLA program (a fused execution)."""
        return self.train.xla_loop

    @classmethod
    def read(cls, data, limits: BatchLimits = BatchLimits()) -> DataPlan:
        """Read ``data`` (a ``trainer.data.Data``) once: build its sources and probe
        batch, count its steps, cut as ``limits`` say. Raises ``UserError`` for anything
        else."""
        if not isinstance(data, Data):
            raise UserError(f"the data {type(data).__name__} is not a trainer.data.Data; use "
                            "trainer.DataModule or subclass trainer.data.Data")
        try:
            outputs = data.num_outputs
        except NotImplementedError:  # a Data of one's own may leave it out
            outputs = None
        available = (data.steps_per_epoch("train"), data.steps_per_epoch("val"))
        common = dict(data=data, num_outputs=outputs or None, weighted=bool(data.weighted),
                      limits=limits, available=available)
        steps = limits.train_steps(available[0])
        if limits.overfit:
            train = FixedBatches.take(data.train_source(), steps,
                                      f"{_KEYS['overfit']}={limits.overfit!r}")
            return cls(train=train, val=train.again(), probe=train.batch(0),
                       steps_per_epoch=steps, val_steps=steps, **common)
        val, val_steps = data.val_source(), limits.steps("val", available[1])
        if val_steps < available[1] and isinstance(val, IteratorSource):
            # A stream of the validation set, endlessly repeated: every evaluation must
            # start at its first batch, not where the last (cut) one stopped.
            val = IteratorSource(val.dataset.take(val_steps).repeat())
        return cls(train=data.train_source(), val=val, probe=data.probe_batch(),
                   steps_per_epoch=steps, val_steps=val_steps,
                   **common)

    def describe(self) -> str | None:
        """One log line on what the limits cut, or None when each epoch runs everything."""
        train, val = self.available
        if self.limits.overfit:
            return (f"data: overfitting {self.steps_per_epoch} fixed training batches (of "
                    f"{train}), validated on the same batches (trainer.overfit_batches)")
        if (self.steps_per_epoch, self.val_steps) == self.available:
            return None
        return (f"data: {self.steps_per_epoch} of {train} training batches per epoch, "
                f"{self.val_steps} of {val} validation batches (trainer.limit_train_batches, "
                "trainer.limit_val_batches)")

    def validation_batches(self) -> list:
        """The batches an evaluation runs, once, as numpy batches in a fixed order: the
        data set's ``validation_batches`` cut to ``val_steps`` (overfitting: the fixed
        training batches)."""
        if isinstance(self.val, FixedBatches):
            return [self.val.batch(i) for i in range(self.val.count)]
        return list(self.data.validation_batches())[: self.val_steps]
