"""Higher-order regularizers against closed forms, finite differences, and compiled vs eager."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import cli, regression_data
from trainer import StepInfo, TapeStep, Trainer
from trainer.common.errors import UserError
from trainer.driver.run import instantiate_node, run
from trainer.regularizers import (
    HessianTrace,
    InputGradientPenalty,
    JacobianNorm,
    ParameterGradientNorm,
    R1Penalty,
    Regularizer,
)
from trainer.regularizers import functional as F

SUPERVISED = {
    "input_gradient": lambda **kw: InputGradientPenalty(**kw),
    "jacobian_norm": lambda **kw: JacobianNorm(n_projections=2, **kw),
    "hessian_trace_inputs": lambda **kw: HessianTrace(n_probes=2, **kw),
    "hessian_trace_parameters": lambda **kw: HessianTrace(wrt="parameters", n_probes=2, **kw),
    "param_grad_norm": lambda **kw: ParameterGradientNorm(**kw),
}


def _batch(n=8, d=3, c=1, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.normal(size=(n, c)).astype("float32")
    return tf.constant(x), tf.constant(y)


def _linear(d=3, c=1, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((d,)), keras.layers.Dense(c, name="linear")])


def _mlp(d=3, c=2, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((d,)), keras.layers.Dense(8, activation="tanh"),
                             keras.layers.Dense(c)])


def _step(model, *regs, cls=TapeStep):
    return cls(model=model, optimizer=keras.optimizers.SGD(0.0), task="regression",
               regularizers=list(regs))


def _record(step, x, y, compiled=False, iteration=None):
    """``(total loss, loss, reg logs)`` of one recorded forward pass (at global step
    ``iteration``, a variable, or 0)."""

    def fn(x, y):
        info = StepInfo.at() if iteration is None else StepInfo(iteration.read_value())
        with tf.GradientTape() as tape:
            total, ctx, logs = step.record(x, y, tape, info)
        return total, ctx.loss, logs

    out = tf.function(fn)(x, y) if compiled else fn(x, y)
    return tf.nest.map_structure(lambda t: t.numpy(), out)


def _weights(model):
    w, b = (v.numpy().astype("float64") for v in model.trainable_variables)
    return w, b


# --- closed forms on linear and quadratic models ------------------------------------------
@pytest.mark.parametrize("compiled", [False, True])
def test_input_gradient_penalty_is_the_closed_form_of_a_linear_model(compiled):
    model = _linear()
    x, y = _batch()
    _, _, logs = _record(_step(model, InputGradientPenalty()), x, y, compiled)
    w, b = _weights(model)
    r = x.numpy() @ w + b - y.numpy()  # loss_i = r_i^2, d loss_i / d x_i = 2 r_i w
    expected = np.mean(4 * r[:, 0] ** 2 * (w**2).sum())
    assert logs["reg/input_gradient"] == pytest.approx(expected, rel=1e-5)


def test_input_gradient_update_is_the_gradient_of_the_closed_form_objective():
    model = _linear()
    x, y = _batch()
    lam = 0.3
    step = _step(model, InputGradientPenalty(weight=lam))
    grads = step.gradients_by_path((x, y))
    w, b = _weights(model)
    xs, ys = x.numpy().astype("float64"), y.numpy().astype("float64")

    def objective(w, b):
        r = xs @ w + b - ys
        return np.mean(r**2) + lam * np.mean(4 * r[:, 0] ** 2 * (w**2).sum())

    eps = 1e-6
    fd_w = np.zeros_like(w)
    for i in range(len(w)):
        e = np.zeros_like(w)
        e[i] = eps
        fd_w[i] = (objective(w + e, b) - objective(w - e, b)) / (2 * eps)
    fd_b = (objective(w, b + eps) - objective(w, b - eps)) / (2 * eps)
    kernel = next(v for k, v in grads.items() if k.endswith("kernel"))
    bias = next(v for k, v in grads.items() if k.endswith("bias"))
    np.testing.assert_allclose(kernel.numpy(), fd_w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bias.numpy(), fd_b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_projections", [1, 3])
def test_jacobian_norm_is_exact_for_one_output(n_projections):
    model = _linear(c=1)
    x, y = _batch()
    _, _, logs = _record(_step(model, JacobianNorm(n_projections=n_projections)), x, y)
    w, _ = _weights(model)
    # One output: the projection is +-1, so C ||v^T J||^2 = ||w||^2 exactly.
    assert logs["reg/jacobian_norm"] == pytest.approx((w**2).sum(), rel=1e-5)


@pytest.mark.parametrize("make_model", [lambda: _linear(c=3), lambda: _mlp(c=3)])
def test_jacobian_norm_is_unbiased_for_several_outputs(make_model):
    model = make_model()
    # Copies of one example: each draws its own projection, so their mean converges.
    x = tf.repeat(_batch(n=1)[0], 4000, axis=0)
    y = tf.zeros([4000, 3])
    _, _, logs = _record(_step(model, JacobianNorm()), x, y)
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = model(x)
    exact = float(tf.reduce_sum(tape.batch_jacobian(out, x)[0] ** 2))
    assert logs["reg/jacobian_norm"] == pytest.approx(exact, rel=0.05)


class DiagonalQuadraticStep(TapeStep):
    """loss = mean_i sum_j theta_j^2 x_ij^2: diagonal Hessians in x (2 theta^2) and theta."""

    def compute_loss(self, x, y, training):
        theta = tf.reshape(self.model.trainable_variables[0], [-1])
        loss = tf.reduce_mean(tf.reduce_sum(theta**2 * x**2, axis=1))
        return loss, self.model(x, training=training)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("wrt", ["inputs", "parameters"])
def test_hutchinson_with_one_rademacher_probe_is_exact_on_a_diagonal_hessian(compiled, wrt):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False)])
    x, y = _batch()
    step = _step(model, HessianTrace(wrt=wrt, n_probes=1), cls=DiagonalQuadraticStep)
    _, _, logs = _record(step, x, y, compiled)
    theta = model.trainable_variables[0].numpy().ravel().astype("float64")
    if wrt == "inputs":
        expected = 2 * (theta**2).sum()  # per example: tr diag(2 theta^2)
    else:
        expected = 2 * (x.numpy().astype("float64") ** 2).sum(axis=1).mean()
    assert logs["reg/hessian_trace"] == pytest.approx(expected, rel=1e-5)


def test_hessian_trace_of_inputs_approaches_the_closed_form_of_a_linear_model():
    model = _linear()
    x = tf.repeat(_batch(n=1)[0], 4000, axis=0)
    y = tf.zeros([4000, 1])
    _, _, logs = _record(_step(model, HessianTrace(wrt="inputs")), x, y)
    w, _ = _weights(model)
    # loss_i = (w.x_i + b - y_i)^2 has d^2 loss_i / d x_i^2 = 2 w w^T: trace 2 ||w||^2.
    assert logs["reg/hessian_trace"] == pytest.approx(2 * (w**2).sum(), rel=0.05)


@pytest.mark.slow
def test_hessian_trace_of_parameters_approaches_the_closed_form_of_a_linear_model():
    model = _linear()
    x, y = _batch()
    n = 400
    z = np.concatenate([x.numpy(), np.ones((len(x), 1), "float32")], axis=1).astype("float64")
    hessian = 2 * z.T @ z / len(z)  # MSE of a linear model: (2 / n) [X 1]^T [X 1]
    sources = list(model.trainable_variables)
    estimate = F.hessian_trace(lambda: tf.reduce_mean((model(x) - y) ** 2), sources,
                               seed=F.fold_seed(0, "test"), n_probes=n)
    # Hutchinson's variance with Rademacher probes: 2 (||H||_F^2 - sum_i H_ii^2) / n.
    std = np.sqrt(2 * ((hessian**2).sum() - (np.diag(hessian) ** 2).sum()) / n)
    assert abs(float(estimate) - np.trace(hessian)) < 4 * std


@pytest.mark.parametrize("compiled", [False, True])
def test_parameter_gradient_norm_is_the_closed_form_of_a_linear_model(compiled):
    model = _linear()
    x, y = _batch()
    _, _, logs = _record(_step(model, ParameterGradientNorm()), x, y, compiled)
    w, b = _weights(model)
    r = x.numpy() @ w + b - y.numpy()
    g_w, g_b = 2 * x.numpy().T @ r / len(r), 2 * r.sum(axis=0) / len(r)
    assert logs["reg/param_grad_norm"] == pytest.approx((g_w**2).sum() + (g_b**2).sum(),
                                                        rel=1e-5)


# --- critic penalties -----------------------------------------------------------------------
def _linear_critic(d=2, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((d,)), keras.layers.Dense(1)])


def test_r1_and_r2_of_a_linear_critic_are_its_squared_weight_norm():
    critic = _linear_critic()
    real, fake = tf.random.normal([16, 2]), tf.random.normal([16, 2])
    w = critic.trainable_variables[0].numpy()
    assert float(F.r1_penalty(critic, real)) == pytest.approx((w**2).sum(), rel=1e-5)
    assert float(F.r2_penalty(critic, fake)) == pytest.approx((w**2).sum(), rel=1e-5)


def test_gradient_penalty_of_a_linear_critic_and_its_gradient():
    critic = _linear_critic()
    real, fake = tf.random.normal([16, 2]), tf.random.normal([16, 2])
    kernel = critic.trainable_variables[0]
    with tf.GradientTape() as tape:
        gp = F.gradient_penalty(critic, real, fake, seed=F.fold_seed(0, "gp"))
    w = kernel.numpy().ravel()
    norm = np.linalg.norm(w)
    assert float(gp) == pytest.approx((norm - 1) ** 2, rel=1e-5)
    grad = tape.gradient(gp, kernel).numpy().ravel()
    np.testing.assert_allclose(grad, 2 * (norm - 1) * w / norm, rtol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_gradient_penalty_of_a_quadratic_critic_on_the_drawn_interpolates(compiled):
    a = 0.7

    def critic(x, training=None):  # D(x) = a/2 ||x||^2, so ||dD/dx|| = a ||x||
        return 0.5 * a * tf.reduce_sum(x**2, axis=1, keepdims=True)

    real, fake = tf.random.normal([32, 2]), tf.random.normal([32, 2])
    seed = F.fold_seed(3, "gp", 5)

    def gp(real, fake):
        return F.gradient_penalty(critic, real, fake, seed=seed)

    value = (tf.function(gp) if compiled else gp)(real, fake)
    alpha = F.uniform([32, 1], seed).numpy()
    x_hat = real.numpy() + alpha * (fake.numpy() - real.numpy())
    expected = np.mean((a * np.linalg.norm(x_hat, axis=1) - 1) ** 2)
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_gradient_penalty_has_no_nan_gradient_at_zero_input_gradient():
    critic = _linear_critic()
    critic.trainable_variables[0].assign(tf.zeros([2, 1]))  # dD/dx = 0 everywhere
    real, fake = tf.random.normal([8, 2]), tf.random.normal([8, 2])
    with tf.GradientTape(persistent=True) as tape:
        gp = F.gradient_penalty(critic, real, fake, seed=F.fold_seed(0, "gp"))
        g = F.critic_input_gradient(critic, real)
        naive = tf.reduce_mean((tf.norm(g, axis=1) - 1.0) ** 2)
    kernel = critic.trainable_variables[0]
    assert float(gp) == pytest.approx(1.0)
    np.testing.assert_array_equal(tape.gradient(gp, kernel).numpy(), np.zeros([2, 1]))
    # The naive norm is what the safe one guards against.
    assert np.isnan(tape.gradient(naive, kernel).numpy()).any()


def test_regularizers_refuse_the_wrong_kind_of_step():
    with pytest.raises(UserError, match="r1 penalises a GAN critic"):
        _step(_linear(), R1Penalty())


# --- finite differences and compiled vs eager on a nonlinear model -------------------------
def _flat(grads):
    return np.concatenate([g.numpy().ravel() for g in grads.values()])


@pytest.mark.parametrize("name", sorted(SUPERVISED))
def test_update_matches_finite_differences_on_a_tanh_mlp(name):
    model = _mlp()
    x, y = _batch(c=2)
    step = _step(model, SUPERVISED[name](weight=0.5))
    grads = step.gradients_by_path((x, y))
    variables = {v.path: v for v in model.trainable_variables}
    rng = np.random.default_rng(0)
    direction = {k: rng.normal(size=v.shape).astype("float32") for k, v in variables.items()}
    slope = sum(float(np.sum(grads[k].numpy() * d)) for k, d in direction.items())
    originals = {k: v.numpy() for k, v in variables.items()}

    def objective(h):
        for k, v in variables.items():
            v.assign(originals[k] + h * direction[k])
        return float(_record(step, x, y)[0])

    h = 1e-2
    fd = (objective(h) - objective(-h)) / (2 * h)
    objective(0.0)
    assert slope == pytest.approx(fd, rel=2e-2, abs=1e-3)


@pytest.mark.parametrize("name", sorted(SUPERVISED))
def test_eager_compiled_and_xla_gradients_agree(name):
    x, y = _batch(c=2)
    results = []
    for mode in ("eager", "compiled", "xla"):
        step = _step(_mlp(), SUPERVISED[name](weight=0.5, every=2))
        fn = step.gradients_by_path
        if mode != "eager":
            fn = tf.function(fn, jit_compile=mode == "xla")
        results.append(_flat(fn((x, y))))
    np.testing.assert_allclose(results[1], results[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(results[2], results[0], rtol=1e-4, atol=1e-6)


# --- the lazy schedule ----------------------------------------------------------------------
@pytest.mark.parametrize("compiled", [False, True])
def test_lazy_schedule_contributes_k_times_the_weight_on_schedule_and_zero_off_it(compiled):
    model = _linear()
    x, y = _batch()
    penalty = _record(_step(model, InputGradientPenalty()), x, y)[2]["reg/input_gradient"]
    lazy = _step(model, InputGradientPenalty(weight=0.5, every=3))
    iteration = tf.Variable(0, dtype=tf.int64)
    for it in range(6):
        iteration.assign(it)
        total, loss, logs = _record(lazy, x, y, compiled, iteration)
        if it % 3 == 0:
            assert total - loss == pytest.approx(3 * 0.5 * penalty, rel=1e-5)
        else:
            assert total == loss
        # Off schedule the log repeats the last computed value.
        assert logs["reg/input_gradient"] == pytest.approx(penalty, rel=1e-5)


def test_lazy_schedule_off_step_update_is_the_plain_loss_gradient():
    model = _linear()
    x, y = _batch()
    plain = _step(model).gradients_by_path((x, y))
    lazy = _step(model, ParameterGradientNorm(weight=2.0, every=4))
    off, on = StepInfo.at(1), StepInfo.at(4)
    np.testing.assert_allclose(_flat(lazy.gradients_by_path((x, y), off)), _flat(plain),
                               rtol=1e-6)
    assert not np.allclose(_flat(lazy.gradients_by_path((x, y), on)), _flat(plain))


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="every=0"):
        InputGradientPenalty(every=0)


# --- random draws ---------------------------------------------------------------------------
def test_random_draws_are_identical_eager_compiled_and_under_xla():
    def draws(it):
        seed = F.fold_seed(7, "draws", it)
        return F.uniform([500], seed), F.normal([500], seed), F.rademacher([500], seed)

    it = tf.constant(3, tf.int64)
    eager = [d.numpy() for d in draws(it)]
    for jit in (False, True):
        other = [d.numpy() for d in tf.function(draws, jit_compile=jit)(it)]
        for a, b in zip(eager, other):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    u, z, r = eager
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.05
    assert abs(z.mean()) < 0.15 and abs(z.std() - 1.0) < 0.1
    assert set(np.unique(r)) == {-1.0, 1.0}
    assert not np.allclose(draws(tf.constant(4, tf.int64))[0].numpy(), u)


# --- XLA ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SUPERVISED))
def test_every_regularizer_trains_under_xla(name):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(1)])
    reg = SUPERVISED[name](weight=0.1, every=2)
    step = TapeStep(model=model, optimizer=keras.optimizers.SGD(0.01), task="regression",
                    regularizers=[reg])
    trainer = Trainer(epochs=1, max_steps=4, steps_per_execution=2, jit_compile=True)
    logs = trainer.fit(step, regression_data())
    assert np.isfinite(logs[f"train/reg/{reg.name}"]) and logs["step"] == 4


class PyFuncPenalty(Regularizer):
    """A penalty XLA cannot compile (a Python callback)."""

    name = "python_callback"

    def penalty(self, ctx):
        return tf.numpy_function(lambda v: np.float32(v), [ctx.loss], tf.float32)


def test_xla_failure_names_the_regularizer_and_suggests_turning_jit_off():
    step = TapeStep(model=_linear(), optimizer=keras.optimizers.SGD(0.01), task="regression",
                    regularizers=[InputGradientPenalty(), PyFuncPenalty(every=2)])
    trainer = Trainer(epochs=1, max_steps=2, steps_per_execution=2, jit_compile=True)
    with pytest.raises(UserError, match=r"regularizer python_callback .*trainer\.jit_compile="
                                        r"false"):
        trainer.fit(step, regression_data())


# --- configs --------------------------------------------------------------------------------
def test_one_regularizer_and_a_list_compose_to_a_dict_by_name(make_cfg):
    one = make_cfg("+experiment=dense", "regularizer=input_gradient")
    assert list(one.regularizer) == ["input_gradient"]
    assert one.regularizer.input_gradient._target_ == "trainer.regularizers.InputGradientPenalty"
    both = make_cfg("+experiment=dense", "regularizer=[input_gradient,hessian_trace]",
                    "regularizer.hessian_trace.wrt=parameters")
    assert list(both.regularizer) == ["input_gradient", "hessian_trace"]
    assert instantiate_node(both.regularizer.hessian_trace).wrt == "parameters"


@pytest.mark.parametrize("option", ["input_gradient", "jacobian_norm", "hessian_trace",
                                    "param_grad_norm", "gradient_penalty", "r1", "r2"])
def test_every_regularizer_config_builds_its_class_under_its_name(make_cfg, option):
    cfg = make_cfg(f"regularizer={option}", "seed=5")
    reg = instantiate_node(cfg.regularizer[option])
    assert isinstance(reg, Regularizer) and reg.name == option and reg.every == 1
    if hasattr(reg, "seed"):
        assert reg.seed == 5


def test_regularizers_combine_with_the_dense_experiment(make_cfg, tmp_path):
    cfg = make_cfg("+experiment=dense", "regularizer=[input_gradient,jacobian_norm]",
                   "regularizer.jacobian_norm.every=2", "trainer.epochs=1", "trainer.max_steps=4",
                   "callbacks=none")
    metrics = run(cfg, run_dir=tmp_path)
    assert metrics["train/reg/input_gradient"] > 0 and metrics["train/reg/jacobian_norm"] > 0


def test_gan_regularizer_on_a_supervised_experiment_is_a_user_error(make_cfg, tmp_path):
    cfg = make_cfg("+experiment=dense", "regularizer=gradient_penalty", "callbacks=none")
    with pytest.raises(UserError, match="gradient_penalty penalises a GAN critic"):
        run(cfg, run_dir=tmp_path)


@pytest.mark.slow
def test_cli_adds_regularizers_with_one_override(tmp_path):
    run_dir = tmp_path / "run"
    p = cli("+experiment=dense", "regularizer=[input_gradient,hessian_trace]", "trainer.epochs=1",
            "trainer.max_steps=3", "callbacks=none", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"train/reg/input_gradient", "train/reg/hessian_trace"} <= set(metrics)
