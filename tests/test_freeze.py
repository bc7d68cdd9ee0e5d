"""Freezing by pattern, the unfreeze schedule with recompilation, and parameter groups."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import regression_data
from trainer import Callback, FreezeSchedule, GroupedOptimizer, TapeStep, Trainer
from trainer.common.errors import UserError
from trainer.step.freezing import param_counts, set_trainable, variable_table


def _mlp(seed=0, bn=False):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((3,)), keras.layers.Dense(8, activation="tanh", name="body")]
    if bn:
        layers.append(keras.layers.BatchNormalization(name="bn"))
    layers.append(keras.layers.Dense(1, name="head"))
    return keras.Sequential(layers, name="net")


def _fit(model, *, optimizer=None, epochs=2, callbacks=(), run_eagerly=False):
    step = TapeStep(model=model, optimizer=optimizer or keras.optimizers.Adam(1e-2),
                    task="regression")
    trainer = Trainer(epochs=epochs, steps_per_execution=3, run_eagerly=run_eagerly,
                      callbacks=callbacks)
    trainer.fit(step, regression_data())
    return trainer, step


def _values(model, prefix):
    return {v.path: v.numpy().copy() for v in model.variables if prefix in v.path}


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_frozen_values_are_bit_identical_and_get_no_slots(run_eagerly):
    model = _mlp(bn=True)
    set_trainable([model], ["body/*", "bn/*"], False)
    before = _values(model, "body") | _values(model, "bn")
    head = _values(model, "head")
    _, step = _fit(model, run_eagerly=run_eagerly)
    after = _values(model, "body") | _values(model, "bn")
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value)
    assert not model.get_layer("bn").trainable  # frozen the Keras way: BN in inference mode
    assert any(not np.array_equal(v, _values(model, "head")[p]) for p, v in head.items())
    slots = step.optimizer.slot_paths()
    assert not any("body" in s or "bn" in s for s in slots)
    assert any("head_kernel" in s for s in slots)


def test_non_trainable_weights_of_a_custom_layer_are_honoured():
    class Scale(keras.layers.Layer):
        def build(self, shape):
            self.w = self.add_weight(shape=(shape[-1], 1), name="w")
            self.offset = self.add_weight(shape=(1,), name="offset", trainable=False,
                                          initializer="ones")

        def call(self, x):
            return x @ self.w + self.offset

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), Scale(name="scale")], name="custom")
    w0 = model.get_layer("scale").w.numpy().copy()
    _fit(model)
    assert model.get_layer("scale").offset.numpy().tolist() == [1.0]
    assert not np.array_equal(model.get_layer("scale").w.numpy(), w0)
    rows = variable_table([model])
    assert "| custom/scale/offset | [1] | 1 | frozen |" in rows
    assert param_counts([model]) == {"params/trainable": 3, "params/frozen": 1}


def test_pattern_matching_nothing_lists_the_paths():
    with pytest.raises(UserError, match=r"'backbone/\*' matches no variable; paths: "
                                        r"net/body/bias, net/body/kernel, net/head/bias"):
        set_trainable([_mlp()], ["backbone/*"], False)


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_unfreeze_schedule_recompiles_and_trains_the_new_variables(run_eagerly):
    model = _mlp()
    set_trainable([model], ["body/*"], False)
    body0 = _values(model, "body")
    snapshots = []

    class Snapshot(FreezeSchedule):
        def on_epoch_end(self, trainer, epoch, logs):
            snapshots.append(_values(model, "body"))

    schedule = Snapshot(unfreeze=[{"at_epoch": 2, "patterns": ["body/*"]}])
    trainer, step = _fit(model, epochs=3, callbacks=[schedule], run_eagerly=run_eagerly)
    for path, value in body0.items():
        np.testing.assert_array_equal(snapshots[0][path], value)  # frozen during epoch 1
        assert not np.array_equal(snapshots[2][path], value)  # trained after unfreezing
    if not run_eagerly:
        assert trainer.trace_count == 3  # train + eval, then train again after unfreezing
    assert any("body_kernel" in s for s in step.optimizer.slot_paths())
    # The optimizer kept counting: 3 epochs x 7 steps, no reset when it was rebuilt.
    assert int(step.optimizer.iterations.numpy()) == 21


def _adam_state(grouped) -> dict:
    """Every optimizer variable (moments, iteration count) by name, without the optimizer's
    own prefix (a rebuilt optimizer may be named differently)."""
    return {v.path.split("/", 1)[-1]: v.numpy().copy()
            for opt in grouped.optimizers.values() for v in opt.variables}


class _AdamAcrossUnfreeze(Callback):
    """After a FreezeSchedule that unfreezes ``body`` at epoch 2: snapshots the optimizer at
    the end of epoch 1, right after the rebuild, and after the first step of epoch 2; keeps
    the weights and gradients that first step starts from."""

    def __init__(self, batch):
        self.batch = batch

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch == 0:
            self.before = _adam_state(trainer.step.optimizer)

    def on_epoch_start(self, trainer, epoch):
        if epoch == 1:
            assert trainer.recompile_if_needed()  # what the loop does before its next execution
            self.rebuilt = _adam_state(trainer.step.optimizer)
            self.weights = {v.path: v.numpy().copy() for v in trainer.step.trainable_variables}
            grads = trainer.step.gradients_by_path(self.batch)
            self.grads = {k: g.numpy() for k, g in grads.items()}

    def on_execution_end(self, trainer, step, logs):
        if trainer.epoch == 1 and not hasattr(self, "after"):
            self.after = _adam_state(trainer.step.optimizer)
            self.stepped = {v.path: v.numpy().copy() for v in trainer.step.trainable_variables}


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_unfreezing_carries_adam_moments_over_and_training_continues_from_them(run_eagerly):
    """The optimizer rebuilt for the new trainable set keeps the Adam state (m, v, the
    iteration count) of the variables that were already trainable, and the next update is
    Adam's, by hand, from that state; the newly trainable variables start from zero moments."""
    model = _mlp()
    set_trainable([model], ["body/*"], False)
    data = regression_data(shuffle=False)  # epoch 2 starts with the first 16 examples
    batch = (tf.constant(data.x_train[:16]), tf.constant(data.y_train[:16]))
    lr, b1, b2, eps = 1e-2, 0.9, 0.999, 1e-7
    adam = keras.optimizers.Adam(lr, beta_1=b1, beta_2=b2, epsilon=eps)
    probe = _AdamAcrossUnfreeze(batch)
    schedule = FreezeSchedule(unfreeze=[{"at_epoch": 2, "patterns": ["body/*"]}])
    step = TapeStep(model=model, optimizer=adam, task="regression")
    Trainer(epochs=2, steps_per_execution=1, run_eagerly=run_eagerly,
            callbacks=[schedule, probe]).fit(step, data)
    before, rebuilt, after = probe.before, probe.rebuilt, probe.after
    assert before["iteration"] == 7 and any("head" in k for k in before)
    assert not any("body" in k for k in before)  # frozen in epoch 1: no slots
    for name, value in before.items():  # carried over, bit for bit
        np.testing.assert_array_equal(rebuilt[name], value, err_msg=name)
    t = rebuilt["iteration"] + 1
    alpha = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
    for path, w in probe.weights.items():
        slot = "_".join(path.split("/"))
        g = probe.grads[path]
        m0 = rebuilt[f"{slot}_momentum"]
        v0 = rebuilt[f"{slot}_velocity"]
        if "body" in path:
            assert not m0.any() and not v0.any(), path  # new variables: fresh moments
        m = m0 + (g - m0) * (1 - b1)
        v = v0 + (g**2 - v0) * (1 - b2)
        np.testing.assert_allclose(after[f"{slot}_momentum"], m, rtol=1e-5, atol=1e-8)
        np.testing.assert_allclose(after[f"{slot}_velocity"], v, rtol=1e-5, atol=1e-10)
        np.testing.assert_allclose(probe.stepped[path], w - alpha * m / (np.sqrt(v) + eps),
                                   rtol=1e-5, atol=1e-7)
    assert after["iteration"] == t


def test_parameter_groups_scale_the_learning_rate():
    model = _mlp()
    sgd = keras.optimizers.SGD(0.1)
    grouped = GroupedOptimizer(sgd, groups=[{"patterns": ["head/*"], "lr_scale": 0.25}])
    step = TapeStep(model=model, optimizer=grouped, task="regression")
    step.build()
    data = regression_data()
    batch = (tf.constant(data.x_train[:16]), tf.constant(data.y_train[:16]))
    grads = {k: v.numpy() for k, v in step.gradients_by_path(batch).items()}
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    tf.function(step.train_step)(batch)
    for v in model.trainable_variables:
        lr = 0.025 if "head" in v.path else 0.1
        np.testing.assert_allclose(v.numpy(), before[v.path] - lr * grads[v.path],
                                   rtol=1e-5, atol=1e-7)


def test_bad_group_spec_is_a_user_error():
    with pytest.raises(UserError, match=r"optimizer.groups\[0\]"):
        GroupedOptimizer(keras.optimizers.SGD(0.1), groups=[{"lr": 0.1}])


def test_freeze_from_config_writes_table_and_counts(make_cfg, tmp_path):
    import json

    from tests.tb_reader import load
    from trainer.driver.run import run

    cfg = make_cfg("+experiment=dense", "freeze.patterns=[dense_0/*]", "trainer.max_steps=5",
                   "callbacks.tensorboard.histogram_every_n_steps=0")
    run(cfg, run_dir=tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["params/frozen"] == 64 * 256 + 256
    assert metrics["params/trainable"] == 256 * 128 + 128 + 128 * 10 + 10
    text = load(tmp_path / "tb").Tensors("variables")[0].tensor_proto.string_val[0].decode()
    assert "| mlp/dense_0/kernel | [64, 256] | 16,384 | frozen |" in text


def test_unknown_pattern_in_config_fails_before_training(make_cfg, tmp_path):
    from trainer.driver.run import run

    cfg = make_cfg("+experiment=dense", "freeze.patterns=[backbone/*]")
    with pytest.raises(UserError, match=r"freeze\.patterns: pattern 'backbone/\*' matches no"):
        run(cfg, run_dir=tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_the_variable_table_is_logged_again_when_an_unfreeze_recompiles(caplog):
    import logging

    model = _mlp()
    set_trainable([model], ["body/*"], False)
    schedule = FreezeSchedule(unfreeze=[{"at_epoch": 2, "patterns": ["body/*"]}])
    with caplog.at_level(logging.INFO, logger="trainer.training.trainer"):
        _fit(model, epochs=3, callbacks=[schedule])
    tables = [r.getMessage() for r in caplog.records if r.getMessage().startswith("variables:")]
    assert len(tables) == 2  # at the start, and once more for the new trainable set
    assert "| net/body/kernel | [3, 8] | 24 | frozen |" in tables[0]
    assert "| net/body/kernel | [3, 8] | 24 | trainable |" in tables[1]
