"""The data and loss of ``python -m trainer +experiment=edge_of_stability``.

Cohen et al. (ICLR 2021) train with the square loss on one-hot targets, on centred
inputs, for their clean picture of full-batch gradient descent (the sharpness rises
to ``2/eta`` and hovers there). The digits are integer labels in [0, 1] pixels: the
loss one-hot encodes the labels itself, and the data centres each pixel on its
training mean. Uncentred, the mean input is a direction of high curvature: a tanh
MLP 64-200-200-5 starts at sharpness 57 on digits 0-4, centred at 7.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from trainer.data.base import DataModule
from trainer.data.digits import digits
from trainer.data.options import Batching, Split


class OneHotSquaredError:
    """``0.5 * ||y_pred - one_hot(y_true)||^2`` per example, averaged over the batch.

    ``sample_weight`` (weighted data) weighs each example's term; the mean is still over
    the batch's examples, as Keras' default reduction.
    """

    def __call__(self, y_true, y_pred, sample_weight=None):
        target = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), tf.shape(y_pred)[-1],
                            dtype=y_pred.dtype)
        per_example = 0.5 * tf.reduce_sum(tf.square(y_pred - target), axis=-1)
        if sample_weight is not None:
            per_example = per_example * tf.cast(sample_weight, per_example.dtype)
        return tf.reduce_mean(per_example)


class CenteredPixels:
    """Raw digit pixels (0-16) scaled to [0, 1], then each minus its training mean."""

    def __init__(self, mean):
        self.mean = np.asarray(mean, np.float32)

    def __call__(self, x):
        return (np.asarray(x, np.float32) / 16.0 - self.mean).astype(np.float32)


def centered_digits(*, split: Split = Split(), batching: Batching = Batching(),
                    classes: list[int] | None = None, images: bool = False,
                    class_weight=None) -> DataModule:
    """``trainer.data.digits`` (the same arguments and split) with every pixel centred on its
    mean over the training split (the validation split shifted by the same means)."""
    module = digits(split=split, batching=batching, classes=classes, images=images,
                    class_weight=class_weight)
    mean = module.x_train.mean(axis=0)
    return DataModule(train=(module.x_train - mean, module.y_train),
                      val=(module.x_val - mean, module.y_val), task="classification",
                      batching=batching, class_weight=class_weight, name="digits",
                      preprocess=CenteredPixels(mean))
