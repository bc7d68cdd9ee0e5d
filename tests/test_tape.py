"""Tape capabilities: unconnected gradients, list/dict sources, stop_recording, resets."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import ResetPolicy, TapeStep, Trainer
from trainer.data import DataModule
from trainer.errors import UserError
from trainer.tape import TapeResetError, gradients


def _two_heads(seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((3,))
    h = keras.layers.Dense(4, name="trunk")(x)
    a = keras.layers.Dense(1, name="head_a")(h)
    b = keras.layers.Dense(1, name="head_b")(h)
    return keras.Model(x, [a, b], name="two")


class HeadAStep(TapeStep):
    """The loss reaches only head_a; head_b is unconnected."""

    def compute_loss(self, x, y, training):
        a, _ = self.model(x, training=training)
        return tf.reduce_mean((a - y) ** 2), a


@pytest.mark.parametrize("compiled", [False, True])
def test_unconnected_zero_with_keras_variables(compiled):
    model = _two_heads()
    x = tf.ones((4, 3))

    def grads():
        with tf.GradientTape() as tape:
            a, _ = model(x)
            loss = tf.reduce_mean(a)
        sources = {v.path: v for v in model.trainable_variables}
        return gradients(tape, loss, sources, unconnected="zero")

    g = (tf.function(grads) if compiled else grads)()
    np.testing.assert_array_equal(g["head_b/kernel"].numpy(), np.zeros((4, 1)))
    assert np.abs(g["head_a/kernel"].numpy()).sum() > 0


@pytest.mark.parametrize("run_eagerly", [False, True])
@pytest.mark.parametrize("policy", ["none", "zero"])
def test_unconnected_head_is_left_alone_and_named_once(caplog, run_eagerly, policy):
    model = _two_heads()
    head_b = [v.numpy().copy() for v in model.get_layer("head_b").weights]
    step = HeadAStep(model=model, optimizer=keras.optimizers.SGD(0.1), task="regression",
                     unconnected_gradients=policy)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    data = DataModule(x_train=x, y_train=x[:, :1], x_val=x[:8], y_val=x[:8, :1],
                      task="regression", batch_size=16)
    with caplog.at_level(logging.WARNING, logger="trainer.step"):
        Trainer(epochs=2, steps_per_execution=2, run_eagerly=run_eagerly).fit(step, data)
    for before, v in zip(head_b, model.get_layer("head_b").weights):
        np.testing.assert_array_equal(v.numpy(), before)
    warnings = [r.message for r in caplog.records if "no gradient reaches" in r.message]
    if policy == "none":
        assert len(warnings) == 1 and "head_b/kernel" in warnings[0]
    else:
        assert warnings == []


def test_no_gradient_at_all_is_an_error():
    class Detached(TapeStep):
        def compute_loss(self, x, y, training):
            return tf.reduce_mean(tf.stop_gradient(self.model(x)) - y), self.model(x)

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    step = Detached(model=model, optimizer=keras.optimizers.SGD(0.1), task="regression")
    with pytest.raises(UserError, match="reaches none of the trainable variables"):
        step.train_step((tf.ones((2, 2)), tf.ones((2, 1))))


def test_stop_recording_contributes_nothing_to_gradients():
    w = tf.Variable(3.0)
    with tf.GradientTape(persistent=True) as tape:
        y = w**2
        with tape.stop_recording():
            side = w**3  # e.g. a metric or running statistic
        total = y + tf.stop_gradient(side) * 0
    assert tape.gradient(side, w) is None
    assert float(tape.gradient(total, w)) == 6.0
    del tape


@pytest.mark.parametrize("compiled", [False, True])
def test_metrics_computed_under_stop_recording_leave_gradients_unchanged(compiled):
    class WeightMetricStep(TapeStep):
        def compute_metrics(self, y, y_pred):
            # Depends on the variables: recorded, it would add to nothing but the tape.
            return {"kernel_sq": tf.reduce_sum(self.model.trainable_variables[0] ** 2)}

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    step = WeightMetricStep(model=model, optimizer=keras.optimizers.SGD(1.0), task="regression")
    step.build()
    x, y = tf.constant([[1.0, 2.0], [3.0, -1.0]]), tf.constant([[1.0], [0.0]])
    w, b = (v.numpy().copy() for v in model.trainable_variables)
    r = x.numpy() @ w + b - y.numpy()
    fn = tf.function(step.train_step) if compiled else step.train_step
    logs = fn((x, y))
    np.testing.assert_allclose(model.trainable_variables[0].numpy(), w - x.numpy().T @ r,
                               rtol=1e-5)
    assert float(logs["kernel_sq"]) == pytest.approx(float((w**2).sum()))


# --- tape reset ------------------------------------------------------------------------

BAD_NAN, BAD_HUGE = 3, 6  # batch indices (of 10) planted with NaN and with a huge loss


def _planted(clean=False, n_batches=10, batch=8):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n_batches * batch, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]])).astype("float32")
    x[BAD_NAN * batch + 2, 1] = np.nan
    y[BAD_HUGE * batch:(BAD_HUGE + 1) * batch] = 1e4
    if clean:
        keep = np.ones(len(x), bool)
        for b in (BAD_NAN, BAD_HUGE):
            keep[b * batch:(b + 1) * batch] = False
        x, y = x[keep], y[keep]
    return DataModule(x_train=x, y_train=y, x_val=x[:8] * 0, y_val=y[:8] * 0,
                      task="regression", batch_size=batch, shuffle=False,
                      allow_nonfinite=True)


def _reset_fit(data, *, reset=None, epochs=1, max_steps=None, run_eagerly=False, spe=4):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="lin")])
    step = TapeStep(model=model, optimizer=keras.optimizers.Adam(0.05), task="regression",
                    reset=reset)
    trainer = Trainer(epochs=epochs, max_steps=max_steps, steps_per_execution=spe,
                      run_eagerly=run_eagerly)
    logs = trainer.fit(step, data)
    return model, step, trainer, logs


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_skip_trains_through_planted_batches_like_a_clean_run(run_eagerly):
    policy = ResetPolicy(when=["nonfinite", "threshold"], threshold=1e5)
    model, step, trainer, logs = _reset_fit(_planted(), reset=policy, epochs=2,
                                            run_eagerly=run_eagerly)
    assert logs["train/tape/resets"] == 4  # two bad batches, two epochs
    assert trainer.current_step == 20  # the global step still advances on a skip
    assert int(step.optimizer.iterations.numpy()) == 16  # the optimizer does not
    clean, _, _, _ = _reset_fit(_planted(clean=True), epochs=2)
    for a, b in zip(model.weights, clean.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)
    assert np.isfinite(logs["train/loss"])


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_retry_records_the_next_batch_instead(run_eagerly):
    policy = ResetPolicy(when=["nonfinite", "threshold"], threshold=1e5, action="retry")
    model, step, trainer, logs = _reset_fit(_planted(), reset=policy, run_eagerly=run_eagerly)
    assert logs["train/tape/resets"] == 2
    assert trainer.current_step == 10 and int(step.optimizer.iterations.numpy()) == 10
    # The update sequence is the clean batch stream: 8 clean batches, then the first two again.
    clean, _, _, _ = _reset_fit(_planted(clean=True), epochs=2, max_steps=10)
    for a, b in zip(model.weights, clean.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def test_spike_detection_skips_the_huge_batch_only():
    policy = ResetPolicy(when=["spike"], spike_window=3, spike_z=4.0)
    data = _planted()
    data.x_train[np.isnan(data.x_train)] = 0.0  # only the huge-loss batch remains
    _, _, _, logs = _reset_fit(data, reset=policy, spe=1)
    assert logs["train/tape/resets"] == 1


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_too_many_consecutive_resets_stop_the_run_naming_the_step(run_eagerly):
    policy = ResetPolicy(when=["threshold"], threshold=-1.0, max_consecutive=3)
    with pytest.raises(TapeResetError, match="reset 3 times in a row, the last at step 3"):
        _reset_fit(_planted(), reset=policy, run_eagerly=run_eagerly)


def test_reset_config_errors():
    with pytest.raises(UserError, match=r"tape\.reset\.threshold is null"):
        ResetPolicy(when=["threshold"])
    with pytest.raises(UserError, match="'sometimes' is not one of"):
        ResetPolicy(when=["sometimes"])


@pytest.mark.parametrize("compiled", [False, True])
def test_objectives_share_one_persistent_tape_and_sum_shared_gradients(compiled):
    w = tf.Variable(2.0)  # shared by both objectives
    a = tf.Variable(1.0)
    b = tf.Variable(-1.0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    step = TapeStep(model=model, optimizer=keras.optimizers.SGD(0.1), task="regression")
    sgd = keras.optimizers.SGD(0.5)
    sgd.build([w, a, b])

    def run():
        from trainer import Objective

        with tf.GradientTape(persistent=True) as tape:
            l1 = (w * a) ** 2  # d/dw = 2 w a^2 = 4, d/da = 2 a w^2 = 8
            l2 = w * b  # d/dw = b = -1, d/db = w = 2
        grads = step.apply_objectives(tape, [
            Objective("first", l1, [w, a], sgd), Objective("second", l2, [w, b], sgd),
        ])
        del tape
        return grads

    grads = tf.function(run)() if compiled else run()
    assert [float(g) for g in grads["first"]] == [4.0, 8.0]
    assert [float(g) for g in grads["second"]] == [-1.0, 2.0]
    assert float(w) == pytest.approx(2.0 - 0.5 * 3.0)  # one update with the summed gradient
    assert float(a) == pytest.approx(1.0 - 0.5 * 8.0)
    assert float(b) == pytest.approx(-1.0 - 0.5 * 2.0)
    assert int(sgd.iterations.numpy()) == 1
