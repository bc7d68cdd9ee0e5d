"""Read a run's event files back with TensorBoard's own reader."""

from __future__ import annotations

from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.util import tensor_util


def load(logdir) -> pea.EventAccumulator:
    """``logdir`` as the ``tensorboard`` server's Python reader sees it (``--load_fast=false``;
    what it shows matches the default Rust data server, tests/test_tensorboard.py checks both).

    Not the legacy ``event_accumulator.EventAccumulator``: on a SessionLog START (a resumed
    run's restart marker) it purges only its TF1 reservoirs, not the tensors that hold every
    summary TensorFlow 2 writes, so it would show an interrupted run's points twice.
    """
    acc = pea.EventAccumulator(str(logdir), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    return acc


def scalars(acc, tag) -> list[tuple[int, float]]:
    return [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
