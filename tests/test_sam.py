"""SAM and ASAM (step=sam): the ascent against a hand computation, the update against a
hand-written two-tape SAM step that writes and restores the weights, and the step under
freezing, accumulation, mixed precision, eager/compiled and a mirrored strategy."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import cli
from trainer.common.errors import UserError
from trainer.common.keys import SAMPLED, WEIGHT
from trainer.compile.executions import accumulated
from trainer.driver.run import build
from trainer.regularizers import ParameterGradientNorm
from trainer.step.base import StepInfo
from trainer.step.optimizers import LossScale
from trainer.step.sam import SamStep
from trainer.step.tape import ResetPolicy

RNG = np.random.default_rng(0)
X = RNG.normal(size=(8, 3))
Y = RNG.normal(size=(8, 1))


def _model(dtype="float64", dropout=0.0, seed=1):
    keras.utils.set_random_seed(seed)
    layers = [keras.Input((3,), dtype=dtype),
              keras.layers.Dense(4, activation="tanh", dtype=dtype, name="hidden")]
    if dropout:
        layers.append(keras.layers.Dropout(dropout, dtype=dtype))
    layers.append(keras.layers.Dense(1, dtype=dtype, name="out"))
    return keras.Sequential(layers)


def _mse(y, y_pred):
    # Keras' loss objects compute in float32; the hand references are float64 throughout.
    return tf.reduce_mean(tf.square(y_pred - tf.cast(y, y_pred.dtype)))


def _step(model, lr=0.125, **kw):
    step = SamStep(model=model, optimizer=keras.optimizers.SGD(lr), task="regression",
                   loss=_mse, **kw)
    step.build()
    return step


def _hand_epsilon(grads, weights, rho, adaptive, eta):
    """The papers' ascent, written out with numpy."""
    if adaptive:
        ts = [np.abs(w) + eta for w in weights]
        norm = np.sqrt(sum(np.sum((t * g) ** 2) for t, g in zip(ts, grads)))
        return [rho * t * t * g / norm for t, g in zip(ts, grads)]
    norm = np.sqrt(sum(np.sum(g ** 2) for g in grads))
    return [rho * g / norm for g in grads]


def _reference_update(model, x, y, *, rho, lr, adaptive=False, eta=0.01):
    """One SAM step the textbook way: two tapes, the weights written to w + eps and back."""
    variables = model.trainable_variables
    w0 = [v.numpy() for v in variables]

    def grad():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - y))
        return [g.numpy() for g in tape.gradient(loss, variables)]

    eps = _hand_epsilon(grad(), w0, rho, adaptive, eta)
    for v, w, e in zip(variables, w0, eps):
        v.assign(w + e)
    g2 = grad()
    for v, w in zip(variables, w0):
        v.assign(w)
    return [w - lr * g for w, g in zip(w0, g2)]


def _compiled(step):
    """``step.train_step`` in a tf.function (the global step a tensor argument)."""
    run = tf.function(lambda batch, global_step: step.train_step(
        batch, StepInfo(global_step=global_step)))
    return lambda batch, info: run(batch, info.global_step)


def _copy(model, **kw):
    twin = _model(**kw)
    twin.set_weights(model.get_weights())
    return twin


@pytest.mark.parametrize("adaptive", [False, True])
def test_the_ascent_is_the_papers_and_ignores_the_gradients_scale(adaptive):
    step = _step(_model(), rho=0.3, adaptive=adaptive, eta=0.05)
    variables = step.trainable_variables
    grads = [RNG.normal(size=v.shape) for v in variables]
    want = _hand_epsilon(grads, [v.numpy() for v in variables], 0.3, adaptive, 0.05)
    for factor in (1.0, 7.5):  # a replica's share, a loss scale: the direction is the same
        got = step.epsilon([tf.constant(g * factor) for g in grads], variables)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-12, atol=1e-15)
    # A variable without a gradient gets no ascent and does not count in the norm.
    got = step.epsilon([None, *[tf.constant(g) for g in grads[1:]]], variables)
    assert got[0] is None
    rest = _hand_epsilon(grads[1:], [v.numpy() for v in variables[1:]], 0.3, adaptive, 0.05)
    np.testing.assert_allclose(got[1].numpy(), rest[0], rtol=1e-12)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("compiled", [False, True])
def test_the_update_is_a_hand_written_two_tape_sam_step(adaptive, compiled):
    model = _model()
    reference = _copy(model)
    step = _step(model, rho=0.5, adaptive=adaptive, eta=0.01)
    w0 = [v.numpy() for v in model.trainable_variables]
    train = _compiled(step) if compiled else step.train_step
    for i in range(3):
        logs = train((tf.constant(X), tf.constant(Y)), StepInfo.at(i))
        want = _reference_update(reference, X, Y, rho=0.5, lr=0.125, adaptive=adaptive)
        for v, w in zip(reference.trainable_variables, want):
            v.assign(w)
        for v, w in zip(model.trainable_variables, want):
            np.testing.assert_allclose(v.numpy(), w, rtol=0, atol=1e-12)
    assert not np.allclose(model.trainable_variables[0].numpy(), w0[0])
    assert float(logs["sam/sharpness"]) > 0


def test_eager_equals_compiled_with_dropout_and_the_masks_are_the_first_pass_ones():
    results = []
    for compiled in (False, True):
        model = _model(dtype="float32", dropout=0.5)
        step = _step(model, rho=1e-3)
        train = _compiled(step) if compiled else step.train_step
        logs = [train((tf.constant(X, tf.float32), tf.constant(Y, tf.float32)),
                      StepInfo.at(i)) for i in range(3)]
        results.append(([v.numpy() for v in model.weights], logs))
    (w_eager, logs_eager), (w_compiled, logs_compiled) = results
    for a, b in zip(w_eager, w_compiled):
        np.testing.assert_allclose(a, b, atol=1e-6)
    for a, b in zip(logs_eager, logs_compiled):
        # A difference of two float32 losses near 2: their rounding, not more.
        assert float(b["sam/sharpness"]) == pytest.approx(float(a["sam/sharpness"]), abs=1e-6)
    for logs in logs_eager:
        # With the same dropout masks, L(w + eps) - L(w) = rho ||g|| to first order; other
        # masks would make it the difference of two networks' losses, orders larger.
        sharpness, grad_norm = float(logs["sam/sharpness"]), float(logs[SAMPLED]["grad_norm"])
        assert sharpness == pytest.approx(1e-3 * grad_norm, rel=0.05)


def test_a_penalty_on_the_parameter_gradient_is_taken_at_the_perturbed_point():
    # param_grad_norm differentiates the loss by the step's trainable variables: in the
    # perturbed pass they must be the tensors w + eps. float32: the loop adds a regularizer's
    # contribution to the loss as float32.
    x, y = X.astype("float32"), Y.astype("float32")
    model = _model(dtype="float32")
    reference = _copy(model, dtype="float32")
    step = _step(model, rho=0.5, regularizers=[ParameterGradientNorm(weight=0.3)])
    step.train_step((tf.constant(x), tf.constant(y)), StepInfo.at())
    # The reference objective: mse + 0.3 ||d mse / d w||^2, in both of its passes.
    variables = reference.trainable_variables
    w0 = [v.numpy() for v in variables]

    def grad():
        with tf.GradientTape() as tape:
            with tf.GradientTape() as inner:
                loss = tf.reduce_mean(tf.square(reference(x, training=True) - y))
            g = inner.gradient(loss, variables)
            loss += 0.3 * tf.add_n([tf.reduce_sum(tf.square(gi)) for gi in g])
        return [g.numpy() for g in tape.gradient(loss, variables)]

    eps = _hand_epsilon(grad(), w0, 0.5, False, 0.0)
    for v, w, e in zip(variables, w0, eps):
        v.assign(w + e)
    g2 = grad()
    for v, w, g in zip(model.trainable_variables, w0, g2):
        np.testing.assert_allclose(v.numpy(), w - 0.125 * g, atol=1e-6)


def test_the_reset_policy_skips_a_nonfinite_batch_and_then_updates_as_sam():
    model = _model()
    reference = _copy(model)
    step = _step(model, rho=0.5, reset=ResetPolicy(when=["nonfinite"]))
    w0 = [v.numpy() for v in model.trainable_variables]
    bad = X.copy()
    bad[0, 0] = np.nan
    logs = step.train_step((tf.constant(bad), tf.constant(Y)), StepInfo.at())
    assert float(logs[WEIGHT]) == 0.0
    for v, w in zip(model.trainable_variables, w0):
        np.testing.assert_array_equal(v.numpy(), w)
    step.train_step((tf.constant(X), tf.constant(Y)), StepInfo.at(1))
    want = _reference_update(reference, X, Y, rho=0.5, lr=0.125)
    for v, w in zip(model.trainable_variables, want):
        np.testing.assert_allclose(v.numpy(), w, atol=1e-12)


def test_frozen_variables_are_neither_perturbed_nor_changed():
    model = _model()
    model.get_layer("hidden").trainable = False
    reference = _copy(model)
    reference.get_layer("hidden").trainable = False
    frozen = [v.numpy() for v in model.get_layer("hidden").weights]
    step = _step(model, rho=0.5)
    assert len(step.trainable_variables) == 2
    step.train_step((tf.constant(X), tf.constant(Y)), StepInfo.at())
    # The reference ascends along the head's gradient only: perturbing the frozen layer
    # (or counting it in the norm) would give another update.
    want = _reference_update(reference, X, Y, rho=0.5, lr=0.125)
    for v, w in zip(model.trainable_variables, want):
        np.testing.assert_allclose(v.numpy(), w, atol=1e-12)
    for v, w in zip(model.get_layer("hidden").weights, frozen):
        np.testing.assert_array_equal(v.numpy(), w)


def test_accumulation_ascends_per_micro_batch_and_applies_the_summed_gradient():
    model = _model()
    reference = _copy(model)
    step = SamStep(model=model, optimizer=keras.optimizers.SGD(0.125), task="regression",
                   loss=_mse, rho=0.5)
    step.optimizer.accumulate_steps = 2
    step.build()
    run = tf.function(accumulated(lambda b: step.train_step(b, StepInfo.at()), 2,
                                  list(step.optimizers.values()), norm=step.grad_norm))
    run((tf.constant(X), tf.constant(Y)))
    # Each half of the batch: its own ascent and gradient at w; their mean applied once.
    w0 = [v.numpy() for v in reference.trainable_variables]
    updates = []
    for part in (slice(0, 4), slice(4, 8)):
        updates.append(_reference_update(reference, X[part], Y[part], rho=0.5, lr=0.125))
    for v, w, a, b in zip(model.trainable_variables, w0, *updates):
        # The accumulators sum in float32 (GroupedOptimizer): float32's rounding, not 1e-12.
        np.testing.assert_allclose(v.numpy(), w + ((a - w) + (b - w)) / 2, atol=1e-8)


def test_mixed_float16_loss_scaling_gives_the_unscaled_update_and_skips_overflows():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        x, y = tf.constant(X, tf.float32), tf.constant(Y, tf.float32)
        weights = []
        for scale in (None, 2.0**10, 2.0**100):
            keras.utils.set_random_seed(1)
            model = keras.Sequential([keras.Input((3,)),
                                      keras.layers.Dense(4, activation="tanh"),
                                      keras.layers.Dense(1)])
            w0 = [v.numpy() for v in model.trainable_variables]
            step = SamStep(model=model, optimizer=keras.optimizers.SGD(0.125),
                           task="regression", rho=0.5)
            if scale is not None:
                step.use_loss_scale(LossScale(initial_scale=scale))
            step.build()
            _compiled(step)((x, y), StepInfo.at())
            weights.append([v.numpy() for v in model.trainable_variables])
        unscaled, scaled, overflow = weights
        for a, b, w in zip(unscaled, scaled, w0):
            assert not np.allclose(a, w)
            np.testing.assert_allclose(b, a, atol=2e-3)  # float16 rounding of the backward
        # Gradients of 2**100 * loss overflow float16: the update is skipped, w is as it was.
        for a, w in zip(overflow, w0):
            np.testing.assert_array_equal(a, w)
        assert float(step.loss_scale.value) == 2.0**99 and int(step.loss_scale.overflows) == 1
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("override,match", [
    ("step.rho=0", "step.rho=0.0 must be > 0"),
    ("step.perturbation=local", "step.perturbation='local' must be one of global, replica"),
    ("step.eta=-1", "step.eta=-1.0 must be >= 0"),
])
def test_bad_settings_name_the_key(make_cfg, tmp_path, override, match):
    with pytest.raises(UserError, match=match):
        build(make_cfg("step=sam", override, "data=synthetic", "callbacks=none"), tmp_path)


MIRRORED = ["distribute=mirrored", "distribute.cpu_replicas=2"]
DENSE = ["+experiment=dense", "step=sam", "model.dropout=0.0", "callbacks=none",
         "data.batch_size=64", "trainer.steps_per_execution=5", "trainer.max_steps=15"]


def _weights(make_cfg, tmp_path, name, *overrides):
    r = build(make_cfg(*DENSE, *overrides), tmp_path / name)
    logs = r.trainer.fit(r.step, r.data)
    return [v.numpy() for v in r.step.models["model"].weights], logs


@pytest.mark.slow
def test_mirrored_global_perturbation_equals_one_device_and_replica_differs(make_cfg, tmp_path):
    one, one_logs = _weights(make_cfg, tmp_path, "one")
    two, two_logs = _weights(make_cfg, tmp_path, "two", *MIRRORED)
    for a, b in zip(one, two):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    for key in ("train/loss", "train/sam/sharpness", "train/grad_norm"):
        assert two_logs[key] == pytest.approx(one_logs[key], abs=1e-5), key
    # Each replica ascending along its own half-batch gradient is another update (m-sharpness).
    own, _ = _weights(make_cfg, tmp_path, "own", *MIRRORED, "step.perturbation=replica")
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(one, own)) > 1e-4


@pytest.mark.slow
def test_the_cli_trains_with_sam(tmp_path):
    p = cli("+experiment=dense", "step=sam", "trainer.max_steps=12", "trainer.epochs=1",
            "callbacks=none", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "train/sam/sharpness=" in p.stderr + p.stdout
