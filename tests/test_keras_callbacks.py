"""Standard Keras callbacks in the trainer's loop: events, logs, stop_training, the optimizer."""

from __future__ import annotations

import csv

import keras
import numpy as np
import pytest

from tests.helpers import fit_linear, keras_callbacks_run, regression_data
from trainer import KerasCallbacks, UserError
from trainer.driver.run import build


class Recording(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.calls = []

    def on_train_begin(self, logs=None):
        self.calls.append(("train_begin",))

    def on_epoch_begin(self, epoch, logs=None):
        self.calls.append(("epoch_begin", epoch))

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(("batch_end", batch, sorted(logs)))

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(("epoch_end", epoch, dict(logs)))

    def on_train_end(self, logs=None):
        self.calls.append(("train_end",))


def test_events_and_logs_are_the_ones_keras_callbacks_expect():
    rec = Recording()
    _, model, logs = fit_linear(epochs=2, spe=4, callbacks=[KerasCallbacks(callbacks=[rec])])
    kinds = [c[0] for c in rec.calls]
    assert kinds[0] == "train_begin" and kinds[-1] == "train_end"
    assert [c[1] for c in rec.calls if c[0] == "epoch_begin"] == [0, 1]
    ends = [c for c in rec.calls if c[0] == "epoch_end"]
    assert [e[1] for e in ends] == [0, 1]
    # Keras names: loss, val_loss, mae, val_mae, learning_rate; values are the trainer's.
    last = ends[-1][2]
    assert {"loss", "val_loss", "mae", "val_mae", "learning_rate"} <= set(last)
    assert last["val_loss"] == pytest.approx(logs["val/loss"])
    assert rec.model._model is model
    # One batch_end per execution: 100 examples at batch 16 are 7 steps, 4 + 3 per epoch.
    assert [c[1] for c in rec.calls if c[0] == "batch_end"] == [3, 6, 3, 6]


@pytest.mark.slow
def test_reduce_lr_on_plateau_lowers_the_steps_learning_rate(make_cfg, tmp_path):
    # min_delta=10: no epoch counts as an improvement, so after patience=1 epochs the rate
    # halves, again and again; the optimizer really trains at the lowered rate.
    r = build(make_cfg("+experiment=dense", "callbacks=none", "trainer.epochs=5",
                       "optimizer.learning_rate=1e-2"), tmp_path)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=1,
                                                min_delta=10.0)
    r.trainer.callbacks.append(KerasCallbacks(callbacks=[plateau]))
    r.trainer.fit(r.step, r.data)
    rates = [epoch["train/learning_rate"] for epoch in r.trainer.history]
    assert rates[0] == pytest.approx(1e-2)
    assert rates[-1] == pytest.approx(1e-2 * 0.5 ** 3, rel=1e-5)  # epochs 2, 3, 4 lowered it
    assert float(r.step.optimizer.learning_rate) == pytest.approx(1e-2 * 0.5 ** 4, rel=1e-5)


def test_reduce_lr_keeps_parameter_group_scales(make_cfg, tmp_path):
    r = build(make_cfg("+experiment=finetune", "callbacks=none", "trainer.epochs=3",
                       "model.pretrain_epochs=1"), tmp_path)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.1, patience=0,
                                                min_delta=10.0, min_lr=0.0)
    r.trainer.callbacks.append(KerasCallbacks(callbacks=[plateau]))
    r.trainer.fit(r.step, r.data)
    opt = r.step.optimizer
    base = float(opt.optimizers["base"].learning_rate)
    assert base == pytest.approx(1e-2 * 0.1 ** 2, rel=1e-4)  # epoch 0 is the best; 1, 2 cut
    for name, group in opt.optimizers.items():
        if name != "base":
            assert float(group.learning_rate) == pytest.approx(base * 0.1, rel=1e-4)


def test_keras_early_stopping_stops_the_trainer():
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0)
    trainer, _, _ = fit_linear(epochs=6, callbacks=[KerasCallbacks(callbacks=[stop])])
    assert trainer.stop_training and trainer.epoch == 1  # epoch 0 sets the best, 1 stops
    assert stop.stopped_epoch == 1


def test_keras_early_stopping_leaves_the_last_weights_to_a_preempted_run():
    """A preempted run is not over: a resumed run must go on from the last weights, so Keras'
    restore_best_weights waits for the end of training (as the trainer's own callbacks do)."""
    import os
    import signal

    from trainer.callbacks.base import Callback

    class Preempt(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 2:
                self.weights = [w.numpy() for w in trainer.step.models["model"].weights]
                os.kill(os.getpid(), signal.SIGTERM)

    # min_delta=10: epoch 0 stays the best; the patience outlasts the run.
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=50, min_delta=10.0,
                                         restore_best_weights=True)
    preempt = Preempt()
    trainer, model, _ = fit_linear(epochs=6, callbacks=[KerasCallbacks(callbacks=[stop]),
                                                        preempt])
    assert trainer.preempted == "SIGTERM" and stop.best_epoch == 0
    for kept, w in zip(preempt.weights, model.weights):
        np.testing.assert_array_equal(w.numpy(), kept)
    assert trainer.weights_epoch is None


def test_terminate_on_nan_stops_after_the_first_nan_execution():
    from tests.helpers import linear_model
    from trainer import TapeStep, Trainer

    data = regression_data(n=96, batch_size=16, allow_nonfinite=True)
    data.x_train[40, 0] = np.nan  # in the third batch of epoch 0 (no shuffle below)
    data.shuffle = False
    steps = {}
    for terminate in (False, True):
        callbacks = [KerasCallbacks(callbacks=[keras.callbacks.TerminateOnNaN()])] * terminate
        trainer = Trainer(epochs=3, steps_per_execution=1, jit_compile=False,
                          callbacks=callbacks)
        step = TapeStep(model=linear_model(), optimizer=keras.optimizers.SGD(0.05),
                        task="regression")
        with pytest.raises(FloatingPointError):  # the epoch's logs are NaN either way
            trainer.fit(step, data)
        steps[terminate] = trainer.current_step
    assert steps == {True: 3, False: 6}  # stopped right after the NaN step, or the epoch


def test_csv_logger_writes_a_row_per_epoch_into_the_run_dir(tmp_path):
    logger = keras.callbacks.CSVLogger("epochs.csv")
    fit_linear(epochs=3, run_dir=str(tmp_path), callbacks=[KerasCallbacks(callbacks=[logger])])
    with open(tmp_path / "epochs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert {"loss", "val_loss", "learning_rate"} <= set(rows[0])


def test_from_yaml_and_bad_entries(make_cfg, tmp_path):
    r = build(make_cfg(
        "+experiment=dense", "callbacks=none", "trainer.epochs=2",
        "+callbacks.keras._target_=trainer.KerasCallbacks",
        "+callbacks.keras.callbacks=[{_target_: keras.callbacks.CSVLogger, filename: log.csv}]"),
        tmp_path)
    r.trainer.fit(r.step, r.data)
    assert (tmp_path / "log.csv").read_text().count("\n") == 3
    with pytest.raises(UserError, match=r"is not a keras\.callbacks\.Callback"):
        KerasCallbacks(callbacks=[object()])


#: A run with Keras callbacks acting at fixed epochs (tests.helpers.keras_callbacks_run).
KERAS_RUN = keras_callbacks_run(checkpoint_every=5)


def _keras_callbacks(r):
    adapter = next(cb for cb in r.trainer.callbacks if isinstance(cb, KerasCallbacks))
    return adapter.callbacks


def test_keras_callbacks_state_survives_a_restart(make_cfg, tmp_path):
    from tests.helpers import Crash

    cfg = make_cfg(*KERAS_RUN)
    straight = build(cfg, tmp_path / "straight")
    straight.trainer.fit(straight.step, straight.data)
    stop, plateau = _keras_callbacks(straight)
    assert stop.stopped_epoch == 4 and straight.trainer.current_step == 60
    assert straight.trainer.weights_epoch == 1  # the first epoch's weights, restored

    crashed = build(cfg, tmp_path / "resumed")
    crashed.trainer.callbacks.append(Crash(at_step=33))  # in epoch 2; the checkpoint at 30
    with pytest.raises(RuntimeError, match="crash at step"):
        crashed.trainer.fit(crashed.step, crashed.data)
    resumed = build(cfg, tmp_path / "resumed")
    resumed.trainer.fit(resumed.step, resumed.data)
    assert resumed.trainer.restored_from.endswith("ckpt-30")
    again_stop, again_plateau = _keras_callbacks(resumed)
    for attribute in ("wait", "stopped_epoch", "best", "best_epoch"):
        assert getattr(again_stop, attribute) == getattr(stop, attribute), attribute
    for attribute in ("wait", "best", "cooldown_counter"):
        assert getattr(again_plateau, attribute) == getattr(plateau, attribute), attribute
    assert resumed.trainer.current_step == 60 and resumed.trainer.weights_epoch == 1
    assert resumed.trainer.history == straight.trainer.history  # learning rates included
    for a, b in zip(resumed.models["model"].weights, straight.models["model"].weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_keras_callbacks_state_is_in_the_checkpoint(make_cfg, tmp_path):
    import tensorflow as tf

    r = build(make_cfg(*KERAS_RUN, "trainer.max_steps=30"), tmp_path)
    r.trainer.fit(r.step, r.data)
    path = tf.train.latest_checkpoint(str(tmp_path / "checkpoints"))
    names = {n for n, _ in tf.train.list_variables(path)}
    attributes = "callbacks/keras/{}/attributes/.ATTRIBUTES/py_state"
    assert {attributes.format("EarlyStopping_0"),
            attributes.format("ReduceLROnPlateau_1")} <= names
    weights = sorted(n for n in names if n.startswith("callbacks/keras/EarlyStopping_0/"
                                                      "best_weights/"))
    assert len(weights) == len(r.models["model"].weights) == 6
    # The best weights are the first epoch's (min_delta=10: no later epoch improves).
    stop, _ = _keras_callbacks(r)
    for name, value in zip(sorted(weights, key=lambda n: int(n.split("/")[4])),
                           stop.best_weights):
        np.testing.assert_array_equal(tf.train.load_variable(path, name), value)
