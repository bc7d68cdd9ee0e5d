"""Read a run's event files back with TensorBoard's own reader."""

from __future__ import annotations

from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.util import tensor_util


def load(logdir) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return acc


def scalars(acc, tag) -> list[tuple[int, float]]:
    return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
