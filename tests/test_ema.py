"""trainer.ema: the exponential moving average of the weights, updated inside the step."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import fit_linear, regression_data
from trainer import Callback, TapeStep, Trainer
from trainer.common.errors import UserError
from trainer.step.averaging import EmaSettings, WeightAverage


class Record(Callback):
    """The model's weights at the start and after every execution."""

    def __init__(self):
        self.weights = []

    def on_fit_start(self, trainer):
        self.weights.append([v.numpy().copy() for v in trainer.models["model"].weights])

    def on_execution_end(self, trainer, global_step, logs):
        self.weights.append([v.numpy().copy() for v in trainer.models["model"].weights])


def _averages(trainer):
    return [v.numpy() for v in trainer.averages.averages["model"]]


def _expected(weights, decay, warmup):
    average = [w.astype(np.float64) for w in weights[0]]
    for n, ws in enumerate(weights[1:]):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        average = [d * a + (1 - d) * w for a, w in zip(average, ws)]
    return average


@pytest.mark.parametrize("warmup", [False, True])
@pytest.mark.parametrize("mode", ["compiled", "eager", "xla"])
def test_the_average_follows_every_update(mode, warmup):
    record = Record()
    trainer, model, _ = fit_linear(spe=1, epochs=2, callbacks=[record],
                                   run_eagerly=mode == "eager", jit_compile=mode == "xla",
                                   ema={"decay": 0.8, "warmup": warmup})
    assert len(record.weights) == 1 + 2 * 7  # 100 examples in batches of 16: 7 steps
    expected = _expected(record.weights, 0.8, warmup)
    for got, want in zip(_averages(trainer), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The run ships the average (trainer.ema.weights=averaged, the default).
    for v, want in zip(model.weights, expected):
        np.testing.assert_allclose(v.numpy(), want, rtol=1e-5, atol=1e-6)


def test_many_steps_per_execution_update_the_average_at_every_step():
    one, _, _ = fit_linear(spe=1, ema={"decay": 0.7})
    many, _, _ = fit_linear(spe=5, ema={"decay": 0.7})
    for a, b in zip(_averages(one), _averages(many)):
        np.testing.assert_allclose(b, a, rtol=1e-6)


def test_accumulation_updates_the_average_once_per_update():
    data = regression_data(n=96, batch_size=16, shuffle=False)
    one, _, _ = fit_linear(data=data, ema={"decay": 0.7})
    data = regression_data(n=96, batch_size=16, shuffle=False)
    four, _, _ = fit_linear(data=data, ema={"decay": 0.7}, accumulate_steps=4)
    for a, b in zip(_averages(one), _averages(four)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_the_average_leaves_training_alone_and_validation_reports_both():
    _, plain, plain_logs = fit_linear()
    trainer, model, logs = fit_linear(ema={"decay": 0.9, "weights": "trained"})
    # The swap for val_ema/ puts the trained weights back exactly.
    for a, b in zip(plain.weights, model.weights):
        np.testing.assert_array_equal(b.numpy(), a.numpy())
    assert logs["val/loss"] == plain_logs["val/loss"]
    assert logs["val_ema/loss"] != logs["val/loss"]
    # val_ema/ is the evaluation of the averaged weights.
    with trainer.averages.swapped():
        assert trainer.evaluate()["val/loss"] == pytest.approx(logs["val_ema/loss"], rel=1e-6)
    # decay 0: the average is the weights.
    _, _, same = fit_linear(ema={"decay": 0.0})
    assert same["val_ema/loss"] == pytest.approx(same["val/loss"], rel=1e-6)


@pytest.mark.parametrize("mode", ["compiled", "eager"])
def test_a_mixed_float16_run_averages_every_step_skipped_overflows_included(mode):
    # A loss scale of 2**20 overflows float16 in the backward pass: the first updates are
    # skipped (the weights stay) and the scale halves until it fits. The average moves
    # towards the weights after every step, skipped or not, in float32.
    from trainer.step.optimizers import LossScale

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        record = Record()
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                                  keras.layers.Dense(1)])
        step = TapeStep(model=model, optimizer=keras.optimizers.SGD(0.05), task="regression")
        step.use_loss_scale(LossScale(initial_scale=2.0**20))
        trainer = Trainer(epochs=2, steps_per_execution=1, callbacks=[record],
                          run_eagerly=mode == "eager", ema={"decay": 0.8})
        trainer.fit(step, regression_data())
    finally:
        keras.mixed_precision.set_global_policy("float32")
    overflows = int(step.loss_scale.overflows.numpy())
    assert 0 < overflows < 14  # some steps skipped, some applied
    unchanged = sum(all(np.array_equal(a, b) for a, b in zip(w0, w1))
                    for w0, w1 in zip(record.weights, record.weights[1:]))
    assert unchanged == overflows
    expected = _expected(record.weights, 0.8, False)
    assert {v.dtype for v in trainer.averages.averages["model"]} == {tf.float32}
    for got, want in zip(_averages(trainer), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_average_is_float32_whatever_the_weights():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, dtype="float16")])
    average = WeightAverage({"model": model}, decay=0.5)
    assert {v.dtype for v in average.averages["model"]} == {tf.float32}
    start = average.averages["model"][0].numpy()
    model.layers[0].kernel.assign(np.full((3, 2), 2.0, np.float16))
    average.update(0)
    np.testing.assert_allclose(average.averages["model"][0].numpy(), 0.5 * start + 1.0,
                               rtol=1e-6)


@pytest.mark.parametrize("node,message", [
    ({"decay": 1.0}, r"trainer.ema.decay=1.0 must be in \[0, 1\)"),
    ({"decay": 0.9, "weights": "best"}, "trainer.ema.weights='best' must be one of"),
    ({"decay": 0.9, "beta": 1}, "trainer.ema.beta is not a setting"),
])
def test_bad_settings_are_one_line_errors(node, message):
    with pytest.raises(UserError, match=message):
        EmaSettings.read(node)


SGD = ["+experiment=dense", "model.dropout=0.0", "optimizer=sgd", "optimizer.momentum=0.0",
       "trainer.ema.decay=0.9", "trainer.steps_per_execution=5"]


def _build(make_cfg, run_dir, *overrides):
    from trainer.driver.run import build

    return build(make_cfg(*SGD, *overrides), run_dir)


@pytest.mark.slow
def test_mirrored_average_equals_one_device(make_cfg, tmp_path):
    one = _build(make_cfg, tmp_path / "one", "callbacks=none", "trainer.max_steps=20")
    one.trainer.fit(one.step, one.data)
    two = _build(make_cfg, tmp_path / "two", "callbacks=none", "trainer.max_steps=20",
                 "distribute=mirrored", "distribute.cpu_replicas=2")
    two.trainer.fit(two.step, two.data)
    for a, b in zip(_averages(one.trainer), _averages(two.trainer)):
        np.testing.assert_allclose(b, a, atol=1e-6)


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_average_of_an_uninterrupted_one(make_cfg, tmp_path):
    whole = _build(make_cfg, tmp_path / "whole", "trainer.max_steps=30")
    whole.trainer.fit(whole.step, whole.data)
    first = _build(make_cfg, tmp_path / "cut", "trainer.max_steps=12")
    first.trainer.fit(first.step, first.data)
    rest = _build(make_cfg, tmp_path / "cut", "trainer.max_steps=30")
    rest.trainer.fit(rest.step, rest.data)
    assert rest.trainer.restored_from
    for a, b in zip(_averages(whole.trainer), _averages(rest.trainer)):
        np.testing.assert_array_equal(b, a)


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["averaged", "trained"])
def test_the_shipped_weights_follow_the_setting(make_cfg, tmp_path, weights):
    from omegaconf import OmegaConf

    from trainer.driver.load import load_run
    from trainer.driver.run import run

    run_dir = tmp_path / weights
    cfg = make_cfg(*SGD, "trainer.epochs=2", f"trainer.ema.weights={weights}",
                   "callbacks.checkpoint.monitor=val_ema/accuracy",
                   "callbacks.checkpoint.mode=max")
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    run(cfg, run_dir)
    shipped = load_run(str(run_dir))  # model.keras
    from_best = load_run(str(run_dir), checkpoint="best")
    trained = load_run(str(run_dir), checkpoint="best", overrides=["trainer.ema.weights=trained"])
    for a, b in zip(shipped.step.models["model"].weights,
                    from_best.step.models["model"].weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6)
    # Averaged: what ships is the best checkpoint's average, not its trained weights.
    same = all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(
        shipped.step.models["model"].weights, trained.step.models["model"].weights))
    assert same == (weights == "trained")


def test_tensorboard_draws_the_average_beside_validation(tmp_path):
    from tests.tb_reader import load, scalars
    from trainer import TensorBoardCallback

    tb = TensorBoardCallback(histogram_every_n_steps=0)
    _, _, logs = fit_linear(ema={"decay": 0.9}, callbacks=[tb], run_dir=str(tmp_path))
    ema = scalars(load(tmp_path / "tb" / "val_ema"), "loss")
    val = scalars(load(tmp_path / "tb" / "val"), "loss")
    assert [s for s, _ in ema] == [s for s, _ in val] == [7, 14]
    assert ema[-1][1] == pytest.approx(logs["val_ema/loss"], rel=1e-6)
