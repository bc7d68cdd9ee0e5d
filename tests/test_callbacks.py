"""Progress output and checkpoints."""

import logging

import keras
import numpy as np
import tensorflow as tf

from tests.helpers import fit_linear, linear_model
from trainer import CheckpointCallback, ProgressCallback


def test_progress_bar_on_a_terminal(capsys):
    fit_linear(epochs=2, callbacks=[ProgressCallback(mode="bar")])
    out = capsys.readouterr().out
    assert "Epoch 1/2" in out and "Epoch 2/2" in out
    assert "train/loss" in out and "val/loss" in out
    assert "7/7" in out  # steps of the epoch


def test_plain_log_lines_when_not_a_terminal(capsys, caplog):
    with caplog.at_level(logging.INFO, logger="trainer"):
        fit_linear(epochs=2, callbacks=[ProgressCallback(mode="auto")])  # pytest: not a tty
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(lines) == 2 and lines[1].startswith("epoch 2/2 step 14 ")
    assert "val/loss=" in lines[1]
    assert "Epoch 1/2" not in capsys.readouterr().out


def test_checkpoints_hold_model_optimizer_and_step(tmp_path):
    cb = CheckpointCallback(directory="ckpt", max_to_keep=2, min_interval_seconds=0)
    trainer, model, _ = fit_linear(epochs=3, callbacks=[cb], run_dir=str(tmp_path))
    manager = tf.train.CheckpointManager(cb.manager.checkpoint, str(tmp_path / "ckpt"), 2)
    assert [p.rsplit("-", 1)[1] for p in manager.checkpoints] == ["14", "21"]
    fresh = linear_model(seed=1)
    opt = trainer.step.optimizer
    step_var = tf.Variable(0, dtype=tf.int64)
    restored = tf.train.Checkpoint(model=fresh, global_step=step_var)
    restored.restore(manager.latest_checkpoint).expect_partial()
    assert int(step_var.numpy()) == 21
    for a, b in zip(fresh.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    names = {n for n, _ in tf.train.list_variables(manager.latest_checkpoint)}
    assert any(n.startswith("optimizer/") for n in names)
    assert int(opt.iterations.numpy()) == 21
    assert isinstance(fresh, keras.Model)
