"""The default TapeStep against closed-form gradients, eager and compiled."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import linear_model
from trainer import StepInfo, TapeStep
from trainer.common.keys import SAMPLED


def _batch(n=8, d=3, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.normal(size=(n, 1)).astype("float32")
    return tf.constant(x), tf.constant(y)


def _closed_form(model, x, y):
    w, b = (v.numpy() for v in model.trainable_variables)
    r = x.numpy() @ w + b - y.numpy()
    n = len(r)
    return 2.0 / n * x.numpy().T @ r, 2.0 / n * r.sum(axis=0)


@pytest.mark.parametrize("compiled", [False, True])
def test_update_matches_closed_form_mse_gradient(compiled):
    model = linear_model()
    lr = 0.1
    step = TapeStep(model=model, optimizer=keras.optimizers.SGD(lr), task="regression")
    step.build()
    x, y = _batch()
    gw, gb = _closed_form(model, x, y)
    w0, b0 = (v.numpy().copy() for v in model.trainable_variables)
    fn = tf.function(step.train_step) if compiled else step.train_step
    logs = fn((x, y))
    w1, b1 = (v.numpy() for v in model.trainable_variables)
    np.testing.assert_allclose(w1, w0 - lr * gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b1, b0 - lr * gb, rtol=1e-5, atol=1e-6)
    expected_norm = np.sqrt((gw**2).sum() + (gb**2).sum())
    assert logs[SAMPLED]["grad_norm"].numpy() == pytest.approx(expected_norm, rel=1e-5)
    r = x.numpy() @ w0 + b0 - y.numpy()
    assert logs["loss"].numpy() == pytest.approx((r**2).mean(), rel=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_gradients_by_path_is_a_dict_of_closed_form_gradients(compiled):
    model = linear_model()
    step = TapeStep(model=model, optimizer=keras.optimizers.SGD(0.1), task="regression")
    x, y = _batch()
    fn = tf.function(step.gradients_by_path) if compiled else step.gradients_by_path
    grads = fn((x, y))
    gw, gb = _closed_form(model, x, y)
    assert set(grads) == {v.path for v in model.trainable_variables}
    kernel = next(k for k in grads if k.endswith("kernel"))
    bias = next(k for k in grads if k.endswith("bias"))
    np.testing.assert_allclose(grads[kernel].numpy(), gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[bias].numpy(), gb, rtol=1e-5, atol=1e-6)


def test_classification_step_reports_accuracy_of_the_batch():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    step = TapeStep(model=model, optimizer=keras.optimizers.SGD(0.0))
    x = tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
    logits = model(x).numpy()
    y = tf.constant([int(np.argmax(logits[0])), 0, 0, int(np.argmax(logits[3]))], tf.int32)
    expected = np.mean(np.argmax(logits, axis=1) == y.numpy())
    logs = step.test_step((x, y))
    assert logs["accuracy"].numpy() == pytest.approx(expected)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, logits)
    assert logs["loss"].numpy() == pytest.approx(float(ce), rel=1e-6)


class HuberStep(TapeStep):
    """A custom step that overrides one hook."""

    def compute_loss(self, x, y, training):
        y_pred = self.model(x, training=training)
        return keras.losses.Huber(delta=0.5)(y, y_pred), y_pred


def test_custom_step_overrides_compute_loss():
    model = linear_model()
    step = HuberStep(model=model, optimizer=keras.optimizers.SGD(0.1), task="regression")
    x, y = _batch()
    logs = step.test_step((x, y))
    expected = keras.losses.Huber(delta=0.5)(y, model(x))
    assert logs["loss"].numpy() == pytest.approx(float(expected))
    assert logs["loss"].numpy() != pytest.approx(float(np.mean((model(x) - y) ** 2)))


@pytest.mark.parametrize("compiled", [False, True])
def test_all_lazy_regularizers_take_a_plain_update_when_none_is_due(compiled):
    from trainer.regularizers import InputGradientPenalty

    x, y = _batch()
    results = {}
    for name, regs, iteration in [("plain", [], 1), ("off", "lazy", 1), ("on", "lazy", 2)]:
        model = linear_model()
        reg = [InputGradientPenalty(weight=0.5, every=2)] if regs else []
        step = TapeStep(model=model, optimizer=keras.optimizers.SGD(0.1), task="regression",
                        regularizers=reg)
        step.build()

        def update(batch, step=step, iteration=iteration):
            return step.train_step(batch, StepInfo.at(iteration))

        (tf.function(update) if compiled else update)((x, y))
        results[name] = model.trainable_variables[0].numpy()
    np.testing.assert_array_equal(results["off"], results["plain"])
    assert not np.allclose(results["on"], results["plain"])
