"""Batch sources the compiled loop pulls from, one ``next()`` per step, inside the graph."""

from __future__ import annotations

import tensorflow as tf


class IteratorSource:
    """Batches from an endless ``tf.data`` pipeline, through one long-lived iterator.

    The iterator is created once, outside any tf.function, and captured by the
    compiled loop, so epochs neither retrace nor rebuild the pipeline.
    """

    #: XLA cannot compile iterator ops, so only the step (not the loop) is jit-compiled.
    xla_loop = False

    def __init__(self, dataset: tf.data.Dataset):
        self.dataset = dataset
        self.iterator = iter(dataset)

    def next(self):
        return next(self.iterator)
