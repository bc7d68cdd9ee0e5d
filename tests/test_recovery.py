"""Rollback on blow-up (``trainer.recovery``): an injected learning-rate spike is rolled back
to the last good snapshot, the rolled-back batches are replayed, and the run ends as a
straight run that lowered its rate at the snapshot's step would, bit for bit."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import linear_model
from trainer import Callback, TapeStep, Trainer
from trainer.common.errors import UserError
from trainer.data import Batching, DataModule
from trainer.training.recovery import EXIT_DIVERGED, Diverged, Recovery

ROOT = Path(__file__).resolve().parents[1]
D, N, BATCH, LR = 3, 96, 16, 0.05  # 6 steps per epoch
SPIKE_AT = 10  # the rate is set huge at the boundary of step 10


def id_data() -> DataModule:
    """Regression data whose last feature column is the example's id (the model ignores it)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D)).astype("float32")
    y = x @ rng.normal(size=(D, 1)) + 0.5
    ids = np.arange(N, dtype="float32")[:, None]
    return DataModule(train=(np.concatenate([x, ids], 1), y), val=(np.concatenate(
        [x[:20], ids[:20]], 1), y[:20]), task="regression",
        batching=Batching(batch_size=BATCH, seed=0, shuffle=True))


class IdStep(TapeStep):
    """Records ``(optimizer iteration, batch ids)`` for every training batch it computes."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.used: list[tuple[int, list[int]]] = []

    def compute_loss(self, x, y, training, sample_weight=None):
        if training:
            def record(iteration, ids):
                self.used.append((int(iteration), sorted(int(i) for i in ids.numpy())))
                return 0
            tf.py_function(record, [self.optimizer.iterations, x[:, -1]], tf.int32)
        return super().compute_loss(x[:, :-1], y, training, sample_weight)


class Spike(Callback):
    """Sets the learning rate to ``rate`` once, at the first boundary at or past ``at_step``
    of a run that has not rolled back yet."""

    def __init__(self, *, at_step: int = SPIKE_AT, rate: float = 1e4):
        self.at_step, self.rate = at_step, rate

    def on_execution_end(self, trainer, global_step, logs):
        if global_step == self.at_step and trainer.progress.rollbacks == 0:
            trainer.optimizers["optimizer"].learning_rate = self.rate


class SetRate(Callback):
    """The reference: multiplies the rate by ``scale`` at the boundary of ``at_step``."""

    def __init__(self, *, at_step: int, scale: float):
        self.at_step, self.scale = at_step, scale

    def on_execution_end(self, trainer, global_step, logs):
        if global_step == self.at_step:
            opt = trainer.optimizers["optimizer"]
            opt.learning_rate = float(opt.learning_rate) * self.scale


class Rollbacks(Callback):
    def __init__(self):
        self.lines = []

    def on_rollback(self, trainer, global_step, line):
        self.lines.append((global_step, trainer.current_step, line))


def _fit(*, callbacks=(), recovery=None, run_eagerly=False, epochs=4, optimizer=None,
         **kw):
    model = linear_model(D)
    step = IdStep(model=model, optimizer=optimizer or keras.optimizers.SGD(LR),
                  task="regression")
    trainer = Trainer(epochs=epochs, steps_per_execution=2, run_eagerly=run_eagerly,
                      jit_compile=False, callbacks=callbacks, recovery=recovery, **kw)
    logs = trainer.fit(step, id_data())
    return trainer, step, logs


RECOVERY = {"enabled": True, "every_n_steps": 4, "lr_scale": 0.5, "max_attempts": 2,
            "window": 2, "factor": 10.0}


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["compiled", "eager"])
def test_a_spike_rolls_back_replays_its_batches_and_ends_as_a_lowered_straight_run(
        run_eagerly):
    seen = Rollbacks()
    trainer, step, logs = _fit(callbacks=[Spike(), seen], recovery=RECOVERY,
                               run_eagerly=run_eagerly)
    # Snapshots at 0, 4 and 8 (each confirmed by the next execution); the execution 10-12
    # blows up and the state goes back to step 8.
    assert [(s, back) for s, back, _ in seen.lines] == [(12, 8)]
    assert "rollback 1/2 at step 12" in seen.lines[0][2]
    assert trainer.current_step == 24 and logs["step"] == 24
    assert math.isfinite(logs["train/loss"]) and math.isfinite(logs["val/loss"])
    assert trainer.progress.rollbacks == 1 and trainer.progress.lr_scale == 0.5
    assert float(trainer.optimizers["optimizer"].learning_rate) == pytest.approx(LR * 0.5)
    assert [h["epoch"] for h in trainer.history] == [1, 2, 3, 4]

    # The straight reference: no spike, the rate halved at step 8.
    _, ref_step, ref_logs = _fit(callbacks=[SetRate(at_step=8, scale=0.5)],
                                 run_eagerly=run_eagerly)
    # Replayed, none skipped: steps 0-11, then 8-23 again from the snapshot, each step with
    # the batch the straight run used at that step.
    # (Within an execution the recording ops may run out of order.)
    used = [i for i, _ in step.used]
    assert sorted(used[:12]) == list(range(12)) and sorted(used[12:]) == list(range(8, 24))
    batches = dict(ref_step.used)
    assert all(ids == batches[i] for i, ids in step.used)
    for a, b in zip(step.model.get_weights(), ref_step.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert logs["val/loss"] == ref_logs["val/loss"]


class Spiky(keras.optimizers.schedules.LearningRateSchedule):
    """LR, but 1e4 at the optimizer iterations 10 and 11."""

    def __call__(self, step):
        spike = tf.logical_and(step >= SPIKE_AT, step < SPIKE_AT + 2)
        return tf.where(spike, 1e4, LR)

    def get_config(self):
        return {}


def test_the_scale_multiplies_a_schedule_and_persists_across_a_resume(tmp_path):
    from trainer.callbacks import CheckpointCallback

    seen = Rollbacks()
    trainer, _, logs = _fit(callbacks=[seen, CheckpointCallback()], run_dir=str(tmp_path),
                            optimizer=keras.optimizers.SGD(Spiky()),
                            recovery={**RECOVERY, "lr_scale": 1e-5})
    assert [(s, back) for s, back, _ in seen.lines] == [(12, 8)]
    assert math.isfinite(logs["val/loss"]) and trainer.current_step == 24
    opt = trainer.optimizers["optimizer"]
    # The rate applied is the schedule's times the scale, from the rollback on.
    assert float(opt.learning_rate) == pytest.approx(LR * 1e-5)
    assert trainer.progress.lr_scale == pytest.approx(1e-5)
    with pytest.raises(UserError, match="follows a schedule"):
        opt.learning_rate = 0.1
    # A new process's trainer resumes with the scale (it is not in the schedule's config).
    resumed, _, logs = _fit(callbacks=[CheckpointCallback()], run_dir=str(tmp_path),
                            optimizer=keras.optimizers.SGD(Spiky()), epochs=5,
                            recovery={**RECOVERY, "lr_scale": 1e-5})
    assert resumed.restored_from and resumed.current_step == 30
    assert float(resumed.optimizers["optimizer"].learning_rate) == pytest.approx(LR * 1e-5)


def test_a_reset_policy_that_gives_up_is_rolled_back_and_armed_again():
    from trainer.step.tape import ResetPolicy

    seen = Rollbacks()
    model = linear_model(D)
    # After the spike every loss is above the threshold (finite): the policy skips two
    # steps in a row and gives up; recovery, counting only non-finite losses, rolls back.
    step = IdStep(model=model, optimizer=keras.optimizers.SGD(LR), task="regression",
                  reset=ResetPolicy(when=["threshold"], threshold=1e3, max_consecutive=2))
    trainer = Trainer(epochs=4, steps_per_execution=2, jit_compile=False,
                      callbacks=[Spike(), seen], recovery={**RECOVERY, "factor": None})
    logs = trainer.fit(step, id_data())
    assert [(s, back) for s, back, _ in seen.lines] == [(14, 8)]
    assert "the tape was reset 2 times in a row" in seen.lines[0][2]
    assert trainer.current_step == 24 and math.isfinite(logs["val/loss"])
    assert logs["train/tape/failed_at_step"] == -1  # armed again


def test_max_attempts_exhausted_raises_diverged_after_saving_the_good_state():
    ends = []

    class End(Callback):
        def on_fit_end(self, trainer, logs):
            ends.append(trainer.current_step)

    # The rate stays huge: every attempt blows up again.
    class Always(Callback):
        def on_execution_end(self, trainer, global_step, logs):
            if global_step >= SPIKE_AT:
                trainer.optimizers["optimizer"].learning_rate = 1e4

    seen = Rollbacks()
    with pytest.raises(Diverged, match=r"at step 12 after 2 rollbacks \(trainer.recovery."
                                       r"max_attempts=2\); the last good state \(step 8\)"):
        _fit(callbacks=[Always(), seen, End()], recovery=RECOVERY)
    assert len(seen.lines) == 2 and ends == [8]


def test_without_snapshots_it_rolls_back_to_the_newest_good_checkpoint(tmp_path):
    from trainer.callbacks import CheckpointCallback

    ckpt = CheckpointCallback(every_n_steps=4, every_seconds=0, min_interval_seconds=0,
                              every_n_epochs=0)
    seen = Rollbacks()
    trainer, _, logs = _fit(callbacks=[Spike(), seen, ckpt], run_dir=str(tmp_path),
                            recovery={**RECOVERY, "every_n_steps": 0})
    assert [(s, back) for s, back, _ in seen.lines] == [(12, 8)]
    assert "checkpoints/ckpt-8" in seen.lines[0][2]
    assert math.isfinite(logs["val/loss"]) and trainer.current_step == 24


def test_bad_settings_are_one_line_errors_naming_the_key():
    with pytest.raises(UserError, match=r"trainer.recovery.lr_scale=2.0 must be in \(0, 1\]"):
        Recovery(enabled=True, lr_scale=2.0)
    with pytest.raises(UserError, match=r"trainer\.recovery\.factor=0\.5 must be > 1"):
        Recovery(enabled=True, factor=0.5)
    with pytest.raises(UserError, match=r"trainer\.recovery: unknown key evry"):
        Recovery.of({"evry": 3})
    with pytest.raises(UserError, match=r"trainer\.recovery\.monitor='nope' is not a train log"):
        _fit(recovery={**RECOVERY, "monitor": "nope"}, epochs=1)


# --- through the driver: distributed, accumulated, the CLI ----------------------------------
DRIVER = ["data=synthetic", "trainer.epochs=2", "trainer.steps_per_execution=2",
          "trainer.jit_compile=false", "callbacks=none", "trainer.recovery.enabled=true",
          "trainer.recovery.every_n_steps=4", "trainer.recovery.window=2"]


def _driver_fit(make_cfg, tmp_path, name, *overrides):
    from trainer.driver.run import build

    r = build(make_cfg(*DRIVER, *overrides), tmp_path / name)
    seen = Rollbacks()
    r.trainer.callbacks += [Spike(), seen]
    logs = r.trainer.fit(r.step, r.data)
    weights = [v.numpy() for m in r.models.values() for v in m.weights]
    return r, logs, weights, seen.lines


@pytest.mark.slow  # three runs through the driver
def test_mirrored_and_accumulated_runs_roll_back_as_one_device_does(make_cfg, tmp_path):
    one, one_logs, one_w, one_lines = _driver_fit(make_cfg, tmp_path, "one")
    assert [(s, back) for s, back, _ in one_lines] == [(12, 8)]
    assert math.isfinite(one_logs["val/loss"]) and one.trainer.progress.lr_scale == 0.5
    two, two_logs, two_w, two_lines = _driver_fit(
        make_cfg, tmp_path, "two", "distribute=mirrored", "distribute.cpu_replicas=2")
    assert two.distribution.num_replicas == 2
    assert [(s, back) for s, back, _ in two_lines] == [(12, 8)]
    assert two.trainer.current_step == one.trainer.current_step
    for a, b in zip(one_w, two_w):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    assert two_logs["val/loss"] == pytest.approx(one_logs["val/loss"], abs=1e-5)
    acc, acc_logs, _, acc_lines = _driver_fit(make_cfg, tmp_path, "acc",
                                              "trainer.accumulate_steps=2")
    assert [(s, back) for s, back, _ in acc_lines] == [(12, 8)]
    assert math.isfinite(acc_logs["val/loss"])
    assert acc.trainer.current_step == one.trainer.current_step


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}


def _cli(run_dir, *args):
    return [sys.executable, "-m", "trainer", *DRIVER, "callbacks=default",
            "callbacks.progress.mode=log", "callbacks.tensorboard.histogram_every_n_steps=0",
            *args, f"hydra.run.dir={run_dir}"]


@pytest.mark.slow
def test_the_cli_exits_diverged_with_one_line_when_attempts_run_out(tmp_path):
    p = subprocess.run(_cli(tmp_path / "run", "optimizer=sgd", "optimizer.learning_rate=1e3",
                            "trainer.recovery.max_attempts=1"),
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == EXIT_DIVERGED == 3, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("diverged: train/loss is ") and "after 1 rollbacks" in last
    assert "trainer.recovery.max_attempts=1" in last and "Traceback" not in p.stderr
    # A TensorBoard text entry per rollback.
    from tests.tb_reader import load

    texts = load(tmp_path / "run" / "tb").Tensors("recovery/rollback")
    assert [e.step for e in texts] and b"rollback 1/1" in texts[0].tensor_proto.string_val[0]


# The spike through the CLI, stretched (one step per execution, a pause) so that a SIGKILL
# lands in the replay after the rollback.
KILLED = ["trainer.epochs=1", "trainer.steps_per_execution=1",
          "callbacks.checkpoint.every_n_steps=2",
          "callbacks.checkpoint.every_seconds=0", "callbacks.checkpoint.min_interval_seconds=0",
          "+callbacks.spike._target_=tests.test_recovery.Spike", "+callbacks.spike.at_step=6",
          "+callbacks.pause._target_=tests.helpers.Pause", "+callbacks.pause.seconds=0.1"]


@pytest.mark.slow
def test_a_sigkill_during_the_replay_resumes_to_the_straight_run(tmp_path):
    straight = tmp_path / "straight"
    p = subprocess.run(_cli(straight, *KILLED), cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rollback 1/3 at step 8" in (straight / "__main__.log").read_text()

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli(run, *KILLED), cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end, text = time.monotonic() + 240, ""
    # Kill once the rollback happened and a checkpoint was written after it (step 10).
    while not ("rollback 1/3" in text and list(run.glob("checkpoints/ckpt-10.index"))):
        assert proc.poll() is None and time.monotonic() < end, "no rollback in time"
        time.sleep(0.02)
        text = "".join(f.read_text() for f in run.glob("*.log"))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    p = subprocess.run(_cli(run, *KILLED), cwd=tmp_path, env=_env(), capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    log = (run / "__main__.log").read_text()
    assert "resumed from" in log and log.count("rollback 1/3") == 1  # the killed run's
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, run))
    assert math.isfinite(b["val/loss"])
    assert {k: v for k, v in a.items() if not k.startswith("time/")} == {
        k: v for k, v in b.items() if not k.startswith("time/")}
