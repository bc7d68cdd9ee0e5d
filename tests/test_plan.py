"""The compile plan: every XLA decision in one function, with a reason, logged, stored in
the checkpoint and kept by a resumed run."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from tests.helpers import fit_linear, regression_data
from trainer import TapeStep, Trainer
from trainer.common.errors import UserError
from trainer.compile.plan import AUTO_XLA_MIN_STEPS, CompileOptions, CompilePlan, plan_compile

ROOT = Path(__file__).resolve().parents[1]


class _Step:
    """What the plan asks of a step."""

    def __init__(self, blockers=()):
        self.blockers = list(blockers)

    def split_xla_blockers(self):
        return self.blockers


def _plan(step=None, *, fused=True, steps=100, distributed=False, **options):
    return plan_compile(step or _Step(), fused_source=fused, planned_steps=steps,
                        distributed=distributed, options=CompileOptions(**options))


def test_the_configured_choice_with_its_reason():
    on = _plan(jit_compile=True)
    assert on.update_xla and on.fused and on.short_batch_xla and not on.xla_fallback
    assert on.reasons["xla"] == "trainer.jit_compile=true"
    assert not _plan(jit_compile=True, fused=False).fused  # streamed: the step alone
    off = _plan(jit_compile=False)
    assert not (off.update_xla or off.forward_xla) and "false" in off.reasons["xla"]
    eager = _plan(jit_compile=True, run_eagerly=True)
    assert eager.run_eagerly and not eager.update_xla and "run_eagerly" in eager.reasons["xla"]


def test_auto_measures_only_long_in_memory_runs():
    short = _plan(steps=AUTO_XLA_MIN_STEPS - 1)
    assert not short.measure and not short.update_xla and "too few" in short.reasons["xla"]
    streamed = _plan(steps=10 * AUTO_XLA_MIN_STEPS, fused=False)
    assert not streamed.measure and "streamed" in streamed.reasons["xla"]
    long = _plan(steps=AUTO_XLA_MIN_STEPS)
    assert long.measure and not long.update_xla
    chosen = plan_compile(_Step(), fused_source=True, planned_steps=AUTO_XLA_MIN_STEPS,
                          distributed=False, options=CompileOptions(), measured=True)
    assert chosen.update_xla and chosen.fused and chosen.xla_fallback
    assert not chosen.short_batch_xla and not chosen.measure


def test_under_a_strategy_only_the_forward_pass_and_never_for_lazy_regularizers():
    split = _plan(jit_compile=True, distributed=True)
    assert split.forward_xla and not split.update_xla and "forward pass" in split.reasons["xla"]
    auto = _plan(distributed=True, steps=10 * AUTO_XLA_MIN_STEPS)
    assert not (auto.forward_xla or auto.update_xla or auto.measure)
    lazy = _plan(_Step(["regularizer input_gradient is lazy (every 3)"]), jit_compile=True,
                 distributed=True)
    assert not lazy.forward_xla and "input_gradient is lazy" in lazy.reasons["xla"]
    assert "input_gradient is lazy" in lazy.describe()


def test_a_tape_step_names_its_lazy_regularizers_and_other_steps_say_they_do_not_split():
    import keras

    from trainer.regularizers import InputGradientPenalty
    from trainer.step.base import Step

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    eager = TapeStep(model=model, optimizer=keras.optimizers.SGD(0.1), task="regression",
                     regularizers=[InputGradientPenalty(weight=0.1)])
    assert eager.split_xla_blockers() == []
    lazy = TapeStep(model=model, optimizer=keras.optimizers.SGD(0.1), task="regression",
                    regularizers=[InputGradientPenalty(weight=0.1, every=3)])
    assert "is lazy (every 3)" in lazy.split_xla_blockers()[0]
    assert "does not split" in Step.split_xla_blockers(lazy)[0]


def test_a_stored_plan_is_kept_for_the_same_options_only():
    measured = plan_compile(_Step(), fused_source=True, planned_steps=AUTO_XLA_MIN_STEPS,
                            distributed=False, options=CompileOptions(), measured=True)
    import json

    stored = json.loads(measured.to_json())
    kept = plan_compile(_Step(), fused_source=True, planned_steps=AUTO_XLA_MIN_STEPS,
                        distributed=False, options=CompileOptions(), stored=stored)
    assert kept.decisions() == measured.decisions() and "kept" in kept.reasons["xla"]
    other = plan_compile(_Step(), fused_source=True, planned_steps=AUTO_XLA_MIN_STEPS,
                         distributed=False, options=CompileOptions(jit_compile=False),
                         stored=stored)
    assert not other.update_xla and "kept" not in other.reasons["xla"]
    assert CompilePlan.from_json(measured.to_json()) == measured


def test_options_are_checked():
    with pytest.raises(UserError, match=r"trainer\.jit_compile='yes' must be auto, true or"):
        CompileOptions(jit_compile="yes")
    with pytest.raises(UserError, match=r"trainer\.accumulate_steps=0 must be at least 1"):
        CompileOptions(accumulate_steps=0)


@pytest.mark.parametrize("jit", [True, False])
def test_the_plan_is_logged_once_and_stored_in_the_checkpoint(tmp_path, caplog, jit):
    from trainer.callbacks import CheckpointCallback

    with caplog.at_level(logging.INFO, logger="trainer.training.trainer"):
        trainer, _, _ = fit_linear(jit_compile=jit, run_dir=str(tmp_path),
                                   callbacks=[CheckpointCallback(every_seconds=0)])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compile plan")]
    assert len(lines) == 1 and ("XLA for the whole execution" if jit else "no XLA") in lines[0]
    assert trainer.plan.update_xla is jit
    assert trainer.progress.plan["update_xla"] is jit  # saved with every checkpoint
    # A resumed run with the same options keeps the stored plan.
    resumed = Trainer(epochs=3, steps_per_execution=4, jit_compile=jit, run_dir=str(tmp_path),
                      callbacks=[CheckpointCallback(every_seconds=0)])
    import keras

    from tests.helpers import linear_model

    resumed.fit(TapeStep(model=linear_model(), optimizer=keras.optimizers.SGD(0.05),
                         task="regression"), regression_data())
    assert resumed.restored_from and "kept from the checkpoint" in resumed.plan.reasons["xla"]
    assert resumed.plan.decisions() == trainer.plan.decisions()


def test_no_module_but_the_plan_reads_jit_compile():
    """``jit_compile`` is an option the plan decides from: the trainer passes it on, the
    schemas declare it, and no other module reads it."""
    readers = []
    allowed = {"trainer/compile/plan.py", "trainer/training/trainer.py",
               "trainer/driver/schemas.py"}
    for path in sorted((ROOT / "trainer").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "jit_compile" and (
                    rel not in allowed):
                readers.append(f"{rel}:{node.lineno}")
    assert not readers, readers
