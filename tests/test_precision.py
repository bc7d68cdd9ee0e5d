"""Mixed precision: bfloat16 and float16 policies, dynamic loss scaling, skipped overflows."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import StepInfo, TapeStep, UserError
from trainer.optim import LossScale


@pytest.fixture(autouse=True)
def float32_after():
    yield
    keras.mixed_precision.set_global_policy("float32")


def _dense(make_cfg, tmp_path, precision):
    from trainer.run import build

    r = build(make_cfg("+experiment=dense", "callbacks=none", f"precision={precision}"),
              tmp_path / precision)
    return r, r.trainer.fit(r.step, r.data)


def test_each_precision_trains_the_dense_experiment_as_float32_does(make_cfg, tmp_path):
    _, base = _dense(make_cfg, tmp_path, "float32")
    for precision in ("mixed_bfloat16", "mixed_float16"):
        r, logs = _dense(make_cfg, tmp_path, precision)
        compute = {layer.compute_dtype for layer in r.models["model"].layers}
        assert compute == {precision.removeprefix("mixed_")}, compute
        # Variables stay float32; the loss and metrics are computed in float32.
        assert {v.dtype for v in r.models["model"].weights} == {"float32"}
        assert abs(logs["val/accuracy"] - base["val/accuracy"]) <= 0.01, (precision, logs)
    assert logs["train/precision/loss_scale"] > 1 and logs["train/precision/overflows"] == 0
    # The policy is set for every run: a float32 run after a mixed one is float32 again.
    r, _ = _dense(make_cfg, tmp_path, "float32")
    assert r.models["model"].layers[0].compute_dtype == "float32"


def _half_step(scale=2.0**15):
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.Dense(1)])
    step = TapeStep(model=model, optimizer=keras.optimizers.Adam(0.01), task="regression")
    step.use_loss_scale(LossScale(initial_scale=scale))
    step.build()
    return step, model


@pytest.mark.parametrize("compiled", [True, False])
def test_an_overflowing_step_is_skipped_counted_and_halves_the_scale(compiled):
    step, model = _half_step()
    def run(batch, i):
        return step.train_step(batch, StepInfo(global_step=tf.constant(i, tf.int64)))

    run = tf.function(run) if compiled else run
    before = [w.numpy() for w in model.weights]
    # Targets of 1e4: the loss (~1e8) times the scale 2**15 overflows float16's 65504 in
    # the backward pass, so the gradients come back infinite.
    x = tf.ones([8, 3])
    run((x, tf.fill([8, 1], 1e4)), 0)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))
    assert int(step.loss_scale.overflows.numpy()) == 1
    assert float(step.loss_scale.value.numpy()) == 2.0**14
    assert int(step.optimizer.iterations.numpy()) == 0
    # A normal batch then updates: the scale was unscaled out of the gradients.
    run((x, tf.zeros([8, 1])), 1)
    assert int(step.optimizer.iterations.numpy()) == 1
    assert not all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))


def test_the_loss_scale_is_divided_out_exactly():
    # A power-of-two scale on a float32 model: the update equals the unscaled one exactly.
    weights = {}
    for scaled in (False, True):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        step = TapeStep(model=model, optimizer=keras.optimizers.Adam(0.01), task="regression")
        if scaled:
            step.use_loss_scale(LossScale(initial_scale=2.0**10))
        step.build()
        x = tf.reshape(tf.range(12, dtype=tf.float32), [4, 3]) / 10
        def update(batch, step=step):
            return step.train_step(batch, StepInfo.at(0))

        update = tf.function(update)
        for _ in range(3):
            update((x, tf.ones([4, 2])))
        weights[scaled] = [w.numpy() for w in model.weights]
    for a, b in zip(weights[False], weights[True]):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_the_scale_grows_after_growth_interval_good_steps():
    step, _ = _half_step(scale=8.0)
    step.loss_scale.growth_interval = 2
    x = tf.ones([8, 3])
    for i in range(4):
        step.train_step((x, tf.zeros([8, 1])), StepInfo.at(i))
    assert float(step.loss_scale.value.numpy()) == 32.0


def test_an_unknown_precision_is_an_error(make_cfg, tmp_path):
    from trainer.run import build

    with pytest.raises(UserError, match="precision='float8'"):
        build(make_cfg("+experiment=dense", "precision=float8"), tmp_path)
