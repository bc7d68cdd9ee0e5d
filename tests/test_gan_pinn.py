"""The gan and pinn experiments: their steps against closed forms, and short runs of both."""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import tb_reader
from tests.helpers import cli
from trainer import Trainer
from trainer.common.errors import UserError
from trainer.data import Batching
from trainer.driver.run import run
from trainer.experiments.gan import WganStep, gan_models, ring_of_gaussians
from trainer.experiments.pinn import PinnStep, Poisson1D, poisson_data
from trainer.regularizers import GradientPenalty, R1Penalty

BARE = ["trainer.epochs=1", "trainer.max_steps=3", "trainer.steps_per_execution=1"]
SHORT = [*BARE, "callbacks.progress.mode=log", "callbacks.tensorboard.histogram_every_n_steps=2"]


def _gan(regularizers=None, n_critic=3, seed=0):
    keras.utils.set_random_seed(seed)
    models = gan_models(input_shape=(2,), num_outputs=1, generator_units=[16],
                        critic_units=[16])
    optimizers = {"generator": keras.optimizers.Adam(1e-3),
                  "critic": keras.optimizers.Adam(1e-3)}
    regs = [GradientPenalty()] if regularizers is None else regularizers
    step = WganStep(model=models, optimizer=optimizers, n_critic=n_critic, regularizers=regs)
    step.build()
    return step


def _real_batch(n=64):
    data = ring_of_gaussians(n_samples=256, n_val=64, batching=Batching(batch_size=n))
    return next(iter(data.train_dataset()))


# --- the GAN step -----------------------------------------------------------------------
def test_gan_step_runs_n_critic_critic_updates_per_generator_update():
    step = _gan(n_critic=3)
    logs = step.train_step(_real_batch())
    opts = step.optimizers
    assert int(opts["critic"].iterations.numpy()) == 3
    assert int(opts["generator"].iterations.numpy()) == 1
    assert {"loss", "critic_loss", "generator_loss", "wasserstein", "reg/gradient_penalty",
            "grad_norm"} <= set(logs)
    assert set(step.models) == {"generator", "critic"}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["compiled", "xla"])
def test_gan_step_compiled_matches_eager(mode):
    batch = _real_batch()
    eager = _gan()
    eager_logs = eager.train_step(batch)
    other = _gan()
    other_logs = tf.function(other.train_step, jit_compile=mode == "xla")(batch)
    for a, b in zip(eager.trainable_variables, other.trainable_variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-4, atol=1e-5)
    for k, v in eager_logs.items():
        assert float(other_logs[k]) == pytest.approx(float(v), rel=1e-3, abs=1e-5), k


def test_gan_noise_is_reproducible_and_differs_between_updates():
    step = _gan()
    a = step.noise(tf.constant(4), tf.constant(7, tf.int64), 0).numpy()
    b = tf.function(step.noise)(tf.constant(4), tf.constant(7, tf.int64), 0).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not np.allclose(a, step.noise(tf.constant(4), tf.constant(8, tf.int64), 0).numpy())


def test_gan_step_refuses_supervised_regularizers_and_bad_models():
    from trainer.regularizers import InputGradientPenalty

    with pytest.raises(UserError, match="input_gradient penalises a supervised loss"):
        _gan(regularizers=[InputGradientPenalty()])
    with pytest.raises(UserError, match="keys generator and critic"):
        WganStep(model=keras.Sequential(), optimizer={})


class SpyR1(R1Penalty):
    """R1 that records, each time it is computed, the iteration its context gives and the
    number of critic updates applied so far (the critic optimizer's iteration count)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.iterations = tf.Variable(tf.fill([64], tf.constant(-1, tf.int64)), trainable=False)
        self.critic_updates = tf.Variable(tf.fill([64], tf.constant(-1, tf.int64)),
                                          trainable=False)

    def penalty(self, ctx):
        with ctx.tape.stop_recording():
            at = tf.reshape(self.count, [1, 1])
            done = ctx.step.optimizers["critic"].iterations
            self.iterations.scatter_nd_update(at, [tf.cast(ctx.iteration, tf.int64)])
            self.critic_updates.scatter_nd_update(at, [tf.cast(done, tf.int64)])
            self.count.assign_add(1)
        return super().penalty(ctx)

    def history(self):
        n = int(self.count.numpy())
        return self.iterations.numpy()[:n].tolist(), self.critic_updates.numpy()[:n].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("run_eagerly", [False, True])
def test_lazy_r1_is_computed_on_every_kth_critic_update_exactly(run_eagerly):
    """With n_critic=3 and every=2, R1 is due on the critic updates whose counter
    ``global_step * n_critic + i`` is even, counted across generator steps: not on every
    critic update of even generator steps."""
    n_critic, every, steps = 3, 2, 4
    spy = SpyR1(weight=1.0, every=every)
    step = _gan(regularizers=[spy], n_critic=n_critic)
    data = ring_of_gaussians(n_samples=256, n_val=64, batching=Batching(batch_size=32))
    Trainer(epochs=1, max_steps=steps, steps_per_execution=2,
            run_eagerly=run_eagerly).fit(step, data)
    due = [u for u in range(steps * n_critic) if u % every == 0]  # [0, 2, 4, 6, 8, 10]
    iterations, critic_updates = spy.history()
    assert iterations == due
    assert critic_updates == due  # the penalty ran before those critic updates
    assert int(step.optimizers["critic"].iterations.numpy()) == steps * n_critic


def test_mode_coverage_of_a_perfect_and_a_collapsed_generator():
    data = ring_of_gaussians(n_samples=256, n_val=64)
    step = _gan()
    rng = np.random.default_rng(0)
    perfect = data.modes[rng.integers(0, 8, 2500)] + data.std * rng.normal(size=(2500, 2))
    step.sample = lambda n: perfect[:n]
    m = step.final_metrics(data)
    assert m["gan/modes_covered"] == 8 and m["gan/share_near_mode"] > 0.98
    step.sample = lambda n: np.repeat(data.modes[:1], n, axis=0)
    m = step.final_metrics(data)
    assert m["gan/modes_covered"] == 1 and m["gan/share_near_mode"] == 1.0
    step.sample = lambda n: np.zeros((n, 2))  # the centre of the ring: no mode
    assert step.final_metrics(data)["gan/modes_covered"] == 0


# --- the PINN step ----------------------------------------------------------------------
def _pinn(model, problem=None, **kw):
    return PinnStep(model=model, optimizer=keras.optimizers.Adam(1e-3), task="regression",
                    problem=problem or Poisson1D(), **kw)


@pytest.mark.parametrize("compiled", [False, True])
def test_pinn_derivatives_are_the_closed_form_of_a_tanh_network(compiled):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(1)])
    step = _pinn(model)
    x = tf.linspace(-1.0, 1.0, 9)[:, None]
    fn = tf.function(step.derivatives) if compiled else step.derivatives
    u, du, d2u = (t.numpy()[:, 0] for t in fn(x, False))
    w1, b1, w2, b2 = (v.numpy().astype("float64") for v in model.trainable_variables)
    z = x.numpy().astype("float64") @ w1 + b1
    t, a = np.tanh(z), w2[:, 0]
    np.testing.assert_allclose(u, t @ a + b2[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(du, (1 - t**2) @ (a * w1[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d2u, (-2 * t * (1 - t**2)) @ (a * w1[0] ** 2), rtol=1e-4,
                               atol=1e-5)


def test_pinn_loss_vanishes_on_the_exact_solution_only():
    problem = Poisson1D(frequency=2.0, slope=0.5, offset=0.25)
    exact = keras.Sequential([keras.Input((1,)), keras.layers.Lambda(problem.exact)])
    x = tf.random.uniform([64, 1], -1.0, 1.0)
    loss, u = _pinn(exact, problem).compute_loss(x, None, training=False)
    assert float(loss) < 1e-8
    np.testing.assert_allclose(u.numpy(), problem.exact(x.numpy()), rtol=1e-5, atol=1e-6)
    # The sign of the source matters: u'' = -f is not a solution.
    flipped = keras.Sequential([keras.Input((1,)), keras.layers.Lambda(
        lambda x: -tf.sin(2 * math.pi * x) + 0.5 * x + 0.25)])
    assert float(_pinn(flipped, problem).compute_loss(x, None, training=False)[0]) > 1.0


def test_pinn_data_targets_are_the_exact_solution_and_the_step_needs_a_problem():
    problem = Poisson1D()
    data = poisson_data(problem=problem, n_collocation=64, n_val=11, batch_size=16)
    np.testing.assert_allclose(data.y_val, problem.exact(data.x_val), rtol=1e-6)
    assert data.x_val[0, 0] == -1.0 and data.x_val[-1, 0] == 1.0
    with pytest.raises(UserError, match="needs a problem"):
        PinnStep(model=keras.Sequential(), optimizer=keras.optimizers.Adam(), problem=None)


# --- the experiments, a few steps each ----------------------------------------------------
def _images(run_dir, tag):
    return [e.step for e in tb_reader.load(run_dir / "tb" / "train").Tensors(tag)]


@pytest.mark.slow
def test_gan_experiment_runs_a_few_steps(make_cfg, tmp_path):
    cfg = make_cfg("+experiment=gan", *SHORT, "callbacks.samples.every_n_steps=2")
    metrics = run(cfg, run_dir=tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert {"gan/modes_covered", "gan/modes", "gan/share_near_mode"} <= set(saved)
    assert metrics["step"] == 3 and saved["gan/modes"] == 8
    assert 0 <= saved["gan/modes_covered"] <= 8 and 0.0 <= saved["gan/share_near_mode"] <= 1.0
    assert (tmp_path / "generator.keras").exists() and (tmp_path / "critic.keras").exists()
    assert _images(tmp_path, "gan/samples") == [0, 2, 3]


@pytest.mark.slow
def test_gan_experiment_takes_other_critic_regularizers(make_cfg, tmp_path):
    cfg = make_cfg("+experiment=gan", *BARE, "regularizer=[r1,r2]", "regularizer.r1.every=2",
                   "callbacks=none")
    metrics = run(cfg, run_dir=tmp_path)
    assert "train/reg/r1" in metrics and "train/reg/r2" in metrics
    assert "train/reg/gradient_penalty" not in metrics


def test_pinn_experiment_runs_a_few_steps(make_cfg, tmp_path):
    cfg = make_cfg("+experiment=pinn", *SHORT, "callbacks.solution.every_n_steps=2")
    run(cfg, run_dir=tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert {"pinn/relative_l2_error", "pinn/max_abs_error", "val/l2_error", "val/mae",
            "train/mae"} <= set(saved)
    assert saved["step"] == 3 and saved["pinn/relative_l2_error"] > 0
    assert _images(tmp_path, "pinn/solution") == [0, 2, 3]


def test_images_need_a_tensorboard_callback(make_cfg, tmp_path):
    cfg = make_cfg("+experiment=pinn", *BARE, "callbacks=none")
    assert list(cfg.callbacks) == ["solution"]  # the experiment's image callback stays
    run(cfg, run_dir=tmp_path)
    assert not (tmp_path / "tb").exists()


@pytest.mark.slow
def test_pinn_default_reaches_the_target_error(tmp_path):
    """The shipped defaults, through the real CLI (about ten seconds)."""
    run_dir = tmp_path / "run"
    p = cli("+experiment=pinn", "callbacks=none", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["pinn/relative_l2_error"] < 1e-2
