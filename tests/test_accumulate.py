"""Gradient accumulation: K micro-batches per update give the update of the whole batch."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tests.helpers import fit_linear, regression_data
from trainer.step.optimizers import GroupedOptimizer

SGD = ["+experiment=dense", "model.dropout=0.0", "callbacks=none", "optimizer=sgd",
       "optimizer.momentum=0.0", "data.batch_size=64", "trainer.steps_per_execution=7"]


def _weights(models):
    return [v.numpy() for m in models.values() for v in m.weights]


def _run(make_cfg, tmp_path, name, *overrides):
    from trainer.driver.run import build

    r = build(make_cfg(*overrides), tmp_path / name)
    logs = r.trainer.fit(r.step, r.data)
    return r, logs


@pytest.mark.slow
@pytest.mark.parametrize("jit", ["false", "true"])
def test_four_micro_batches_of_16_equal_one_batch_of_64(make_cfg, tmp_path, jit):
    # Plain SGD, no dropout: the update is the batch's mean gradient either way. 50 steps
    # cross two epoch ends, whose short batch of 29 splits into 7+7+7+8.
    one, one_logs = _run(make_cfg, tmp_path, "k1", *SGD, "trainer.max_steps=50",
                         f"trainer.jit_compile={jit}")
    four, four_logs = _run(make_cfg, tmp_path, "k4", *SGD, "trainer.max_steps=50",
                           f"trainer.jit_compile={jit}", "trainer.accumulate_steps=4")
    for a, b in zip(_weights(one.models), _weights(four.models)):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    # The global step and the optimizer count updates, not micro-batches.
    assert four.trainer.current_step == 50 == int(four.step.optimizer.iterations.numpy())
    for key in ("train/loss", "train/accuracy", "val/loss"):
        assert four_logs[key] == pytest.approx(one_logs[key], abs=1e-6), key
    # The gradient norm is the update's, of the summed gradient, as one device logs it.
    assert four_logs["train/grad_norm"] == pytest.approx(one_logs["train/grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_accumulation_under_a_mirrored_strategy_equals_one_device(make_cfg, tmp_path):
    one, _ = _run(make_cfg, tmp_path, "k1", *SGD, "trainer.max_steps=30")
    two, _ = _run(make_cfg, tmp_path, "k4x2", *SGD, "trainer.max_steps=30",
                  "trainer.accumulate_steps=4", "distribute=mirrored",
                  "distribute.cpu_replicas=2")
    for a, b in zip(_weights(one.models), _weights(two.models)):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    assert two.trainer.logs["train/grad_norm"] == pytest.approx(
        one.trainer.logs["train/grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_a_bad_micro_batch_discards_its_whole_update(make_cfg, tmp_path):
    # One NaN example: without accumulation its batch of 64 is skipped; with 4 micro-batches
    # the whole update is skipped too (not just the micro-batch of 16 holding it), so the
    # runs stay identical and both count one reset per epoch (updates, not micro-batches).
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    x[17, 2] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, x=x, y=y)
    common = ["optimizer=sgd", "optimizer.momentum=0.0", "callbacks=none", "data=npz",
              f"data.path={path}", "data.allow_nonfinite=true", "data.batch_size=64",
              "trainer.epochs=3", "tape.reset.when=[nonfinite]"]
    one, one_logs = _run(make_cfg, tmp_path, "k1", *common)
    four, four_logs = _run(make_cfg, tmp_path, "k4", *common, "trainer.accumulate_steps=4")
    for a, b in zip(_weights(one.models), _weights(four.models)):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    assert one_logs["train/tape/resets"] == four_logs["train/tape/resets"] == 3
    assert all(np.isfinite(w).all() for w in _weights(four.models))


@pytest.mark.slow
def test_lazy_regularizers_count_updates_not_micro_batches(make_cfg, tmp_path):
    # every=3: due on updates 0, 3, 6, ... for all four micro-batches of those updates.
    common = [*SGD, "trainer.max_steps=12", "regularizer=input_gradient",
              "regularizer.input_gradient.every=3"]
    one, _ = _run(make_cfg, tmp_path, "k1", *common)
    four, _ = _run(make_cfg, tmp_path, "k4", *common, "trainer.accumulate_steps=4")
    for a, b in zip(_weights(one.models), _weights(four.models)):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("compiled", [True, False])
def test_accumulation_with_adam_on_the_trainer_api(compiled):
    # Adam is not linear in the gradient: equality shows the optimizer saw one summed
    # gradient per update (an update per micro-batch would move it differently).
    data = regression_data(n=96, batch_size=32)
    runs = {}
    for k in (1, 4):
        trainer, model, _ = fit_linear(run_eagerly=not compiled, data=data, epochs=2,
                                       optimizer=keras.optimizers.Adam(0.05),
                                       accumulate_steps=k)
        runs[k] = [w.numpy() for w in model.weights]
        assert trainer.current_step == 6
    for a, b in zip(runs[1], runs[4]):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)


def test_accumulators_stay_out_of_the_checkpoint():
    opt = GroupedOptimizer(keras.optimizers.SGD(0.1))
    opt.accumulate_steps = 4
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt.build(model.trainable_variables)
    names = {v.name for v in opt.variables}
    assert not any("grad_sum" in n for n in names)


def test_accumulate_steps_below_one_is_an_error():
    from trainer import Trainer, UserError

    with pytest.raises(UserError, match="accumulate_steps=0"):
        Trainer(accumulate_steps=0)
