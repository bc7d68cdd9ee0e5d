"""Gradient clipping of the update's gradient: one device, replicas and micro-batches agree."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from trainer.common.errors import UserError
from trainer.step.optimizers import GroupedOptimizer

SGD = ["+experiment=dense", "model.dropout=0.0", "callbacks=none", "optimizer=sgd",
       "optimizer.momentum=0.0", "data.batch_size=64", "trainer.steps_per_execution=7",
       "trainer.max_steps=30"]
# Each threshold is below the gradients' (every update is clipped), so per-replica
# clipping, as Keras does it, would give another update.
CLIPS = ["optimizer.global_clipnorm=0.05", "optimizer.clipnorm=0.01",
         "optimizer.clipvalue=0.0005"]


def _weights(models):
    return [v.numpy() for m in models.values() for v in m.weights]


def _fit(make_cfg, tmp_path, *overrides):
    from trainer.driver.run import build

    name = "-".join(o.split("=")[-1] for o in overrides) or "plain"
    r = build(make_cfg(*SGD, *overrides), tmp_path / name)
    logs = r.trainer.fit(r.step, r.data)
    return _weights(r.models), logs


_ONE_DEVICE: dict = {}


def _one_device(make_cfg, tmp_path, clip):
    """The one-device run with ``clip`` (run once per worker process)."""
    if clip not in _ONE_DEVICE:
        _ONE_DEVICE[clip] = _fit(make_cfg, tmp_path, clip, "trainer.jit_compile=false")
    return _ONE_DEVICE[clip]


def _variables():
    return [keras.Variable(np.zeros(3, np.float32)), keras.Variable(np.zeros(2, np.float32))]


def _apply(kind, value, updates):
    """Apply each list of gradients with SGD(lr=1) clipping ``kind``; the weights after."""
    variables = _variables()
    opt = GroupedOptimizer(keras.optimizers.SGD(learning_rate=1.0, **{kind: value}))
    opt.build(variables)
    for grads in updates:
        opt.apply_gradients(zip([np.asarray(g, np.float32) for g in grads], variables))
    return [v.numpy() for v in variables], opt


def test_global_clipnorm_scales_the_update_and_counts_clipped_updates():
    small = [[0.3, 0.0, 0.0], [0.4, 0.0]]  # norm 0.5: left alone
    large = [[3.0, 0.0, 0.0], [0.0, 4.0]]  # norm 5: scaled by 1/5
    weights, opt = _apply("global_clipnorm", 1.0, [small, large, large])
    np.testing.assert_allclose(weights[0], [-0.3 - 0.6 - 0.6, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(weights[1], [-0.4, -0.8 - 0.8], rtol=1e-6)
    logs = opt.clipping.state_logs(opt.iterations)
    assert int(logs["optimizer/clipped_updates"]) == 2
    assert float(logs["optimizer/clipped_fraction"]) == pytest.approx(2 / 3)


def test_clipnorm_clips_each_variable_and_clipvalue_each_entry():
    grads = [[3.0, 0.0, 4.0], [0.1, -0.2]]
    weights, _ = _apply("clipnorm", 1.0, [grads])
    np.testing.assert_allclose(weights[0], [-0.6, 0, -0.8], rtol=1e-6)  # norm 5 -> 1
    np.testing.assert_allclose(weights[1], [-0.1, 0.2], rtol=1e-6)  # norm < 1: unchanged
    weights, opt = _apply("clipvalue", 0.15, [grads])
    np.testing.assert_allclose(weights[0], [-0.15, 0, -0.15], rtol=1e-6)
    np.testing.assert_allclose(weights[1], [-0.1, 0.15], rtol=1e-6)
    assert int(opt.clipping.clipped.numpy()) == 1


def test_the_keras_optimizer_clips_nothing_itself():
    # Its clipping moved to the GroupedOptimizer; clipping twice would be wrong under
    # replicas, and the clones made for parameter groups would clip per group.
    sgd = keras.optimizers.SGD(learning_rate=1.0, clipnorm=0.5)
    opt = GroupedOptimizer(sgd, groups=[{"patterns": ["*"], "lr_scale": 0.5}])
    assert (sgd.clipnorm, sgd.global_clipnorm, sgd.clipvalue) == (None, None, None)
    assert opt.clipping.kind == "clipnorm" and opt.clipping.value == 0.5


@pytest.mark.slow
@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("where", ["mirrored", "accumulate", "eager"])
def test_clipping_gives_the_one_device_update(make_cfg, tmp_path, clip, where):
    other = {"mirrored": ["distribute=mirrored", "distribute.cpu_replicas=2"],
             "accumulate": ["trainer.accumulate_steps=4"],
             "eager": ["trainer.run_eagerly=true"]}[where]
    one, one_logs = _one_device(make_cfg, tmp_path, clip)
    two, two_logs = _fit(make_cfg, tmp_path, clip, *other)
    for a, b in zip(one, two):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    assert two_logs["train/loss"] == pytest.approx(one_logs["train/loss"], rel=1e-5)
    # Every update of these runs is clipped, and counted once (not once per replica or
    # micro-batch).
    assert one_logs["train/optimizer/clipped_updates"] == 30
    assert two_logs["train/optimizer/clipped_updates"] == 30
    assert two_logs["train/optimizer/clipped_fraction"] == 1.0


@pytest.mark.slow
def test_clipping_that_holds_only_sometimes_is_counted_as_a_fraction(make_cfg, tmp_path):
    # With a threshold between the run's gradient norms, some updates are clipped and some
    # not; the count is what one device counts.
    one, logs = _fit(make_cfg, tmp_path, "optimizer.global_clipnorm=0.9")
    two, two_logs = _fit(make_cfg, tmp_path, "optimizer.global_clipnorm=0.9",
                         "distribute=mirrored", "distribute.cpu_replicas=2")
    assert 0 < logs["train/optimizer/clipped_updates"] < 30
    assert logs["train/optimizer/clipped_fraction"] == pytest.approx(
        logs["train/optimizer/clipped_updates"] / 30)
    assert two_logs["train/optimizer/clipped_updates"] == logs["train/optimizer/clipped_updates"]
    for a, b in zip(one, two):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("overrides,message", [
    (["optimizer.clipnorm=1", "optimizer.clipvalue=1"],
     "optimizer.clipnorm and optimizer.clipvalue are both set"),
    (["optimizer.clipvalue=0"], "optimizer.clipvalue=0.0 must be a finite number > 0"),
    (["optimizer.global_clipnorm=-1"], "optimizer.global_clipnorm=-1.0 must be a finite"),
])
def test_bad_clip_settings_are_one_line_errors(make_cfg, overrides, message):
    from trainer.driver.validation import validate

    with pytest.raises(UserError, match=message):
        validate(make_cfg("+experiment=dense", *overrides))
