"""Sharpness: the Hessian's top eigenvalue and trace against closed forms and the full Hessian,
and the callback compiled, eager, mirrored and read back from its event files."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import tb_reader
from trainer import SharpnessCallback, TapeStep
from trainer.common.errors import UserError
from trainer.driver.run import build
from trainer.step.hessian import SharpnessOptions, hutchinson_trace, sharpness, top_eigenvalue

SEED = tf.constant([3, 7], tf.int64)


def _quadratic(matrix):
    """``0.5 w^T A w`` of two variables (a vector and a matrix, ``w`` their flat concat):
    its Hessian is ``A``, whatever the split into variables."""
    matrix = tf.constant(matrix, tf.float32)
    n = int(matrix.shape[0])
    a = tf.Variable(tf.random.stateless_normal([2], [1, 2]))
    b = tf.Variable(tf.random.stateless_normal([n - 2, 1], [3, 4]))

    def loss():
        w = tf.concat([a, tf.reshape(b, [-1])], 0)
        return 0.5 * tf.tensordot(w, tf.linalg.matvec(matrix, w), 1)

    return loss, [a, b]


def _symmetric(eigenvalues, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))
    return (q * np.asarray(eigenvalues)) @ q.T


EXACT = SharpnessOptions(iterations=300, tolerance=0.0, trace_probes=1)


def _top(loss, variables) -> float:
    return float(tf.function(lambda: top_eigenvalue(loss, variables, SEED, EXACT))())


def test_the_top_eigenvalue_of_a_quadratic_is_its_matrix_largest():
    loss, variables = _quadratic(_symmetric([5.0, 3.0, -1.0, 0.5, 0.0]))
    assert _top(loss, variables) == pytest.approx(5.0, rel=1e-4)


def test_a_dominant_negative_eigenvalue_does_not_hide_the_top_one():
    # The largest magnitude is -6: the shifted second pass finds the top eigenvalue, 2.
    loss, variables = _quadratic(_symmetric([-6.0, 2.0, 1.0, -0.5]))
    assert _top(loss, variables) == pytest.approx(2.0, rel=1e-4)
    loss, variables = _quadratic(np.diag([-6.0, -2.0, -1.0]))  # all negative: the least so
    assert _top(loss, variables) == pytest.approx(-1.0, rel=1e-4)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    # z_i^2 = 1 for Rademacher probes: every probe gives the trace, the error is 0.
    diagonal = [4.0, -1.5, 2.0, 0.25, 3.0]
    loss, variables = _quadratic(np.diag(diagonal))
    mean, stderr = hutchinson_trace(loss, variables, SEED, probes=3)
    assert float(mean) == pytest.approx(sum(diagonal), rel=1e-6)
    assert float(stderr) == pytest.approx(0.0, abs=1e-5)


def test_hutchinson_is_unbiased_within_its_standard_error():
    matrix = _symmetric([5.0, 3.0, -1.0, 0.5, 2.0, 1.0], seed=1)
    loss, variables = _quadratic(matrix)
    mean, stderr = tf.function(lambda: hutchinson_trace(loss, variables, SEED, probes=400))()
    assert 0.0 < float(stderr) < 0.5
    assert abs(float(mean) - np.trace(matrix)) < 4 * float(stderr)


def _tiny_step():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dropout(0.5), keras.layers.Dense(2)])
    step = TapeStep(model=model, optimizer=keras.optimizers.SGD(0.1), task="regression")
    rng = np.random.default_rng(0)
    batch = (tf.constant(rng.normal(size=(16, 3)), tf.float32),
             tf.constant(rng.normal(size=(16, 2)), tf.float32))
    return step, batch


def _full_hessian(step, batch):
    """The Hessian of the step's inference loss as a dense matrix, from nested tapes."""
    variables = step.trainable_variables
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = step.inference_loss(batch)
        flat = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, variables)], 0)
    rows = outer.jacobian(flat, variables)
    return tf.concat([tf.reshape(r, [flat.shape[0], -1]) for r in rows], 1).numpy()


def test_a_tiny_mlp_matches_its_full_hessian():
    step, batch = _tiny_step()
    hessian = _full_hessian(step, batch)
    np.testing.assert_allclose(hessian, hessian.T, atol=1e-5)
    top = np.linalg.eigvalsh(hessian.astype(np.float64))[-1]
    options = SharpnessOptions(iterations=500, tolerance=0.0, trace_probes=2000)
    out = tf.function(lambda: sharpness(lambda: step.inference_loss(batch),
                                        step.trainable_variables, SEED, options))()
    assert float(out["top_eigenvalue"]) == pytest.approx(top, rel=1e-3)
    # Hutchinson's estimate within 4 standard errors of the exact trace, and that bound
    # tight enough to mean something (a few percent of it).
    trace = np.trace(hessian)
    assert abs(float(out["trace"]) - trace) < 4 * float(out["trace_stderr"])
    assert float(out["trace_stderr"]) < 0.05 * abs(trace)


def test_the_inference_loss_has_no_dropout_and_no_regularizers():
    step, batch = _tiny_step()
    first, second = step.inference_loss(batch), step.inference_loss(batch)
    assert float(first) == float(second)  # dropout (rate 0.5) would draw new masks
    x, y = batch
    expected = tf.reduce_mean(tf.square(step.model(x, training=False) - y))
    assert float(first) == pytest.approx(float(expected), rel=1e-6)


def test_bad_settings_name_the_key():
    with pytest.raises(UserError, match=r"callbacks\.sharpness\.iterations=0"):
        SharpnessCallback(iterations=0)
    with pytest.raises(UserError, match=r"callbacks\.sharpness\.every_n_steps=-1"):
        SharpnessCallback(every_n_steps=-1)
    with pytest.raises(UserError, match=r"callbacks\.sharpness\.num_examples=0"):
        SharpnessCallback(num_examples=0)


SHARP = ["data=synthetic", "model.dropout=0.0", "trainer.epochs=2",
         "trainer.steps_per_execution=4", "callbacks.tensorboard.histogram_every_n_steps=0",
         "callbacks.progress.mode=log", "+callbacks/sharpness=default",
         "callbacks.sharpness.every_n_steps=8", "callbacks.sharpness.num_examples=100",
         "callbacks.sharpness.iterations=30", "callbacks.sharpness.trace_probes=4"]


def _measured(make_cfg, tmp_path, name, *overrides):
    r = build(make_cfg(*SHARP, *overrides), tmp_path / name)
    r.trainer.fit(r.step, r.data)
    (cb,) = [c for c in r.trainer.callbacks if isinstance(c, SharpnessCallback)]
    return r, cb.history


@pytest.mark.slow
def test_the_callback_agrees_compiled_eager_mirrored_and_accumulated(make_cfg, tmp_path):
    r, compiled = _measured(make_cfg, tmp_path, "compiled")
    steps = [h["step"] for h in compiled]
    assert steps == [0, 8, 16, 24]  # the start, then the boundaries at multiples of 8
    assert all(h["top_eigenvalue"] > 0 and np.isfinite(h["trace"]) for h in compiled)
    # The event files hold what was measured, at those steps.
    acc = tb_reader.load(tmp_path / "compiled" / "tb" / "train")
    for key in ("top_eigenvalue", "trace"):
        logged = tb_reader.scalars(acc, f"sharpness/{key}")
        assert [s for s, _ in logged] == steps
        np.testing.assert_allclose([v for _, v in logged], [h[key] for h in compiled],
                                   rtol=1e-6)
    # The compiled measurement is traced once for the whole fit.
    (cb,) = [c for c in r.trainer.callbacks if isinstance(c, SharpnessCallback)]
    assert cb._measure.experimental_get_tracing_count() == 1

    _, eager = _measured(make_cfg, tmp_path, "eager", "trainer.run_eagerly=true")
    _, mirrored = _measured(make_cfg, tmp_path, "mirrored", "distribute=mirrored",
                            "distribute.cpu_replicas=2")
    # Accumulated updates equal the whole batch's: so do the weights measured after them.
    _, accumulated = _measured(make_cfg, tmp_path, "accumulated", "trainer.accumulate_steps=2")
    for other in (eager, mirrored, accumulated):
        assert [h["step"] for h in other] == steps
        for a, b in zip(compiled, other):
            for key in ("top_eigenvalue", "trace"):
                assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a["step"])


@pytest.mark.slow
def test_full_batch_gradient_descent_sharpens_to_the_edge_of_stability(make_cfg, tmp_path):
    """Cohen et al.'s progressive sharpening, short: at eta = 0.2 the sharpness starts below
    0.8 x 2/eta = 8 and rises past it within 150 steps of full-batch gradient descent."""
    rate = 0.2
    r = build(make_cfg("+experiment=edge_of_stability", f"optimizer.learning_rate={rate}",
                       "trainer.epochs=150", "callbacks.sharpness.trace_probes=0",
                       "~callbacks.checkpoint"), tmp_path)
    assert r.data.steps_per_epoch("train") == 1  # one batch: the whole training subset
    r.trainer.fit(r.step, r.data)
    (cb,) = [c for c in r.trainer.callbacks if isinstance(c, SharpnessCallback)]
    sharp = [h["top_eigenvalue"] for h in cb.history]
    assert len(sharp) == 16
    assert sharp[0] < 0.8 * 2 / rate <= max(sharp[1:])
    assert r.trainer.history[-1]["train/loss"] < 0.2 * r.trainer.history[0]["train/loss"]
