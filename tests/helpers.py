"""Small builders shared by the tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import keras
import numpy as np

from trainer import Callback, TapeStep, Trainer
from trainer.data import Batching, DataModule


def regression_data(n=100, d=3, batch_size=16, seed=0, shuffle=True, in_memory="auto",
                    **kw) -> DataModule:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = x @ rng.normal(size=(d, 1)) + 0.5
    return DataModule(train=(x, y), val=(x[:20], y[:20]), task="regression",
                      batching=Batching(batch_size=batch_size, seed=seed, shuffle=shuffle,
                                        in_memory=in_memory), **kw)


def linear_model(d=3, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((d,)), keras.layers.Dense(1, name="linear")])


def fit_linear(*, run_eagerly=False, jit_compile=False, epochs=2, spe=4, callbacks=(),
               data=None, optimizer=None, **trainer_kw):
    data = data or regression_data()
    model = linear_model()
    step = TapeStep(model=model, optimizer=optimizer or keras.optimizers.SGD(0.05),
                    task="regression")
    trainer = Trainer(epochs=epochs, steps_per_execution=spe, run_eagerly=run_eagerly,
                      jit_compile=jit_compile, callbacks=callbacks, **trainer_kw)
    logs = trainer.fit(step, data)
    return trainer, model, logs


def cli(*args, cwd, env=None, timeout=300):
    """Run ``python -m trainer ARGS`` in a subprocess; return the CompletedProcess."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "trainer", *args], cwd=cwd, env=full_env,
        capture_output=True, text=True, timeout=timeout,
    )


class Pause(Callback):
    """Sleeps after each execution: stretches a tiny run so a signal can land inside it."""

    def __init__(self, *, seconds: float = 0.01):
        self.seconds = seconds

    def on_execution_end(self, trainer, global_step, logs):
        time.sleep(self.seconds)


class Crash(Callback):
    """Raises at the first execution boundary at or past ``at_step``: a crash in-process."""

    def __init__(self, *, at_step: int):
        self.at_step = at_step

    def on_execution_end(self, trainer, global_step, logs):
        if global_step >= self.at_step:
            raise RuntimeError(f"crash at step {global_step}")


class SaveWeights(Callback):
    """Saves every model's weights at the end of fit as ``<directory>/worker<i>.npz``.

    ``i`` is the worker index from ``TF_CONFIG`` (0 without one), so that each worker of
    a multi-worker run leaves its own copy of the variables to compare.
    """

    def __init__(self, *, directory: str):
        self.directory = directory

    def on_fit_end(self, trainer, logs):
        task = json.loads(os.environ.get("TF_CONFIG") or "{}").get("task", {})
        arrays = [v.numpy() for m in trainer.models.values() for v in m.weights]
        os.makedirs(self.directory, exist_ok=True)
        np.savez(os.path.join(self.directory, f"worker{task.get('index', 0)}.npz"), *arrays)


def keras_callbacks_run(*, checkpoint_every: int) -> list[str]:
    """Overrides of a small run with Keras' EarlyStopping and ReduceLROnPlateau in
    callbacks.keras, made to act at fixed epochs (min_delta=10: only the first epoch
    improves): the learning rate halves at every epoch end from the second on, and the run
    stops after epoch 5 (step 60, 12 steps an epoch) with the first epoch's weights. A run
    resumed without their state would lower the rate, stop and pick its weights at other
    epochs. A checkpoint every ``checkpoint_every`` steps."""
    return [
        "data=synthetic", "data.task=classification", "model.hidden_units=[16,8]",
        "trainer.epochs=8", "trainer.steps_per_execution=1", "optimizer.learning_rate=1e-2",
        f"callbacks.checkpoint.every_n_steps={checkpoint_every}",
        "callbacks.checkpoint.every_seconds=0", "callbacks.checkpoint.min_interval_seconds=0",
        "callbacks.progress.mode=log", "callbacks.tensorboard.histogram_every_n_steps=0",
        "+callbacks.keras._target_=trainer.KerasCallbacks",
        "+callbacks.keras.callbacks=[{_target_: keras.callbacks.EarlyStopping, monitor: "
        "val_loss, patience: 4, min_delta: 10, restore_best_weights: true}, {_target_: "
        "keras.callbacks.ReduceLROnPlateau, monitor: val_loss, factor: 0.5, patience: 1, "
        "min_delta: 10}]",
    ]
