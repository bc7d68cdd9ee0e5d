"""A project's own step, regularizer and model, configured from its own config dir.

``tests/test_extension.py`` copies this directory outside the repository and runs
``python -m trainer 'hydra.searchpath=[file://DIR/configs]' +experiment=smooth`` there.
"""

import keras
import tensorflow as tf

from trainer import TapeStep
from trainer.regularizers.base import Regularizer


class SmoothStep(TapeStep):
    """The default step with label smoothing: its own key, ``smoothing``, set in YAML."""

    def __init__(self, *, smoothing: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.smoothing = float(smoothing)

    def compute_loss(self, x, y, training):
        y_pred = self.model(x, training=training)
        n = y_pred.shape[-1]
        target = tf.one_hot(tf.cast(y, tf.int32), n) * (1 - self.smoothing) + self.smoothing / n
        loss = keras.losses.categorical_crossentropy(target, y_pred, from_logits=True)
        return tf.reduce_mean(loss), y_pred  # a plain batch mean: right under a strategy too

    def final_metrics(self, data):
        return {"smoothing": self.smoothing}


class L2(Regularizer):
    """Weight decay as a penalty in the loss: ``sum ||theta||^2``."""

    name = "l2"

    def penalty(self, ctx):
        return tf.add_n([tf.reduce_sum(tf.square(v)) for v in ctx.step.trainable_variables])


def tiny(*, input_shape, num_outputs, width=16):
    """One hidden layer of ``width`` units."""
    return keras.Sequential([keras.Input(input_shape),
                             keras.layers.Dense(width, activation="relu"),
                             keras.layers.Dense(num_outputs)])
