"""Progress output, checkpoints, callback state, and callbacks on a fake trainer."""

import logging
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import fit_linear, linear_model
from trainer import CheckpointCallback, ProgressCallback, TapeStep


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


def _optimizer_state(step) -> list:
    """Every variable of the step's optimizers (iteration count, Adam moments), in order."""
    return [v for grouped in step.optimizers.values()
            for opt in grouped.optimizers.values() for v in opt.variables]


def test_checkpoints_hold_the_trainers_checkpoint(tmp_path):
    """A fresh model and a fresh optimizer restored from the last checkpoint file equal the
    trained ones (weights, Adam moments, iteration count), as does the global step."""
    cb = CheckpointCallback(directory="ckpt", max_to_keep=2, min_interval_seconds=0)
    trainer, model, _ = fit_linear(epochs=3, callbacks=[cb], run_dir=str(tmp_path),
                                   optimizer=keras.optimizers.Adam(0.05))
    assert cb.manager.checkpoint is trainer.checkpoint
    manager = tf.train.CheckpointManager(cb.manager.checkpoint, str(tmp_path / "ckpt"), 2)
    assert [p.rsplit("-", 1)[1] for p in manager.checkpoints] == ["14", "21"]
    fresh = linear_model(seed=1)
    fresh_step = TapeStep(model=fresh, optimizer=keras.optimizers.Adam(0.05), task="regression")
    fresh_step.build()  # zero slots, for the restore to fill
    step_var = tf.Variable(0, dtype=tf.int64)
    restored = tf.train.Checkpoint(models={"model": fresh}, optimizers=fresh_step.optimizers,
                                   global_step=step_var)
    status = restored.restore(manager.latest_checkpoint).expect_partial()
    status.assert_existing_objects_matched()
    assert int(step_var.numpy()) == 21
    for a, b in zip(fresh.weights, model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    saved, loaded = _optimizer_state(trainer.step), _optimizer_state(fresh_step)
    assert len(loaded) == len(saved)
    assert any(v.path.endswith("_momentum") and v.numpy().any() for v in saved)
    for a, b in zip(loaded, saved):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=b.path)
    assert int(fresh_step.optimizer.iterations.numpy()) == 21


# --- callbacks against the trainer's public API, on a fake trainer ---------------------------
class FakeTrainer:
    """Only the public trainer API callbacks may use: no ``step``, no ``data``.

    ``drive`` calls the hooks in the trainer's order: executions of ``spe`` steps
    that never cross an epoch end, ``logs_for(epoch)`` as the epoch logs.
    """

    def __init__(self, run_dir, models, *, epochs=3, steps_per_epoch=7, callbacks=(),
                 val=()):
        from trainer.callbacks.base import callback_states
        from trainer.training.state import Progress, TrainingState

        self.models = models
        self.optimizers = {}
        self.averages = None  # no trainer.ema / trainer.swa
        self.global_step = tf.Variable(0, dtype=tf.int64)
        self.epoch, self.epochs, self.steps_per_epoch = 0, epochs, steps_per_epoch
        self.stop_training = False
        self.preempted = None
        self.is_chief = True
        self.clock = time.monotonic
        self.progress = Progress()
        self.run_dir, self.hparams, self.config_text = str(run_dir), {}, ""
        self.variable_table = "| variable |"
        self.callbacks = sorted(callbacks, key=lambda cb: cb.order)  # as the trainer does
        self._val = list(val)
        self.training_state = TrainingState(
            global_step=self.global_step, models=models,
            callbacks=callback_states(self.callbacks, self))
        self.checkpoint = self.training_state.checkpoint

    @property
    def current_step(self):
        return int(self.global_step.numpy())

    def validation_batches(self):
        return list(self._val)

    def gradients_by_path(self):
        return {v.path: np.ones(v.shape, "float32")
                for m in self.models.values() for v in m.trainable_variables}

    def drive(self, *, spe=4, logs_for=lambda epoch: {"val/loss": 1.0}):
        self._hook("on_fit_start")
        for epoch in range(self.current_step // self.steps_per_epoch, self.epochs):
            if self.stop_training:
                break
            self.epoch = epoch
            self._hook("on_epoch_start", epoch)
            end = (epoch + 1) * self.steps_per_epoch
            while self.current_step < end:
                self.global_step.assign(min(self.current_step + spe, end))
                self._hook("on_execution_end", self.current_step, {"train/loss": 1.0})
            logs = {**logs_for(epoch), "epoch": epoch + 1, "step": self.current_step}
            self._hook("on_validation_end", self.current_step, logs)  # as the trainer does
            self._hook("on_epoch_end", epoch, logs)
        self._hook("on_fit_end", {})

    def _hook(self, name, *args):
        # As the trainer does: on_fit_end in reverse order.
        callbacks = reversed(self.callbacks) if name == "on_fit_end" else self.callbacks
        for cb in callbacks:
            getattr(cb, name)(self, *args)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _numbers(manager):
    return [int(p.rsplit("-", 1)[1]) for p in manager.checkpoints]


def test_checkpoint_saves_the_trainers_checkpoint_once_every_callback_finished_the_epoch(
        tmp_path):
    from trainer import EarlyStopping

    cb = CheckpointCallback(directory="ckpt", max_to_keep=5, min_interval_seconds=0)
    stopper = EarlyStopping(patience=10)  # listed after the checkpoint, as in the configs
    trainer = FakeTrainer(tmp_path, {"model": linear_model()}, callbacks=[cb, stopper])
    trainer.drive(logs_for=lambda epoch: {"val/loss": 1.0 / (epoch + 1)})
    assert cb.manager.checkpoint is trainer.checkpoint
    assert _numbers(cb.manager) == [7, 14, 21]
    first = tf.train.load_checkpoint(cb.manager.checkpoints[0])
    # Saved after early stopping had seen epoch 0 (it comes later in the list).
    assert first.get_tensor("callbacks/early_stopping/best/.ATTRIBUTES/VARIABLE_VALUE") == 1.0
    assert first.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE") == 7


def test_checkpoint_interval_holds_saves_back_and_always_saves_the_end(tmp_path):
    cb = CheckpointCallback(directory="ckpt", max_to_keep=5, min_interval_seconds=30)
    clock = FakeClock()
    trainer = FakeTrainer(tmp_path, {"model": linear_model()}, epochs=5, callbacks=[cb])
    trainer.clock = clock  # the checkpoint callback times its saves by the trainer's clock

    def ten_second_epochs(epoch):
        clock.t += 10
        return {"val/loss": 1.0}

    trainer.drive(logs_for=ten_second_epochs)
    # Epoch 0; epochs 1-2 too soon; epoch 3 (30 s later); the end.
    assert _numbers(cb.manager) == [7, 28, 35]


def test_checkpoint_every_n_epochs_zero_saves_only_the_end_and_resumes_counting(tmp_path):
    cb = CheckpointCallback(directory="ckpt", every_n_epochs=0, min_interval_seconds=0)
    trainer = FakeTrainer(tmp_path, {"model": linear_model()}, callbacks=[cb])
    trainer.drive()
    assert _numbers(cb.manager) == [21]
    every2 = CheckpointCallback(directory="ckpt2", every_n_epochs=2, min_interval_seconds=0)
    resumed = FakeTrainer(tmp_path, {"model": linear_model()}, epochs=8, callbacks=[every2])
    resumed.global_step.assign(21)  # three epochs done: saves after 4 and 6 epochs, the end
    resumed.drive()
    assert _numbers(every2.manager) == [28, 42, 56]


def test_early_stopping_state_survives_a_restart(tmp_path):
    from trainer import EarlyStopping
    from trainer.callbacks.base import callback_states

    def losses(values):
        return lambda epoch: {"val/loss": values[epoch]}

    first = EarlyStopping(patience=3)
    assert first.best == float("inf") and first.wait == 0 and first.stopped_epoch is None
    trainer = FakeTrainer(tmp_path, {"model": linear_model()}, epochs=3, callbacks=[first])
    trainer.drive(logs_for=losses([1.0, 0.5, 0.7]))
    assert (first.best, first.wait) == (0.5, 1)
    path = tf.train.Checkpoint(callbacks=callback_states([first], None)).write(str(tmp_path / "c"))

    second = EarlyStopping(patience=3)
    tf.train.Checkpoint(callbacks=callback_states([second], None)).read(path).assert_consumed()
    assert (second.best, second.wait, second.stopped_epoch) == (0.5, 1, None)
    resumed = FakeTrainer(tmp_path, {"model": linear_model()}, epochs=10, callbacks=[second])
    resumed.global_step.assign(21)
    resumed.drive(logs_for=losses([1.0, 0.5, 0.7, 0.6, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1]))
    assert second.stopped_epoch == 4  # patience counted on from the restored wait of 1
    assert resumed.current_step == 35


def test_callback_states_need_distinct_keys():
    from trainer import EarlyStopping
    from trainer.callbacks import Callback
    from trainer.callbacks.base import callback_states
    from trainer.common.errors import UserError

    assert callback_states([CheckpointCallback(), ProgressCallback()], None) == {}
    with pytest.raises(UserError, match="callbacks/early_stopping"):
        callback_states([EarlyStopping(), EarlyStopping()], None)
    other = EarlyStopping(monitor="val/accuracy", mode="max")
    other.state_key = "early_stopping_accuracy"
    assert set(callback_states([EarlyStopping(), other], None)) == {"early_stopping",
                                                             "early_stopping_accuracy"}

    class Keyless(Callback):
        def state(self, trainer):
            return {"v": tf.Variable(1)}

    with pytest.raises(UserError, match="Keyless has state but no state_key"):
        callback_states([Keyless()], None)


def _mlp_with_frozen_body():
    from trainer.step.freezing import set_trainable

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, name="body"),
                              keras.layers.Dense(2, name="mid"),
                              keras.layers.Dense(1, name="head")], name="net")
    set_trainable([model], ["body/*", "mid/*"], False)
    return model


def _trainable(model):
    return sorted(v.path for v in model.trainable_variables)


def test_freeze_schedule_reapplies_the_restored_unfreezes_to_fresh_models(tmp_path):
    from trainer import FreezeSchedule

    # Listed out of order: applied by at_epoch.
    unfreeze = [{"at_epoch": 4, "patterns": ["body/*"]}, {"at_epoch": 2, "patterns": ["mid/*"]}]
    model, schedule = _mlp_with_frozen_body(), FreezeSchedule(unfreeze=unfreeze)
    trainer = FakeTrainer(tmp_path, {"net": model}, epochs=3, callbacks=[schedule])
    trainer.drive()
    assert schedule.position == 1
    assert _trainable(model) == ["net/head/bias", "net/head/kernel", "net/mid/bias",
                                 "net/mid/kernel"]
    path = trainer.checkpoint.write(str(tmp_path / "c"))

    # A restart: the config freezes the fresh model again; the restore brings position 1.
    fresh, again = _mlp_with_frozen_body(), FreezeSchedule(unfreeze=unfreeze)
    resumed = FakeTrainer(tmp_path, {"net": fresh}, epochs=5, callbacks=[again])
    resumed.checkpoint.read(path).assert_consumed()
    assert again.position == 1 and "net/mid/kernel" not in _trainable(fresh)
    again.on_restore(resumed)
    assert _trainable(fresh) == _trainable(model)  # re-applied before the first execution
    resumed.global_step.assign(21)
    resumed.drive()
    assert again.position == 2 and len(_trainable(fresh)) == 6  # body from epoch 4 on


def test_image_callback_draws_at_start_every_n_steps_and_at_the_end(tmp_path):
    from tests.tb_reader import load
    from trainer import TensorBoardCallback
    from trainer.experiments.pinn import SolutionImage

    grid = np.linspace(-1, 1, 21, dtype="float32")[::-1, None]  # not in increasing order
    val = [(grid[i:i + 8], np.sin(3 * grid[i:i + 8])) for i in range(0, 21, 8)]
    image = SolutionImage(every_n_steps=5, size=64)
    trainer = FakeTrainer(tmp_path, {"model": linear_model(d=1)}, epochs=2, val=val,
                          callbacks=[TensorBoardCallback(), image])
    image.on_fit_start(trainer)
    for step in (4, 7, 11, 14):
        trainer.global_step.assign(step)
        image.on_execution_end(trainer, step, {})
    image.on_fit_end(trainer, {})
    steps = [e.step for e in load(tmp_path / "tb" / "train").Tensors("pinn/solution")]
    assert steps == [0, 7, 11, 14]


def test_gan_sample_image_uses_the_generator_validation_batches_and_configured_modes(tmp_path):
    from trainer.experiments.gan import SampleImages, gan_models, latent_noise, ring_modes
    from trainer.experiments.plot import COLORS

    models = gan_models(input_shape=(2,), num_outputs=1, generator_units=[8], critic_units=[8])
    real = ring_modes(8, 2.0).astype("float32")
    trainer = FakeTrainer(tmp_path, models, val=[(real[:5], np.zeros((5, 1))),
                                                 (real[5:], np.zeros((3, 1)))])
    image = SampleImages(n_samples=50, size=64, n_modes=8, radius=2.0).draw(trainer)
    assert image.shape == (64, 64, 3)
    for kind in ("fake", "mode"):
        assert (image == COLORS[kind]).all(axis=-1).any(), kind
    no_modes = SampleImages(n_samples=50, size=64).draw(trainer)
    assert not (no_modes == COLORS["mode"]).all(axis=-1).any()
    np.testing.assert_array_equal(latent_noise(4, 2, seed=1), latent_noise(4, 2, seed=1))


def test_tensorboard_histograms_are_held_back_by_the_interval(tmp_path):
    from tests.tb_reader import load
    from trainer import TensorBoardCallback

    tb = TensorBoardCallback(histogram_every_n_steps=10, histogram_min_interval_seconds=5)
    tb._histogram_when._clock = clock = FakeClock()
    model = linear_model()
    trainer = FakeTrainer(tmp_path, {"model": model}, callbacks=[tb])
    tb.on_fit_start(trainer)
    for step, t in ((4, 0.5), (12, 1.0), (16, 6.0), (24, 7.0), (28, 12.0)):
        clock.t = t
        trainer.global_step.assign(step)
        tb.on_execution_end(trainer, step, {"train/loss": 1.0})
    tb.on_fit_end(trainer, {})
    acc = load(tmp_path / "tb" / "train")
    # The start; 12 too soon after it, written at 16; 24 too soon, written at 28.
    kernel = model.get_layer("linear").kernel.path
    assert [e.step for e in acc.Tensors(f"weights/{kernel}")] == [0, 16, 28]
