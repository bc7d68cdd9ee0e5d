"""Faults with real processes and real signals: SIGKILL at random moments (also during a
checkpoint save), SIGTERM and SIGINT preemption, a second writer, a stale lock.

Every run is the real CLI in a subprocess with a bounded time. A straight run and a run
killed and resumed with ``trainer.resume=auto`` must end with bit-identical weights and
the same per-step losses (TensorBoard's reader, one point per step after the purge).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import keras_callbacks_run
from tests.tb_reader import load, scalars

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240

#: A small run with every piece of state (dropout, a reset policy that fires, a lazy
#: regularizer, an unfreeze schedule, early stopping), one step per execution (so
#: TensorBoard has every step's loss) and a checkpoint every 7 steps. The pause
#: callback stretches it to a few seconds so that signals land inside training.
RUN = [
    "data=synthetic", "data.task=classification", "model.hidden_units=[64,32]",
    "model.dropout=0.3", "trainer.epochs=8", "trainer.steps_per_execution=1",
    "tape.reset.when=[spike]", "tape.reset.spike_window=5", "tape.reset.spike_z=1.5",
    "regularizer=input_gradient", "regularizer.input_gradient.every=3",
    "freeze.patterns=[mlp/dense_0/*]",
    "+freeze.unfreeze=[{at_epoch: 3, patterns: [mlp/dense_0/*]}]",
    "callbacks=early_stopping", "callbacks.early_stopping.patience=20",
    "callbacks.checkpoint.every_n_steps=7", "callbacks.checkpoint.every_seconds=0",
    "callbacks.checkpoint.min_interval_seconds=0", "callbacks.progress.mode=log",
    "callbacks.tensorboard.histogram_every_n_steps=0",
    "+callbacks.pause._target_=tests.helpers.Pause", "+callbacks.pause.seconds=0.02",
]
STEPS = 8 * 12


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}


def _command(run_dir, *extra, run=RUN):
    return [sys.executable, "-m", "trainer", *run, *extra, f"hydra.run.dir={run_dir}"]


def _run(run_dir, *extra, run=RUN):
    p = subprocess.run(_command(run_dir, *extra, run=run), cwd=run_dir.parent, env=_env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    return p


def _start(run_dir, *extra, run=RUN):
    return subprocess.Popen(_command(run_dir, *extra, run=run), cwd=run_dir.parent,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_checkpoint(run_dir, proc, deadline=TIMEOUT):
    """Block until the run has written its first checkpoint (training has begun)."""
    end = time.monotonic() + deadline
    while not list((run_dir / "checkpoints").glob("ckpt-*.index")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < end, "no checkpoint in time"
        time.sleep(0.01)


def _outputs(run_dir):
    import keras

    weights = [v.numpy() for v in keras.models.load_model(run_dir / "model.keras").weights]
    losses = scalars(load(run_dir / "tb" / "train"), "loss")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    history = (run_dir / "history.jsonl").read_text().splitlines()
    return weights, losses, metrics, history


def _assert_same_run(a, b, steps=STEPS):
    wa, la, ma, ha = a
    wb, lb, mb, hb = b
    assert len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb))
    # One loss per step, each step once, the same values: no gap, no duplicate.
    assert [s for s, _ in lb] == [s for s, _ in la] == list(range(1, steps + 1))
    assert lb == la
    assert ha == hb
    assert {k: v for k, v in mb.items() if not k.startswith("time/")} == {
        k: v for k, v in ma.items() if not k.startswith("time/")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    p = _run(run_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    return _outputs(run_dir)


def _kill_and_resume(run_dir, kills, rng, during_save=False):
    for _ in range(kills):
        proc = _start(run_dir)
        try:
            _wait_for_checkpoint(run_dir, proc)
            if during_save:
                _kill_during_save(run_dir, proc)
            else:
                time.sleep(float(rng.uniform(0.0, 1.5)))
                proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
    p = _run(run_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _kill_during_save(run_dir, proc):
    """SIGKILL the moment a checkpoint's temporary files appear (a save in progress)."""
    folder = run_dir / "checkpoints"
    end = time.monotonic() + TIMEOUT
    while time.monotonic() < end and proc.poll() is None:
        names = os.listdir(folder)
        # The save of a checkpoint after the first: the first one's own temporary files
        # can still be on disk for a moment once its index is there, and killing then
        # would leave no complete checkpoint at all.
        done = {name.removesuffix(".index") for name in names if name.endswith(".index")}
        if any("_temp" in name and name.split("_temp")[0] not in done for name in names):
            proc.send_signal(signal.SIGKILL)
            return
    pytest.fail("no save in progress was seen")


@pytest.mark.parametrize("in_memory", ["true", "false"])
def test_sigkill_mid_epoch_then_resume_equals_the_straight_run(tmp_path, straight, in_memory):
    if in_memory == "false":
        # The straight fixture streams in memory; a tf.data run is its own reference.
        ref_dir = tmp_path / "ref"
        assert _run(ref_dir, "data.in_memory=false").returncode == 0
        reference = _outputs(ref_dir)
    else:
        reference = straight
    run_dir = tmp_path / "run"
    proc = _start(run_dir, f"data.in_memory={in_memory}")
    _wait_for_checkpoint(run_dir, proc)
    time.sleep(0.7)  # mid-epoch: 12 steps an epoch at about 30 ms a step
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=TIMEOUT)
    p = _run(run_dir, f"data.in_memory={in_memory}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr
    _assert_same_run(reference, _outputs(run_dir))


def test_sigkill_during_a_checkpoint_save_then_resume_equals_the_straight_run(tmp_path,
                                                                              straight):
    run_dir = tmp_path / "run"
    _kill_and_resume(run_dir, 1, np.random.default_rng(0), during_save=True)
    _assert_same_run(straight, _outputs(run_dir))


def test_chaos_ten_kills_at_random_moments(tmp_path, straight):
    run_dir = tmp_path / "run"
    _kill_and_resume(run_dir, 10, np.random.default_rng(1))
    _assert_same_run(straight, _outputs(run_dir))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_saves_writes_outputs_and_exits_75(tmp_path, straight, sig):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    _wait_for_checkpoint(run_dir, proc)
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 75, err[-3000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert "hydra.run.dir=" in last and "resume" in last and "Traceback" not in err
    step = json.loads((run_dir / "metrics.json").read_text())["step"]
    saved = sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("*.index"))
    assert (run_dir / "model.keras").exists() and saved[-1] >= step
    p = _run(run_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_same_run(straight, _outputs(run_dir))


def test_a_second_sigint_stops_at_once(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "callbacks.pause.seconds=1.0")
    _wait_for_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=TIMEOUT)
    assert time.monotonic() - t0 < 0.9  # before the pause after the execution ends
    assert proc.returncode in (-signal.SIGINT, 130)


def test_one_writer_per_run_dir_and_a_stale_lock_does_not_block(tmp_path, straight):
    run_dir = tmp_path / "run"
    first = _start(run_dir)
    _wait_for_checkpoint(run_dir, first)
    second = _run(run_dir)
    assert second.returncode == 2
    last = [line for line in second.stderr.splitlines() if line.strip()][-1]
    assert f"is in use by process {first.pid}" in last
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=TIMEOUT)
    assert (run_dir / ".trainer.lock").exists()  # left behind by the killed process
    p = _run(run_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_same_run(straight, _outputs(run_dir))


#: A run with Keras callbacks acting at fixed epochs (tests.helpers.keras_callbacks_run).
KERAS_RUN = [*keras_callbacks_run(checkpoint_every=7),
             "+callbacks.pause._target_=tests.helpers.Pause", "+callbacks.pause.seconds=0.02"]


def test_sigkill_then_resume_keeps_keras_callbacks_state(tmp_path):
    straight_dir, run_dir = tmp_path / "straight", tmp_path / "run"
    p = _run(straight_dir, run=KERAS_RUN)
    assert p.returncode == 0, p.stderr[-3000:]
    straight = _outputs(straight_dir)
    history = [json.loads(line) for line in straight[3]]
    assert len(history) == 5 and history[-1]["step"] == 60  # early stopping acted
    assert history[-1]["train/learning_rate"] < history[1]["train/learning_rate"]

    proc = _start(run_dir, run=KERAS_RUN)
    try:
        # Killed after the first epoch's end (step 12), before early stopping's (step 60).
        end = time.monotonic() + TIMEOUT
        while not any(int(p.name.split("-")[1].split(".")[0]) >= 14
                      for p in (run_dir / "checkpoints").glob("ckpt-*.index")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < end, "no checkpoint in time"
            time.sleep(0.01)
        time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it was killed"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    p = _run(run_dir, run=KERAS_RUN)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout + p.stderr
    _assert_same_run(straight, _outputs(run_dir), steps=60)
