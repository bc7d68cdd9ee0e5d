"""trainer.swa: stochastic weight averaging, its learning rate and batch-norm statistics."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.helpers import fit_linear, regression_data
from trainer import Callback, TapeStep, Trainer
from trainer.common.errors import UserError
from trainer.data import Batching, DataModule
from trainer.step.averaging import SwaLearningRate, SwaSettings, recompute_batch_norm
from trainer.step.optimizers import GroupedOptimizer


class AtEpochEnd(Callback):
    def __init__(self):
        self.weights = []

    def on_epoch_end(self, trainer, epoch, logs):
        self.weights.append([v.numpy().copy() for v in trainer.models["model"].weights])


def _averages(trainer):
    return [v.numpy() for v in trainer.averages.averages["model"]]


@pytest.mark.parametrize("cycle,taken", [(1, [1, 2, 3]), (2, [1, 3])])
def test_the_average_is_the_mean_of_the_weights_at_each_cycle_end(cycle, taken):
    record = AtEpochEnd()
    trainer, model, logs = fit_linear(epochs=4, callbacks=[record], swa={
        "start_epoch": 0 if cycle == 2 else 1, "cycle_epochs": cycle, "weights": "trained"})
    expected = [np.mean([record.weights[e][i] for e in taken], axis=0)
                for i in range(len(record.weights[0]))]
    for got, want in zip(_averages(trainer), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert int(trainer.averages.count.numpy()) == len(taken)
    # weights=trained: the model keeps its own weights; val_swa/ evaluates the mean.
    for v, w in zip(model.weights, record.weights[-1]):
        np.testing.assert_array_equal(v.numpy(), w)
    assert "val_swa/loss" in logs and logs["val_swa/loss"] != logs["val/loss"]
    assert "val_swa/loss" not in trainer.history[0]  # nothing averaged yet


def test_the_run_ships_the_average():
    trainer, model, _ = fit_linear(epochs=3, swa={"start_epoch": 1})
    for v, a in zip(model.weights, _averages(trainer)):
        np.testing.assert_allclose(v.numpy(), a, rtol=1e-6)


def test_the_swa_rate_is_constant_or_falls_over_each_cycle():
    constant = SwaLearningRate(0.1, start_step=10, lr=0.05)
    assert [round(float(constant(s)), 6) for s in (0, 9, 10, 30)] == [0.1, 0.1, 0.05, 0.05]
    cyclic = SwaLearningRate(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5),
                             start_step=10, lr=0.05, lr_min=0.01, cycle_steps=4)
    assert float(cyclic(0)) == pytest.approx(0.1)
    assert float(cyclic(9)) == pytest.approx(0.1 * 0.5 ** 0.9)  # the run's schedule
    # t = 1/4, 2/4, 3/4, 1 over each cycle of 4 updates: ends at lr_min.
    got = [float(cyclic(s)) for s in range(10, 18)]
    want = [0.05 - 0.04 * t for t in (0.25, 0.5, 0.75, 1.0)] * 2
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # It travels in an optimizer's config: parameter groups clone the optimizer from it.
    opt = GroupedOptimizer(keras.optimizers.SGD(learning_rate=cyclic),
                           groups=[{"patterns": ["*"], "lr_scale": 0.5}])
    v = keras.Variable(np.zeros(2, np.float32), name="w")
    opt.build([v])
    clone = opt.optimizers["group_0"]
    assert float(clone.learning_rate) == pytest.approx(0.5 * float(cyclic(0)))


def test_batch_norm_statistics_are_the_mean_of_one_pass():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(96, 2)).astype("float32")
    data = DataModule(train=(x, x[:, :1]), val=(x[:8], x[:8, :1]), task="regression",
                      batching=Batching(batch_size=32, shuffle=False))
    model = keras.Sequential([keras.Input((2,)), keras.layers.BatchNormalization(momentum=0.9)])
    assert recompute_batch_norm([model], data) == 3
    batches = x.reshape(3, 32, 2)
    bn = model.layers[0]
    np.testing.assert_allclose(bn.moving_mean.numpy(), batches.mean(axis=1).mean(axis=0),
                               rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), batches.var(axis=1).mean(axis=0),
                               rtol=1e-4)
    assert bn.momentum == 0.9  # put back


def _fit_bn_dropout(**swa):
    data = regression_data(n=96, d=3, batch_size=32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization(), keras.layers.Dropout(0.3),
                              keras.layers.Dense(1)])
    step = TapeStep(model=model, optimizer=keras.optimizers.SGD(0.05), task="regression")
    trainer = Trainer(epochs=3, steps_per_execution=3, swa=swa or None)
    trainer.fit(step, data)
    return trainer, model, data


def test_evaluating_the_average_leaves_training_alone():
    # The batch-norm pass runs the model in training mode (dropout draws masks): the random
    # state goes back, so the trained weights are those of a run without SWA.
    _, plain, _ = _fit_bn_dropout()
    _, model, _ = _fit_bn_dropout(start_epoch=0, weights="trained")
    for a, b in zip(plain.weights, model.weights):
        np.testing.assert_array_equal(b.numpy(), a.numpy())


def test_a_model_with_batch_norm_ships_statistics_of_its_average():
    _, model, data = _fit_bn_dropout(start_epoch=1)
    bn = model.layers[1]
    expected_mean = bn.moving_mean.numpy().copy()
    # The shipped statistics are those of one pass with the shipped (averaged) weights.
    recompute_batch_norm([model], data)
    np.testing.assert_allclose(bn.moving_mean.numpy(), expected_mean, rtol=1e-5)


@pytest.mark.parametrize("node,message", [
    ({"start_epoch": 1, "lr_min": 0.01}, "trainer.swa.lr_min needs trainer.swa.lr"),
    ({"start_epoch": 1, "cycle_epochs": 0}, "trainer.swa.cycle_epochs=0 must be >= 1"),
    ({"start_epoch": -1}, "trainer.swa.start_epoch=-1 must be >= 0"),
    ({"start": 1}, "trainer.swa.start is not a setting"),
])
def test_bad_settings_are_one_line_errors(node, message):
    with pytest.raises(UserError, match=message):
        SwaSettings.read(node)


def test_one_average_per_run():
    with pytest.raises(UserError, match="a run keeps one average"):
        Trainer(ema={"decay": 0.9}, swa={"start_epoch": 1})


SGD = ["+experiment=dense", "model.dropout=0.0", "optimizer=sgd", "optimizer.momentum=0.0",
       "trainer.swa.start_epoch=1", "trainer.swa.lr=0.05", "trainer.swa.lr_min=0.01",
       "trainer.steps_per_execution=5"]


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_average_of_an_uninterrupted_one(make_cfg, tmp_path):
    from trainer.driver.run import build

    def fit(name, *overrides):
        r = build(make_cfg(*SGD, *overrides), tmp_path / name)
        r.trainer.fit(r.step, r.data)
        return r

    whole = fit("whole", "trainer.epochs=4")
    fit("cut", "trainer.epochs=4", "trainer.max_steps=57")  # inside the third epoch
    rest = fit("cut", "trainer.epochs=4")
    assert rest.trainer.restored_from
    assert int(rest.trainer.averages.count.numpy()) == 3
    for a, b in zip(_averages(whole.trainer), _averages(rest.trainer)):
        np.testing.assert_array_equal(b, a)
    # The SWA rate ran its cycles: each epoch (23 updates) falls from 0.05 to 0.01.
    rate = rest.step.optimizer.learning_rate
    assert float(rate) == pytest.approx(0.05 - 0.04 / 23, rel=1e-5)  # next: a cycle's first
    assert rest.trainer.history[0]["train/learning_rate"] == pytest.approx(0.05 - 0.04 / 23)



def test_the_batch_norm_pass_under_a_strategy_equals_one_device():
    # Under a strategy the trainer runs the pass in the strategy's scope, after fit, on whole
    # global batches: the statistics must be those of one device.
    from trainer.distribute import Mirrored

    x = np.random.default_rng(1).normal(1.0, 3.0, size=(96, 2)).astype("float32")
    data = DataModule(train=(x, x[:, :1]), val=(x[:8], x[:8, :1]), task="regression",
                      batching=Batching(batch_size=32, shuffle=False))

    def make():
        keras.utils.set_random_seed(3)
        return keras.Sequential([keras.Input((2,)), keras.layers.Dense(3),
                                 keras.layers.BatchNormalization(momentum=0.9)])

    one = make()
    recompute_batch_norm([one], data)
    with Mirrored(cpu_replicas=2).scope():
        two = make()
        recompute_batch_norm([two], data)
    bn_one, bn_two = one.layers[1], two.layers[1]
    assert not np.allclose(bn_one.moving_mean.numpy(), 0.0)  # the pass changed them
    np.testing.assert_allclose(bn_two.moving_mean.numpy(), bn_one.moving_mean.numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(bn_two.moving_variance.numpy(),
                               bn_one.moving_variance.numpy(), rtol=1e-5)
