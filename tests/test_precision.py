"""Mixed precision: bfloat16 and float16 policies, dynamic loss scaling, skipped overflows."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import regression_data
from trainer import StepInfo, TapeStep, Trainer, UserError
from trainer.common.keys import SAMPLED
from trainer.step.optimizers import LossScale


@pytest.fixture(autouse=True)
def float32_after():
    yield
    keras.mixed_precision.set_global_policy("float32")


def _dense(make_cfg, tmp_path, precision):
    from trainer.driver.run import build

    r = build(make_cfg("+experiment=dense", "callbacks=none", f"precision={precision}"),
              tmp_path / precision)
    return r, r.trainer.fit(r.step, r.data)


@pytest.mark.slow
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


@pytest.mark.parametrize("compiled", [True, False])
def test_the_logged_gradient_norm_has_the_loss_scale_divided_out(compiled):
    # Also at the update that grows the scale (growth_interval 1): the norm divides out the
    # scale its gradients were multiplied by, not the grown one.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    step = TapeStep(model=model, optimizer=keras.optimizers.SGD(0.01), task="regression")
    step.use_loss_scale(LossScale(initial_scale=2.0**10, growth_interval=1))
    step.build()
    x, y = tf.reshape(tf.range(12, dtype=tf.float32), [4, 3]) / 10, tf.ones([4, 2])
    expected = float(tf.linalg.global_norm(list(step.gradients_by_path((x, y)).values())))
    def run(batch):
        return step.train_step(batch, StepInfo.at(0))

    logs = (tf.function(run) if compiled else run)((x, y))
    assert float(step.loss_scale.value.numpy()) == 2.0**11  # grown by this update
    assert float(logs[SAMPLED]["grad_norm"]) == pytest.approx(expected, rel=1e-6)


def test_the_scale_grows_after_growth_interval_good_steps():
    step, _ = _half_step(scale=8.0)
    step.loss_scale.growth_interval = 2
    x = tf.ones([8, 3])
    for i in range(4):
        step.train_step((x, tf.zeros([8, 1])), StepInfo.at(i))
    assert float(step.loss_scale.value.numpy()) == 32.0


def test_an_unknown_precision_is_an_error(make_cfg, tmp_path):
    from trainer.driver.run import build

    with pytest.raises(UserError, match="precision='float8'"):
        build(make_cfg("+experiment=dense", "precision=float8"), tmp_path)


#: A float16 regression run of 24 steps (12 an epoch), checkpointed every 5. Its first update
#: overflows at the initial scale 2**15, which halves; with a growth interval of 5 good steps
#: (2,000 by default) the scale then grows and backs off again, so at the checkpoint at step
#: 15 and at the end its value and counts all differ from a fresh start's.
FLOAT16_RUN = [
    "data=synthetic", "precision=mixed_float16", "model.hidden_units=[16,8]",
    "model.dropout=0.3", "trainer.epochs=2", "trainer.steps_per_execution=1",
    "~callbacks.tensorboard", "~callbacks.profile", "callbacks.progress.mode=log",
    "callbacks.checkpoint.every_n_steps=5", "callbacks.checkpoint.every_seconds=0",
    "callbacks.checkpoint.min_interval_seconds=0",
]


def _float16_run(make_cfg, run_dir, *callbacks):
    from trainer.driver.run import build

    r = build(make_cfg(*FLOAT16_RUN), run_dir)
    r.step.loss_scale.growth_interval = 5
    r.trainer.callbacks.extend(callbacks)
    return r


@pytest.mark.slow
def test_a_resumed_mixed_float16_run_ends_bit_identical_with_the_same_loss_scale(make_cfg,
                                                                                 tmp_path):
    """The loss scale, its good-step count and its overflow count are training state: a
    resumed run that started again at 2**15 would skip other updates and log other
    scales than the run it continues."""
    from tests.helpers import Crash
    from trainer import Callback

    class Scales(Callback):
        """The loss scale logged after each execution (one step each), by global step."""

        def __init__(self):
            self.by_step = {}

        def on_execution_end(self, trainer, global_step, logs):
            self.by_step[global_step] = logs["train/precision/loss_scale"]

    def scale_state(r):
        return {k: v.numpy().item() for k, v in r.step.loss_scale.state().items()}

    def weights(r):
        return [v.numpy() for m in r.models.values() for v in m.weights]

    straight_scales = Scales()
    straight = _float16_run(make_cfg, tmp_path / "straight", straight_scales)
    straight.trainer.fit(straight.step, straight.data)
    final = scale_state(straight)
    # A run the check can fail on: the scale moved both ways, and is not 2**15 at the
    # checkpoint the resumed run starts from nor at the end.
    assert {2.0**14, 2.0**15} <= set(straight_scales.by_step.values())
    assert straight_scales.by_step[15] != 2.0**15
    assert final["value"] != 2.0**15 and final["overflows"] >= 2

    crashed = _float16_run(make_cfg, tmp_path / "resumed", Crash(at_step=17))
    with pytest.raises(RuntimeError, match="crash at step 17"):
        crashed.trainer.fit(crashed.step, crashed.data)
    resumed_scales = Scales()
    resumed = _float16_run(make_cfg, tmp_path / "resumed", resumed_scales)
    resumed.trainer.fit(resumed.step, resumed.data)

    assert resumed.trainer.restored_from.endswith("ckpt-15")
    assert resumed.trainer.current_step == straight.trainer.current_step == 24
    assert resumed_scales.by_step == {s: v for s, v in straight_scales.by_step.items()
                                      if s > 15}
    assert scale_state(resumed) == final
    for a, b in zip(weights(straight), weights(resumed), strict=True):
        assert np.array_equal(a, b)
    assert resumed.trainer.history == straight.trainer.history


def test_an_epoch_ending_on_an_overflowing_step_goes_on():
    # Every step of the first epoch overflows float16 at a scale of 2**40, the last one
    # (the sampled step of the epoch's last execution) too: its gradient norm is infinite,
    # which under a loss scale is no divergence (the update is skipped, the scale halves).
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        step, model = _half_step(scale=2.0**40)
        before = [w.numpy() for w in model.weights]
        trainer = Trainer(epochs=2, steps_per_execution=1)
        trainer.fit(step, regression_data(n=64, batch_size=16))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    first, second = trainer.history
    assert first["train/precision/overflows"] == 4, first
    assert not math.isfinite(first["train/grad_norm"]), first
    assert second["train/precision/overflows"] == 8 and math.isfinite(second["train/loss"])
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))
