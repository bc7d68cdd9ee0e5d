"""DataPlan: what the trainer needs of a data set, read from it once and passed down frozen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainer.common.errors import UserError
from trainer.data.base import Data
from trainer.data.sources import Source


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

    @property
    def fused(self) -> bool:
        """Whether the training source runs inside an XLA program (a fused execution)."""
        return self.train.xla_loop

    @classmethod
    def read(cls, data) -> DataPlan:
        """Read ``data`` (a ``trainer.data.Data``) once: build its sources and probe
        batch, count its steps. Raises ``UserError`` for anything else."""
        if not isinstance(data, Data):
            raise UserError(f"the data {type(data).__name__} is not a trainer.data.Data; use "
                            "trainer.DataModule or subclass trainer.data.Data")
        try:
            outputs = data.num_outputs
        except NotImplementedError:  # a Data of one's own may leave it out
            outputs = None
        return cls(data=data, train=data.train_source(), val=data.val_source(),
                   probe=data.probe_batch(), steps_per_epoch=data.steps_per_epoch("train"),
                   val_steps=data.steps_per_epoch("val"), num_outputs=outputs or None,
                   weighted=bool(data.weighted))
