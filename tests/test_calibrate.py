"""jit_compile=auto times both compilations on long in-memory runs and keeps the faster."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import trainer.compile.plan
import trainer.training.trainer as trainer_module
from trainer.compile.calibrate import choose_faster
from trainer.driver.run import build

# A short dense run that auto measures once the threshold is lowered below it; inside the
# first epoch (23 steps at batch 64), whose short last batch auto would run without XLA.
DENSE = ["+experiment=dense", "callbacks=none", "trainer.max_steps=20", "data.batch_size=64",
         "trainer.steps_per_execution=5"]


def test_choose_faster_keeps_xla_only_when_clearly_faster():
    assert choose_faster({True: [1.0, 0.9, 0.9], False: [1.1, 1.2, 1.0]}) is True
    assert choose_faster({True: [0.99], False: [1.0]}) is False  # within the noise margin
    assert choose_faster({True: [1.5, 1.3], False: [1.0, 1.1]}) is False
    # Paired rounds: one lucky XLA round (the load dropped) does not decide.
    assert choose_faster({True: [0.5, 1.1, 1.1], False: [1.0, 1.0, 1.0]}) is False


def _weights(r):
    return [v.numpy() for m in r.models.values() for v in m.weights]


@pytest.mark.slow
@pytest.mark.parametrize("faster", [True, False])
def test_auto_runs_the_faster_compilation_and_the_measurement_changes_nothing(
        make_cfg, tmp_path, monkeypatch, caplog, faster):
    monkeypatch.setattr(trainer.compile.plan, "AUTO_XLA_MIN_STEPS", 10)
    timings = {True: [1.0], False: [2.0]} if faster else {True: [2.0], False: [1.0]}
    real = trainer_module.time_compilations

    def measured(runs, checkpoint, **kw):
        real(runs, checkpoint, **kw)  # really runs both (and restores the state)
        return timings

    monkeypatch.setattr(trainer_module, "time_compilations", measured)
    with caplog.at_level(logging.INFO):
        auto = build(make_cfg(*DENSE, "trainer.jit_compile=auto"), tmp_path / "auto")
        auto.trainer.fit(auto.step, auto.data)
    assert auto.trainer.xla is faster
    assert f"running {'with' if faster else 'without'} XLA" in caplog.text
    fixed = build(make_cfg(*DENSE, f"trainer.jit_compile={str(faster).lower()}"),
                  tmp_path / "fixed")
    fixed.trainer.fit(fixed.step, fixed.data)
    # The timed executions were undone: the run is the one with that setting fixed.
    for a, b in zip(_weights(fixed), _weights(auto)):
        np.testing.assert_array_equal(a, b)
    assert auto.trainer.current_step == 20


@pytest.mark.slow
def test_a_resumed_run_keeps_the_choice_without_measuring_again(make_cfg, tmp_path,
                                                                monkeypatch, caplog):
    monkeypatch.setattr(trainer.compile.plan, "AUTO_XLA_MIN_STEPS", 20)  # both runs measure
    overrides = ["+experiment=dense", "trainer.max_steps=60", "trainer.steps_per_execution=10",
                 "callbacks=default", "~callbacks.tensorboard", "~callbacks.profile"]
    first = build(make_cfg(*overrides, "trainer.max_steps=30"), tmp_path)
    first.trainer.fit(first.step, first.data)
    chosen = first.trainer.xla
    assert first.trainer.progress.plan["update_xla"] is chosen
    calls = []
    monkeypatch.setattr(trainer_module, "time_compilations",
                        lambda *a, **k: calls.append(1) or {True: [1.0], False: [1.0]})
    resumed = build(make_cfg(*overrides), tmp_path)
    resumed.trainer.fit(resumed.step, resumed.data)
    assert resumed.trainer.restored_from and resumed.trainer.xla is chosen and not calls


@pytest.mark.slow
def test_short_runs_and_fixed_settings_do_not_measure(make_cfg, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer_module, "time_compilations", lambda *a, **k: calls.append(1))
    for jit in ("auto", "true", "false"):
        r = build(make_cfg(*DENSE, f"trainer.jit_compile={jit}"), tmp_path / jit)
        r.trainer.fit(r.step, r.data)
    assert not calls


def _tables(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("variables:")]


def test_the_variable_table_is_logged_once_though_auto_compiles_three_times(
        make_cfg, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(trainer.compile.plan, "AUTO_XLA_MIN_STEPS", 10)
    monkeypatch.setattr(trainer_module, "time_compilations",
                        lambda *a, **k: {True: [2.0], False: [1.0]})
    compiles = []
    real = trainer_module.Trainer._compile
    monkeypatch.setattr(trainer_module.Trainer, "_compile",
                        lambda self, **kw: compiles.append(1) or real(self, **kw))
    with caplog.at_level(logging.INFO, logger="trainer.training.trainer"):
        r = build(make_cfg(*DENSE, "trainer.jit_compile=auto"), tmp_path)
        r.trainer.fit(r.step, r.data)
    assert len(compiles) == 3  # the plain step, the XLA one to time, the chosen one
    assert len(_tables(caplog)) == 1
