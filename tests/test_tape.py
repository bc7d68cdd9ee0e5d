"""Tape capabilities: unconnected gradients, list/dict sources, stop_recording, resets."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import ResetPolicy, TapeStep, Trainer
from trainer.common.errors import UserError
from trainer.data import Batching, DataModule
from trainer.step.tape import TapeResetError, gradients


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


@pytest.mark.slow
@pytest.mark.parametrize("run_eagerly", [False, True])
@pytest.mark.parametrize("policy", ["none", "zero"])
def test_unconnected_head_is_left_alone_and_named_once(caplog, run_eagerly, policy):
    model = _two_heads()
    head_b = [v.numpy().copy() for v in model.get_layer("head_b").weights]
    step = HeadAStep(model=model, optimizer=keras.optimizers.SGD(0.1), task="regression",
                     unconnected_gradients=policy)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    data = DataModule(train=(x, x[:, :1]), val=(x[:8], x[:8, :1]), task="regression",
                      batching=Batching(batch_size=16))
    with caplog.at_level(logging.WARNING, logger="trainer.step.base"):
        Trainer(epochs=2, steps_per_execution=2, run_eagerly=run_eagerly).fit(step, data)
    for before, v in zip(head_b, model.get_layer("head_b").weights):
        np.testing.assert_array_equal(v.numpy(), before)
    warnings = [r.message for r in caplog.records if "no gradient reaches" in r.message]
    if policy == "none":
        assert len(warnings) == 1 and "head_b/kernel" in warnings[0]
    else:
        assert warnings == []


class _PassThrough(keras.layers.Layer):
    """Returns its input; its weight is trainable but no loss ever reaches it."""

    def build(self, shape):
        self.w = self.add_weight(shape=(3,), initializer="ones", name="w")

    def call(self, x):
        return x


#: Models built by ``model_with_an_unreached_weight`` from a config, newest last.
BUILT = []


def model_with_an_unreached_weight(*, input_shape, num_outputs, **_):
    """A linear model followed by a pass-through layer whose weight the loss never reaches."""
    model = keras.Sequential([keras.Input(tuple(input_shape)), keras.layers.Dense(num_outputs),
                              _PassThrough(name="unreached")], name="partly_reached")
    BUILT.append(model)
    return model


@pytest.mark.parametrize("policy", ["none", "zero"])
def test_unconnected_gradients_from_the_config_reach_the_step(make_cfg, tmp_path, caplog,
                                                              policy):
    """``tape.unconnected_gradients=zero`` must reach the step: with AdamW a zero gradient
    still applies the decoupled weight decay, so the unreached weight decays by exactly
    ``(1 - lr * weight_decay)`` per step; with ``none`` it is left alone and named once."""
    from trainer.driver.run import run

    lr, decay, steps = 0.1, 0.5, 3
    cfg = make_cfg(
        "data=synthetic", "optimizer=adamw", f"optimizer.learning_rate={lr}",
        f"optimizer.weight_decay={decay}", "trainer.epochs=1", f"trainer.max_steps={steps}",
        "trainer.steps_per_execution=1", "callbacks=none",
        "model._target_=tests.test_tape.model_with_an_unreached_weight",
        f"tape.unconnected_gradients={policy}",
    )
    with caplog.at_level(logging.WARNING):
        run(cfg, run_dir=tmp_path)
    w = BUILT[-1].get_layer("unreached").w.numpy()
    named = [r for r in caplog.records if "unreached/w" in r.getMessage()]
    if policy == "none":
        np.testing.assert_array_equal(w, np.ones(3, np.float32))
        assert len(named) == 1
    else:
        expected = np.ones(3, np.float32)
        for _ in range(steps):
            expected = expected - expected * np.float32(decay) * np.float32(lr)
        np.testing.assert_allclose(w, expected, rtol=1e-6)
        assert named == []


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


class ShadowNormStep(TapeStep):
    """Logs the norm of a trainable variable that the loss never reads (an EMA-style shadow
    copy), and keeps the variables the step's tape watched when its gradients were taken."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.shadow = tf.Variable([3.0, 4.0], trainable=True, name="metric_shadow")
        self.watched = []

    def compute_metrics(self, y, y_pred):
        return {**super().compute_metrics(y, y_pred), "shadow_norm": tf.norm(self.shadow)}

    def gradients(self, tape, loss, variables):
        self.watched.append(list(tape.watched_variables()))
        return super().gradients(tape, loss, variables)


class ShadowPolicy(ResetPolicy):
    """A reset policy whose loss check also reads a trainable variable (never true)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.shadow = tf.Variable(1.0, trainable=True, name="policy_shadow")

    def check_loss(self, loss):
        return tf.logical_or(super().check_loss(loss), self.shadow < 0.0)


@pytest.mark.parametrize("reset", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_metrics_and_reset_checks_are_not_recorded_on_the_tape(compiled, reset):
    """The default step computes its metrics and the reset policy's checks under
    ``tape.stop_recording()``. Neither changes a gradient if recorded (neither is part of
    the loss), so what the guarantee observably means is: the tape does not record them,
    and a trainable variable that only a metric or the reset check reads is not watched.
    The tape still watches exactly the model's variables."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="lin")])
    policy = ShadowPolicy(when=["nonfinite", "spike"], spike_window=2) if reset else None
    step = ShadowNormStep(model=model, optimizer=keras.optimizers.SGD(0.1), task="regression",
                          reset=policy)
    step.build()
    x, y = tf.constant([[1.0, 2.0], [3.0, -1.0]]), tf.constant([[1.0], [0.0]])
    logs = (tf.function(step.train_step) if compiled else step.train_step)((x, y))
    assert float(logs["shadow_norm"]) == pytest.approx(5.0)
    (watched,) = step.watched
    names = sorted(v.name for v in watched)
    assert names == sorted(f"{v.path}:0" for v in model.trainable_variables)
    assert not any(v is step.shadow or (reset and v is policy.shadow) for v in watched)


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
    return DataModule(train=(x, y), val=(x[:8] * 0, y[:8] * 0), task="regression",
                      batching=Batching(batch_size=batch, shuffle=False), allow_nonfinite=True)


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


@pytest.mark.parametrize("run_eagerly", [False, True])
@pytest.mark.parametrize("when", ["threshold", "nonfinite"])
def test_reset_steps_are_left_out_of_the_epoch_means(when, run_eagerly):
    """A discarded step counts neither in train/loss nor in the metrics' example weights.

    One batch is planted (a huge target, or a NaN feature); with learning rate 0 the
    weights stay fixed, so the epoch's means are the per-example values on the other
    batches, computed here directly.
    """
    n, batch, bad = 60, 8, 2  # 7 full batches and a short one of 4; batch 2 is planted
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]])).astype("float32")
    if when == "threshold":
        y[bad * batch + 1] = 1e4
    else:
        x[bad * batch + 1, 0] = np.nan
    data = DataModule(train=(x, y), val=(x[:8] * 0, y[:8] * 0), task="regression",
                      batching=Batching(batch_size=batch, shuffle=False), allow_nonfinite=True)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="lin")])
    policy = ResetPolicy(when=[when], threshold=1e3 if when == "threshold" else None)
    step = TapeStep(model=model, optimizer=keras.optimizers.SGD(0.0), task="regression",
                    reset=policy)
    logs = Trainer(epochs=1, steps_per_execution=3, run_eagerly=run_eagerly).fit(step, data)
    assert logs["train/tape/resets"] == 1
    keep = np.ones(n, bool)
    keep[bad * batch:(bad + 1) * batch] = False
    err = model(x[keep]).numpy().astype("float64") - y[keep]
    assert logs["train/loss"] == pytest.approx(np.mean(err**2), rel=1e-6)
    assert logs["train/mae"] == pytest.approx(np.mean(np.abs(err)), rel=1e-6)


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
