"""Shared fixtures: Hydra composition of the shipped configs, tiny data, a recording callback."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from trainer.callbacks import Callback
from trainer.distribute import split_cpu
from trainer.driver.schemas import register_configs

register_configs()

# Two logical CPU devices, made before any test starts TensorFlow: the mirrored-strategy
# tests run two replicas in this process (a device set cannot change once TF has started).
# Everything else runs on the first, as on any host.
split_cpu(2)

# Overrides that shrink any config to a few fast steps.
FAST = [
    "data=synthetic",
    "trainer.epochs=2",
    "trainer.steps_per_execution=4",
    "callbacks.tensorboard.histogram_every_n_steps=5",
    "callbacks.progress.mode=log",
]


@pytest.fixture
def make_cfg():
    """Compose ``config.yaml`` with overrides, as ``python -m trainer`` would."""

    def _compose(*overrides, return_hydra_config=False):
        GlobalHydra.instance().clear()
        with initialize_config_module("trainer.configs", version_base="1.3"):
            return compose("config", overrides=list(overrides),
                           return_hydra_config=return_hydra_config)

    yield _compose
    GlobalHydra.instance().clear()


class Recorder(Callback):
    """Records every hook call as ``(hook, step-or-epoch)``."""

    def __init__(self):
        self.calls = []

    def on_fit_start(self, trainer):
        self.calls.append(("fit_start", trainer.current_step))

    def on_epoch_start(self, trainer, epoch):
        self.calls.append(("epoch_start", epoch))

    def on_execution_end(self, trainer, global_step, logs):
        self.calls.append(("execution_end", global_step))

    def on_epoch_end(self, trainer, epoch, logs):
        self.calls.append(("epoch_end", epoch))

    def on_fit_end(self, trainer, logs):
        self.calls.append(("fit_end", trainer.current_step))


@pytest.fixture
def recorder():
    return Recorder()
