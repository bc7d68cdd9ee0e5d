"""Debugging and controlling the loop (docs/debug.md): overfitting a few fixed batches,
limits on the batches of each epoch and of each evaluation."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.helpers import fit_linear, linear_model, regression_data
from trainer import TapeStep, Trainer
from trainer.callbacks import Callback, CheckpointCallback, EarlyStopping, KerasCallbacks
from trainer.common.errors import UserError
from trainer.data import Batching, DataModule
from trainer.driver.run import build

# The dense experiment on the digits (its dropout of 0.1 stays on), batches of 64.
DIGITS = ["+experiment=dense", "callbacks=none", "data.batch_size=64"]


def _weights(model):
    return [v.numpy() for v in model.weights]


def _first(data: DataModule, n: int, **batching) -> DataModule:
    """The first ``n`` training examples of ``data`` as a data set of their own."""
    return DataModule(train=(data.x_train[:n], data.y_train[:n]),
                      val=(data.x_val, data.y_val), task="regression",
                      batching=Batching(batch_size=16, **batching))


# --- trainer.overfit_batches ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("eager", [False, True], ids=["compiled", "eager"])
def test_overfitting_two_fixed_batches_drives_the_loss_to_near_zero(make_cfg, tmp_path, eager):
    r = build(make_cfg(*DIGITS, "debug=overfit", "trainer.epochs=40",
                       "optimizer.learning_rate=3e-3", f"trainer.run_eagerly={eager}"), tmp_path)
    logs = r.trainer.fit(r.step, r.data)
    assert r.trainer.current_step == 80  # 2 steps an epoch
    assert logs["train/loss"] < 0.05 and logs["val/loss"] < 0.05
    # The batches: the first 128 training examples in their order, validated on as well.
    batches = r.trainer.validation_batches()
    assert len(batches) == 2
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), r.data.x_train[:128])
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), r.data.y_train[:128])


@pytest.mark.slow
@pytest.mark.parametrize("cut", [
    ["trainer.overfit_batches=2"],
    ["trainer.limit_train_batches=2", "trainer.limit_val_batches=0.3"]], ids=["overfit", "limits"])
def test_a_cut_run_on_two_replicas_equals_one_device(make_cfg, tmp_path, cut):
    overrides = [*DIGITS, "model.dropout=0.0", *cut, "trainer.epochs=3",
                 "trainer.steps_per_execution=3"]
    logs = {}
    for name, extra in (("one", []), ("two", ["distribute=mirrored", "distribute.cpu_replicas=2"])):
        r = build(make_cfg(*overrides, *extra), tmp_path / name)
        logs[name] = r.trainer.fit(r.step, r.data)
        assert r.trainer.current_step == 6
    for key in ("train/loss", "val/loss", "val/accuracy"):
        assert logs["two"][key] == pytest.approx(logs["one"][key], abs=1e-5), key


def test_overfitting_more_batches_than_full_ones_names_the_key():
    data = regression_data(n=40, batch_size=16)  # 2 full batches and one of 8
    step = TapeStep(model=linear_model(), optimizer=keras.optimizers.SGD(0.05), task="regression")
    with pytest.raises(UserError, match=r"overfit_batches=3: the training set has 2 full "
                                        r"batches; use at most 2"):
        Trainer(overfit_batches=3).fit(step, data)


# --- trainer.limit_train_batches ---------------------------------------------------------------
@pytest.mark.parametrize("flags, limit", [
    ({}, 2), ({"jit_compile": True}, 0.3), ({"run_eagerly": True}, 2),
    ({"accumulate_steps": 2}, 0.3), ({"spe": "auto"}, 2)],
    ids=["compiled", "xla-fraction", "eager", "accumulate-fraction", "auto"])
def test_limit_train_batches_runs_the_first_batches_of_each_epoch(limit, flags):
    # 100 examples at 16: 6 full batches and one of 4, 7 steps; 0.3 of 7 rounds down to 2.
    data = regression_data(shuffle=False)
    _, model, _ = fit_linear(data=data, epochs=3, limit_train_batches=limit, **flags)
    _, reference, _ = fit_linear(data=_first(data, 32, shuffle=False), epochs=3, **flags)
    for a, b in zip(_weights(model), _weights(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_streamed_epoch_takes_the_next_batches_of_the_stream():
    data = regression_data(shuffle=False, in_memory=False)
    trainer, model, _ = fit_linear(data=data, epochs=3, limit_train_batches=2)
    assert trainer.current_step == 6 and len(trainer.history) == 3
    _, reference, _ = fit_linear(data=regression_data(shuffle=False, in_memory=False),
                                 epochs=1, max_steps=6)
    for a, b in zip(_weights(model), _weights(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("in_memory", [True, False], ids=["memory", "stream"])
def test_limit_val_batches_evaluates_the_first_batches_every_time(in_memory):
    # 20 validation examples at 16: batches of 16 and 4; one batch is the first 16.
    data = regression_data(in_memory=in_memory)
    trainer, model, logs = fit_linear(data=data, epochs=2, limit_val_batches=1)
    kernel, bias = _weights(model)
    x, y = data.x_val[:16], data.y_val[:16]
    expected = float(np.mean((x @ kernel + bias - y) ** 2))
    assert logs["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert trainer.evaluate()["val/loss"] == pytest.approx(expected, rel=1e-5)  # not batch 2
    assert [b[0].shape[0] for b in trainer.validation_batches()] == [16]


def test_a_limited_run_resumed_mid_epoch_ends_as_the_straight_run(tmp_path):
    def run(run_dir, **kw):
        checkpoint = CheckpointCallback(every_n_epochs=0, every_seconds=0,
                                        min_interval_seconds=0)
        return fit_linear(data=regression_data(), epochs=3, spe=1, limit_train_batches=3,
                          callbacks=[checkpoint], run_dir=str(run_dir), **kw)

    straight, model, logs = run(tmp_path / "straight")
    run(tmp_path / "resumed", max_steps=4)  # killed in the second epoch, in effect
    resumed, again, resumed_logs = run(tmp_path / "resumed")
    assert resumed.restored_from and resumed.current_step == straight.current_step == 9
    for a, b in zip(_weights(model), _weights(again)):
        np.testing.assert_array_equal(a, b)
    assert resumed_logs["train/loss"] == logs["train/loss"]


@pytest.mark.parametrize("kwargs, match", [
    ({"limit_train_batches": 0}, r"trainer.limit_train_batches=0 must be an integer >= 1"),
    ({"limit_val_batches": 1.5}, r"trainer.limit_val_batches=1.5 must be"),
    ({"limit_train_batches": True}, r"trainer.limit_train_batches=True must be"),
    ({"limit_val_batches": "half"}, r"trainer.limit_val_batches='half' must be"),
    ({"overfit_batches": -2}, r"trainer.overfit_batches=-2 must be"),
    ({"overfit_batches": 2, "limit_val_batches": 1}, r"drop the limits"),
])
def test_bad_limits_are_one_line_errors(kwargs, match):
    with pytest.raises(UserError, match=match) as error:
        Trainer(**kwargs)
    assert "\n" not in str(error.value)


# --- trainer.val_every_n_steps -----------------------------------------------------------------
class Validations(Callback):
    """Records each validation's step and logs, and the weights it judged."""

    def __init__(self):
        self.steps, self.logs, self.weights, self.executions = [], [], {}, []

    def on_validation_end(self, trainer, global_step, logs):
        self.steps.append(global_step)
        self.logs.append(logs)
        self.weights[global_step] = _weights(trainer.models["model"])

    def on_execution_end(self, trainer, global_step, logs):
        self.executions.append(global_step)


def _val_loss(data, weights) -> float:
    kernel, bias = weights
    return float(np.mean((data.x_val @ kernel + bias - data.y_val) ** 2))


@pytest.mark.parametrize("flags", [{"spe": 4}, {"spe": "auto", "jit_compile": True},
                                   {"run_eagerly": True, "spe": 3}],
                         ids=["fixed", "auto-xla", "eager"])
def test_validation_every_n_steps_between_epoch_ends(flags):
    data, seen = regression_data(), Validations()  # 7 steps an epoch
    trainer, _, logs = fit_linear(data=data, epochs=3, val_every_n_steps=5, callbacks=[seen],
                                  **flags)
    # Multiples of 5 and the epoch ends (7, 14, 21); executions end at each.
    assert seen.steps == [5, 7, 10, 14, 15, 20, 21]
    assert set(seen.steps) <= set(seen.executions)
    assert [v["step"] for v in trainer.validations] == [5, 10, 15, 20]
    assert [v["epoch"] for v in trainer.validations] == [1, 2, 3, 3]
    for step, logged in zip(seen.steps, seen.logs):  # each the weights of its step
        assert logged["val/loss"] == pytest.approx(_val_loss(data, seen.weights[step]),
                                                   rel=1e-5)
    assert [h["step"] for h in trainer.history] == [7, 14, 21]
    assert logs["step"] == 21


def test_early_stopping_and_the_best_checkpoint_judge_each_validation(tmp_path):
    # mode=max on a falling loss: the first validation (step 5, mid-epoch) stays the best,
    # and the second and third without improvement (steps 7, 10) stop the run at 10.
    data, seen = regression_data(), Validations()
    stop = EarlyStopping(monitor="val/loss", mode="max", patience=2)
    best = CheckpointCallback(monitor="val/loss", mode="max", every_seconds=0)
    trainer, model, _ = fit_linear(data=data, epochs=3, spe=1, val_every_n_steps=5,
                                   callbacks=[seen, stop, best], run_dir=str(tmp_path))
    assert trainer.current_step == 10 and seen.steps == [5, 7, 10]
    assert stop.wait == 2 and stop.stopped_epoch == 1  # in the second epoch
    # The open epoch ends at the stop with the validation of its step, not a second one.
    assert [h["step"] for h in trainer.history] == [7, 10]
    assert trainer.history[-1]["val/loss"] == seen.logs[-1]["val/loss"]
    # The models hold the best validation's weights (step 5), and the logs say so.
    for a, b in zip(_weights(model), seen.weights[5]):
        np.testing.assert_array_equal(a, b)
    assert trainer.weights_step == 5 and trainer.weights_epoch == 1
    final = trainer.final_logs
    assert final["step"] == 5 and final["val/loss"] == seen.logs[0]["val/loss"]
    assert final["last/step"] == 10


def test_a_resumed_run_ships_the_best_validation_of_the_run_it_resumes(tmp_path):
    def run(**kw):
        best = CheckpointCallback(monitor="val/loss", mode="max", every_seconds=0,
                                  min_interval_seconds=0)
        return fit_linear(epochs=3, spe=1, val_every_n_steps=5, callbacks=[best],
                          run_dir=str(tmp_path), **kw)

    first, _, _ = run(max_steps=9)  # the best (mode=max, a falling loss): step 5
    best_logs = dict(first.validations[0])
    trainer, _, _ = run()
    assert trainer.restored_from and trainer.current_step == 21
    assert [v["step"] for v in trainer.validations] == [5, 10, 15, 20]
    final = trainer.final_logs
    assert final["step"] == 5 and final["val/loss"] == best_logs["val/loss"]


def test_reduce_lr_on_plateau_sees_each_validation():
    # Keras' ReduceLROnPlateau, patience 1: halves the rate at every validation after the
    # first (mode=max on a falling loss never improves): validations at 5, 7 and 10.
    reduce = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", mode="max", patience=1,
                                               factor=0.5, cooldown=0)
    trainer, _, _ = fit_linear(epochs=3, spe=1, max_steps=10, val_every_n_steps=5,
                               callbacks=[KerasCallbacks(callbacks=[reduce])])
    rate = float(next(iter(trainer.optimizers.values())).learning_rate.numpy())
    assert rate == pytest.approx(0.05 * 0.5 * 0.5)


def test_keras_early_stopping_ships_its_best_validation():
    # Keras' EarlyStopping, restoring its best weights: mode=max on a falling loss keeps the
    # first validation (step 5, between epoch ends), and the final logs are its.
    seen = Validations()
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", mode="max", patience=100,
                                         restore_best_weights=True)
    trainer, model, _ = fit_linear(epochs=2, spe=1, val_every_n_steps=5,
                                   callbacks=[seen, KerasCallbacks(callbacks=[stop])])
    assert seen.steps == [5, 7, 10, 14]
    for a, b in zip(_weights(model), seen.weights[5]):
        np.testing.assert_array_equal(a, b)
    assert trainer.final_logs["step"] == 5
    assert trainer.final_logs["val/loss"] == seen.logs[0]["val/loss"]


def test_metrics_csv_holds_each_validation_at_its_step(tmp_path):
    import csv

    from trainer.callbacks import CsvLogger

    seen = Validations()
    fit_linear(epochs=2, spe=2, val_every_n_steps=5, callbacks=[seen, CsvLogger()],
               run_dir=str(tmp_path))
    with (tmp_path / "metrics.csv").open() as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    assert [s for s, r in sorted(rows.items()) if r["val/loss"]] == seen.steps == [5, 7, 10, 14]
    for step, logged in zip(seen.steps, seen.logs):
        assert float(rows[step]["val/loss"]) == pytest.approx(logged["val/loss"], rel=1e-6)


@pytest.mark.slow
def test_tensorboard_draws_each_validation_at_its_step(make_cfg, tmp_path):
    from tests.tb_reader import load, scalars

    r = build(make_cfg("data=synthetic", "trainer.epochs=2", "trainer.val_every_n_steps=4",
                       "callbacks.progress.mode=log"), tmp_path)
    r.trainer.fit(r.step, r.data)
    per_epoch = r.trainer.steps_per_epoch
    expected = sorted({*range(4, 2 * per_epoch + 1, 4), per_epoch, 2 * per_epoch})
    assert [s for s, _ in scalars(load(tmp_path / "tb" / "val"), "loss")] == expected


def test_a_bad_val_every_n_steps_is_a_one_line_error():
    for value in (0, -3, 2.5, True):
        with pytest.raises(UserError, match=rf"trainer.val_every_n_steps={value!r} must be "
                                            r"an integer >= 1"):
            Trainer(val_every_n_steps=value)


@pytest.mark.slow
def test_a_run_killed_between_validations_resumes_on_their_schedule(tmp_path):
    import signal
    import time

    from tests.tb_reader import load, scalars
    from tests.test_faults import TIMEOUT, _assert_same_run, _outputs, _run, _start

    def validations(run_dir):
        return scalars(load(run_dir / "tb" / "val"), "loss")

    # tests.test_faults' run (12 steps an epoch, one step an execution, a checkpoint every
    # 7 steps, early stopping), 4 epochs, validated every 5 steps as well.
    every = ["trainer.val_every_n_steps=5", "trainer.epochs=4"]
    straight_dir, run_dir = tmp_path / "straight", tmp_path / "run"
    p = _run(straight_dir, *every)
    assert p.returncode == 0, p.stderr[-3000:]
    straight = _outputs(straight_dir)
    steps = [s for s, _ in validations(straight_dir)]
    assert steps == sorted({*range(5, 49, 5), *range(12, 49, 12)})
    proc = _start(run_dir, *every)
    try:  # killed once the checkpoint of step 21 exists: between validations 20 and 24
        end = time.monotonic() + TIMEOUT
        while not (run_dir / "checkpoints" / "ckpt-21.index").exists():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < end, "no checkpoint in time"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    p = _run(run_dir, *every)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr
    # Weights, per-step losses, history.jsonl, metrics.json:
    _assert_same_run(straight, _outputs(run_dir), steps=48)
    assert validations(run_dir) == validations(straight_dir)


@pytest.mark.slow
def test_limits_on_tfrecord_shards_stream_on_and_resume(make_cfg, tmp_path):
    from tests.helpers import Crash
    from tests.test_tfrecord import _ids, _write

    # 100 training examples whose first feature is their id, batches of 16: 7 an epoch.
    shards = _write(tmp_path / "shards")
    common = ["data=tfrecord", f"data.path={shards}/*.tfrecord", "data.batch_size=16",
              "model.hidden_units=[8]", "callbacks.progress.mode=log",
              "callbacks.tensorboard.histogram_every_n_steps=0",
              "callbacks.checkpoint.every_n_steps=1", "callbacks.checkpoint.every_seconds=0",
              "callbacks.checkpoint.min_interval_seconds=0"]
    limited = [*common, "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
               "trainer.epochs=3"]

    def weights(r):
        return [v.numpy() for v in r.models["model"].weights]

    straight = build(make_cfg(*limited), tmp_path / "straight")
    straight.trainer.fit(straight.step, straight.data)
    assert straight.trainer.current_step == 6 and len(straight.trainer.history) == 3
    assert _ids(straight.trainer.validation_batches()) == list(range(100, 116))
    # The epochs read on along the stream: its first 6 batches, as an uncut run's 6 steps.
    uncut = build(make_cfg(*common, "trainer.max_steps=6"), tmp_path / "uncut")
    uncut.trainer.fit(uncut.step, uncut.data)
    for a, b in zip(weights(straight), weights(uncut)):
        np.testing.assert_array_equal(a, b)
    # Crashed in the second epoch and resumed: the same weights and history.
    crashed = build(make_cfg(*limited), tmp_path / "resumed")
    crashed.trainer.callbacks.append(Crash(at_step=3))
    with pytest.raises(RuntimeError, match="crash at step"):
        crashed.trainer.fit(crashed.step, crashed.data)
    resumed = build(make_cfg(*limited), tmp_path / "resumed")
    resumed.trainer.fit(resumed.step, resumed.data)
    assert resumed.trainer.restored_from.endswith("ckpt-3")
    for a, b in zip(weights(straight), weights(resumed)):
        np.testing.assert_array_equal(a, b)
    assert resumed.trainer.history == straight.trainer.history


def test_keras_names_map_back_to_the_trainers_keys():
    # Keras' EarlyStopping names its monitor as keras_logs does; the best validation is
    # found under the trainer's key, weight averages' and regularizers' included.
    from trainer.callbacks.keras_adapter import _trainer_key, keras_logs

    logs = {"train/loss": 1.0, "train/reg/gp": 0.1, "val/loss": 2.0, "val_ema/loss": 3.0,
            "epoch": 1, "step": 5}
    assert {_trainer_key(name, logs) for name in keras_logs(logs)} == \
        {"train/loss", "train/reg/gp", "val/loss", "val_ema/loss"}
    assert _trainer_key("val_ema_loss", logs) == "val_ema/loss"
    assert _trainer_key("val_auc", logs) is None
