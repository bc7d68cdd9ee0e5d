"""Resume: a run continued from a checkpoint ends exactly where a straight run ends.

In-process tests crash a run with an exception (``tests.helpers.Crash``) and resume it
with fresh objects built from the same config; the subprocess tests in
``tests/test_faults.py`` kill real processes with real signals.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import Crash, fit_linear, linear_model, regression_data
from trainer import CheckpointCallback, EarlyStopping, TapeStep, Trainer, UserError
from trainer.driver.run import build, run

#: Every piece of state that must come back: dropout, a reset policy that fires, a lazy
#: regularizer, an unfreeze schedule, early stopping; checkpoints every 5 steps.
STATEFUL = [
    "data=synthetic", "data.task=classification", "model.hidden_units=[16,8]",
    "model.dropout=0.3", "trainer.epochs=6", "trainer.steps_per_execution=1",
    "tape.reset.when=[spike]", "tape.reset.spike_window=5", "tape.reset.spike_z=1.5",
    "regularizer=input_gradient", "regularizer.input_gradient.every=3",
    "freeze.patterns=[mlp/dense_0/*]",
    "+freeze.unfreeze=[{at_epoch: 3, patterns: [mlp/dense_0/*]}]",
    "callbacks=early_stopping", "callbacks.early_stopping.patience=10",
    "callbacks.checkpoint.every_n_steps=5", "callbacks.checkpoint.every_seconds=0",
    "callbacks.checkpoint.min_interval_seconds=0", "callbacks.progress.mode=log",
    "callbacks.tensorboard.histogram_every_n_steps=0",
]


def _weights(models) -> list[np.ndarray]:
    return [v.numpy() for m in models.values() for v in m.weights]


def _assert_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def _straight_and_resumed(make_cfg, tmp_path, overrides, crash_at):
    cfg = make_cfg(*STATEFUL, *overrides)
    straight = build(cfg, tmp_path / "straight")
    straight.trainer.fit(straight.step, straight.data)

    crashed = build(cfg, tmp_path / "resumed")
    crashed.trainer.callbacks.append(Crash(at_step=crash_at))
    with pytest.raises(RuntimeError, match="crash at step"):
        crashed.trainer.fit(crashed.step, crashed.data)
    resumed = build(cfg, tmp_path / "resumed")
    resumed.trainer.fit(resumed.step, resumed.data)
    return straight, resumed


@pytest.mark.parametrize("mode", [
    ["data.in_memory=true"], ["data.in_memory=false"],
    ["data.in_memory=true", "trainer.jit_compile=true"], ["trainer.run_eagerly=true"],
], ids=["memory", "tf.data", "memory-xla", "eager"])
@pytest.mark.slow
def test_a_crashed_run_resumed_from_its_checkpoint_ends_bit_identical(make_cfg, tmp_path, mode):
    # 12 steps an epoch; the crash comes at step 23 (epoch 2), the last checkpoint is at 20.
    straight, resumed = _straight_and_resumed(make_cfg, tmp_path, mode, crash_at=23)
    assert resumed.trainer.restored_from.endswith("ckpt-20")
    assert resumed.trainer.current_step == straight.trainer.current_step
    _assert_identical(_weights(resumed.models), _weights(straight.models))
    # The whole run's history, epoch means included, equals the straight run's.
    assert resumed.trainer.history == straight.trainer.history
    assert straight.trainer.history[-1]["train/tape/resets"] > 0  # the policy did fire


@pytest.mark.slow
def test_a_run_resumed_after_its_unfreeze_ends_bit_identical(make_cfg, tmp_path):
    # The unfreeze comes at epoch 3 (step 24); the checkpoint at 30 has it applied: the
    # freeze schedule must re-apply it before the optimizer is built (Callback.on_restore).
    straight, resumed = _straight_and_resumed(make_cfg, tmp_path, [], crash_at=33)
    assert resumed.trainer.restored_from.endswith("ckpt-30")
    _assert_identical(_weights(resumed.models), _weights(straight.models))
    assert resumed.trainer.history == straight.trainer.history


@pytest.mark.slow
def test_with_auto_steps_per_execution_the_weights_are_still_bit_identical(make_cfg,
                                                                            tmp_path):
    # Executions are sized by time, so the resumed run cuts them elsewhere: the logged
    # means may differ in the last bits, the weights may not.
    straight, resumed = _straight_and_resumed(
        make_cfg, tmp_path, ["trainer.steps_per_execution=auto"], crash_at=23)
    _assert_identical(_weights(resumed.models), _weights(straight.models))


@pytest.mark.slow
def test_resume_at_an_epoch_end_runs_the_epochs_evaluation_once(make_cfg, tmp_path):
    # The checkpoint at step 24 is written after the last execution of epoch 2 and before
    # its evaluation (execution boundaries come first): the resumed run must evaluate it.
    straight, resumed = _straight_and_resumed(
        make_cfg, tmp_path, ["callbacks.checkpoint.every_n_steps=12"], crash_at=30)
    assert resumed.trainer.history == straight.trainer.history
    _assert_identical(_weights(resumed.models), _weights(straight.models))


@pytest.mark.slow
def test_a_finished_run_resumed_trains_no_further_and_reports_its_metrics(make_cfg, tmp_path):
    cfg = make_cfg(*STATEFUL)
    first = run(cfg, run_dir=tmp_path)
    again = build(cfg, tmp_path)
    logs = again.trainer.fit(again.step, again.data)
    assert again.trainer.current_step == first["step"]
    assert logs["val/loss"] == first["val/loss"] and logs["epoch"] == first["epoch"]
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert len(history) == 6 and history[-1]["val/loss"] == first["val/loss"]


def test_an_early_stopped_run_stays_stopped_when_resumed(make_cfg, tmp_path):
    # Patience 1 with a learning rate that overshoots: early stopping ends the run early.
    cfg = make_cfg(*STATEFUL, "callbacks.early_stopping.patience=1", "optimizer.learning_rate=3",
                   "trainer.epochs=20")
    first = run(cfg, run_dir=tmp_path)
    assert first["epoch"] < 20
    again = build(cfg, tmp_path)
    again.trainer.fit(again.step, again.data)
    assert again.trainer.current_step == first["step"]
    assert len(again.trainer.history) == first["epoch"]


@pytest.mark.slow
def test_a_run_ended_by_its_step_budget_is_not_evaluated_again(make_cfg, tmp_path):
    # The budget cuts epoch 2 (12 steps an epoch): it stays open for a larger budget, but
    # running the same command again reports it once, without evaluating it again.
    cfg = make_cfg(*STATEFUL, "trainer.max_steps=17", "callbacks.early_stopping.patience=3")
    run(cfg, run_dir=tmp_path)
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    again = build(cfg, tmp_path)
    again.trainer.fit(again.step, again.data)
    assert again.trainer.history == history
    assert [h["step"] for h in again.trainer.history] == [12, 17]
    es = next(cb for cb in again.callbacks if isinstance(cb, EarlyStopping))
    before = es.wait
    again.trainer.fit(again.step, again.data)  # and again, in the same process
    assert es.wait == before and len(again.trainer.history) == 2
    # A larger budget finishes the open epoch: its entry is replaced by the whole epoch's.
    more = build(make_cfg(*STATEFUL, "trainer.max_steps=30"), tmp_path)
    more.trainer.fit(more.step, more.data)
    assert [h["step"] for h in more.trainer.history] == [12, 24, 30]


@pytest.mark.slow
def test_resume_never_starts_fresh_and_a_missing_path_is_an_error(make_cfg, tmp_path):
    cfg = make_cfg(*STATEFUL, "trainer.max_steps=7")
    run(cfg, run_dir=tmp_path)
    fresh = build(make_cfg(*STATEFUL, "trainer.max_steps=7", "trainer.resume=never"), tmp_path)
    fresh.trainer.fit(fresh.step, fresh.data)
    assert fresh.trainer.restored_from is None and fresh.trainer.current_step == 7
    with pytest.raises(UserError, match=r"trainer\.resume=.*nowhere: does not exist"):
        r = build(make_cfg(*STATEFUL, f"trainer.resume={tmp_path / 'nowhere'}"), tmp_path / "b")
        r.trainer.fit(r.step, r.data)


@pytest.mark.slow
def test_resume_from_another_run_dir_continues_there(make_cfg, tmp_path):
    cfg = make_cfg(*STATEFUL, "trainer.max_steps=17")
    run(cfg, run_dir=tmp_path / "first")
    other = build(make_cfg(*STATEFUL, f"trainer.resume={tmp_path / 'first'}"), tmp_path / "second")
    other.trainer.fit(other.step, other.data)
    assert other.trainer.restored_from.endswith("ckpt-17")
    assert other.trainer.current_step == 72
    assert (tmp_path / "second" / "checkpoints" / "ckpt-72.index").exists()


# --- broken and mismatched checkpoints ---------------------------------------------------
@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(make_cfg, tmp_path, caplog):
    cfg = make_cfg(*STATEFUL, "trainer.max_steps=12")
    run(cfg, run_dir=tmp_path)
    folder = tmp_path / "checkpoints"
    data = sorted(folder.glob("ckpt-12.data-*"))[0]
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated
    r = build(make_cfg(*STATEFUL), tmp_path)
    with caplog.at_level("WARNING", logger="trainer.training.resume"):
        r.trainer.fit(r.step, r.data)
    assert r.trainer.restored_from.endswith("ckpt-10")
    assert any("ckpt-12 cannot be read" in m and "falling back to" in m
               for m in caplog.messages)


def test_a_checkpoint_of_another_model_is_refused_naming_the_variables(make_cfg, tmp_path):
    run(make_cfg(*STATEFUL, "trainer.max_steps=5"), run_dir=tmp_path)
    other = build(make_cfg(*STATEFUL, "model.hidden_units=[16,4]"), tmp_path)
    before = _weights(other.models)
    with pytest.raises(UserError, match=r"another model or config \(shapes differ: "
                                        r"models/model/.*\[16, 8\] in the checkpoint, \[16, 4\]"):
        other.trainer.fit(other.step, other.data)
    _assert_identical(_weights(other.models), before)  # nothing was restored


@pytest.mark.slow
def test_a_checkpoint_of_another_optimizer_is_refused(make_cfg, tmp_path):
    run(make_cfg(*STATEFUL, "trainer.max_steps=5"), run_dir=tmp_path)
    other = build(make_cfg(*STATEFUL, "optimizer=sgd"), tmp_path)
    with pytest.raises(UserError, match="not in this run: optimizers/optimizer"):
        other.trainer.fit(other.step, other.data)


@pytest.mark.slow
def test_a_checkpoint_of_another_batch_size_is_refused(make_cfg, tmp_path):
    run(make_cfg(*STATEFUL, "trainer.max_steps=5"), run_dir=tmp_path)
    other = build(make_cfg(*STATEFUL, "data.batch_size=16"), tmp_path)
    with pytest.raises(UserError, match="written with 12 steps per epoch, this run has 24"):
        other.trainer.fit(other.step, other.data)


@pytest.mark.slow
def test_a_checkpoint_of_another_data_order_is_refused(make_cfg, tmp_path):
    run(make_cfg(*STATEFUL, "trainer.max_steps=5"), run_dir=tmp_path)
    other = build(make_cfg(*STATEFUL, "data.seed=3"), tmp_path)
    with pytest.raises(UserError, match="data order comes from seed 0, this run's from seed 3"):
        other.trainer.fit(other.step, other.data)


def _write_old_checkpoint(make_cfg, tmp_path, *, recorded: bool) -> str:
    """A checkpoint of the same run, newer than its own, in format version 1: the version
    variable set to 1 (``recorded``), or left out, as before versions were recorded."""
    first = build(make_cfg(*STATEFUL, "trainer.max_steps=5"), tmp_path)
    first.trainer.fit(first.step, first.data)
    state = first.trainer.training_state
    path = str(tmp_path / "checkpoints" / "ckpt-6")
    if recorded:
        state.version.assign(1)
        return state.checkpoint.write(path)
    objects = {k: v for k, v in state.objects.items() if k != "format_version"}
    return tf.train.Checkpoint(**objects).write(path)


@pytest.mark.parametrize("recorded", [True, False], ids=["version-1", "no-version"])
def test_a_checkpoint_of_another_format_version_is_refused_naming_both(make_cfg, tmp_path,
                                                                       recorded):
    from trainer.training.state import CheckpointVersionError, format_version

    path = _write_old_checkpoint(make_cfg, tmp_path, recorded=recorded)
    assert format_version(path) == 1
    again = build(make_cfg(*STATEFUL), tmp_path)
    before = _weights(again.models)
    with pytest.raises(CheckpointVersionError) as refused:
        again.trainer.fit(again.step, again.data)
    message = str(refused.value)
    assert message.startswith(f"checkpoint {path} has format version 1, this trainer reads "
                              "version 2: ")
    assert "trainer.resume=never" in message and "\n" not in message
    _assert_identical(_weights(again.models), before)  # nothing was restored
    assert again.trainer.current_step == 0 and again.trainer.restored_from is None


# --- the checkpoint callback -----------------------------------------------------------------
def test_checkpoints_every_n_steps_keep_the_most_recent(tmp_path):
    cb = CheckpointCallback(directory="ckpt", every_n_steps=4, every_seconds=0,
                            min_interval_seconds=0, max_to_keep=2)
    fit_linear(epochs=3, spe=2, callbacks=[cb], run_dir=str(tmp_path))
    # 7 steps an epoch, executions of 2, 2, 2, 1: boundaries 2, 4, 6, 7, 9, 11, 13, 14, ...
    kept = sorted(int(p.rsplit("-", 1)[1]) for p in cb.manager.checkpoints)
    assert kept == [20, 21]  # saved at 4, 9, 13, 16, 20 and the end (21); two kept


def test_the_best_checkpoint_is_kept_and_its_weights_end_in_the_model(tmp_path):
    data = regression_data()
    cb = CheckpointCallback(directory="ckpt", monitor="val/loss", mode="min",
                            min_interval_seconds=0)
    trainer = Trainer(epochs=6, steps_per_execution=4, callbacks=[cb], run_dir=str(tmp_path))
    model = linear_model()
    # A learning rate so large that the loss grows: the best epoch is the first.
    trainer.fit(TapeStep(model=model, optimizer=keras.optimizers.SGD(0.5), task="regression"),
                data)
    losses = [h["val/loss"] for h in trainer.history]
    best = int(np.argmin(losses))
    assert losses[-1] > losses[best] and cb.best == losses[best]
    best_path = cb.best_manager.latest_checkpoint
    assert best_path.endswith(f"ckpt-{trainer.history[best]['step']}")
    kernel = next(n for n, _ in tf.train.list_variables(best_path)
                  if n.startswith("models/model/") and "kernel" in n)
    np.testing.assert_array_equal(model.weights[0].numpy(),
                                  tf.train.load_variable(best_path, kernel))
    # The recent checkpoints keep the last state, for resuming.
    assert cb.manager.latest_checkpoint.endswith(f"ckpt-{trainer.current_step}")


def test_early_stopping_restores_the_best_weights(tmp_path):
    es = EarlyStopping(monitor="val/loss", patience=2, restore_best_weights=True)
    seen = []

    class Snapshot(CheckpointCallback):
        def on_epoch_end(self, trainer, epoch, logs):
            weights = [v.numpy().copy() for v in trainer.models["model"].weights]
            seen.append((logs["val/loss"], weights))

    model = linear_model()
    trainer = Trainer(epochs=10, steps_per_execution=4, callbacks=[es, Snapshot(directory="c")],
                      run_dir=str(tmp_path))
    trainer.fit(TapeStep(model=model, optimizer=keras.optimizers.SGD(0.5), task="regression"),
                regression_data())
    assert es.stopped_epoch is not None
    _, best_weights = min(seen, key=lambda s: s[0])
    _assert_identical([v.numpy() for v in model.weights], best_weights)
    # The checkpoint written at the end keeps the last weights, for resuming: the swap
    # to the best ones comes after it (on_fit_end runs in reverse order).
    latest = tf.train.latest_checkpoint(str(tmp_path / "c"))
    kernel = next(n for n, _ in tf.train.list_variables(latest)
                  if n.startswith("models/model/") and "kernel" in n)
    np.testing.assert_array_equal(tf.train.load_variable(latest, kernel), seen[-1][1][0])
    assert not np.array_equal(seen[-1][1][0], best_weights[0])


def test_a_run_stopped_by_too_many_resets_saves_its_last_good_state(tmp_path):
    from trainer.step.tape import ResetPolicy, TapeResetError

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    x[32:] = np.nan  # the second half of every epoch is bad
    y = rng.normal(size=(64, 1)).astype("float32")
    from trainer.data import Batching, DataModule

    data = DataModule(train=(x, y), val=(x[:16], y[:16]), task="regression",
                      batching=Batching(batch_size=8, shuffle=False), allow_nonfinite=True)
    cb = CheckpointCallback(directory="ckpt", every_seconds=0, min_interval_seconds=0)
    model = linear_model()
    step = TapeStep(model=model, optimizer=keras.optimizers.SGD(0.1), task="regression",
                    reset=ResetPolicy(when=["nonfinite"], max_consecutive=3))
    trainer = Trainer(epochs=2, steps_per_execution=2, callbacks=[cb], run_dir=str(tmp_path))
    with pytest.raises(TapeResetError, match="reset 3 times in a row"):
        trainer.fit(step, data)
    saved = cb.manager.latest_checkpoint
    assert saved.endswith(f"ckpt-{trainer.current_step}")
    kernel = next(n for n, _ in tf.train.list_variables(saved)
                  if n.startswith("models/model/") and "kernel" in n)
    np.testing.assert_array_equal(tf.train.load_variable(saved, kernel), model.weights[0].numpy())
    assert np.isfinite(model.weights[0].numpy()).all()
