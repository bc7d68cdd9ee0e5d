"""WGAN-GP on a ring of Gaussians: two models, two optimizers, n_critic updates in one step.

``python -m trainer +experiment=gan``. The step subclasses ``trainer.Step`` with two
models and two optimizers named alike and defines ``train_step``/``test_step``; the
Trainer runs it unchanged, compiled or eagerly. The critic's penalty is any critic
regularizer from the ``regularizer`` config group (``gradient_penalty`` by default, or
``r1``/``r2``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from trainer.common.errors import UserError
from trainer.data.base import DataModule
from trainer.data.options import Batching
from trainer.distribute.replicas import global_batch_size, local_rows
from trainer.experiments.plot import COLORS, Canvas, ImageCallback
from trainer.regularizers import CriticContext
from trainer.regularizers.functional import fold_seed, normal
from trainer.step.base import Step, StepInfo


# --- data --------------------------------------------------------------------------------
class MixtureData(DataModule):
    """A ``DataModule`` of samples from a Gaussian mixture, with the mixture's modes and std.

    The targets are zeros (a GAN has none); ``modes`` and ``std`` let the step
    measure mode coverage after training.
    """

    def __init__(self, *, modes, std: float, **kwargs):
        super().__init__(**kwargs)
        self.modes = np.asarray(modes, np.float32)
        self.std = float(std)


def ring_of_gaussians(
    *,
    n_modes: int = 8,
    radius: float = 2.0,
    std: float = 0.05,
    n_samples: int = 25600,
    n_val: int = 2560,
    data_seed: int = 0,
    batching: Batching = Batching(batch_size=256),
) -> MixtureData:
    """``n_modes`` equal Gaussians of standard deviation ``std`` evenly spaced on a circle.

    ``data_seed`` fixes the samples; ``batching.seed`` only drives the shuffle.
    """
    if n_modes < 1 or std <= 0 or radius <= 0:
        raise UserError("data.n_modes must be >= 1, data.std and data.radius positive")
    angles = 2 * np.pi * np.arange(n_modes) / n_modes
    modes = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    rng = np.random.default_rng(data_seed)

    def sample(n):
        return modes[rng.integers(0, n_modes, n)] + std * rng.normal(size=(n, 2))

    x, x_val = sample(n_samples), sample(n_val)
    return MixtureData(
        modes=modes, std=std, train=(x, np.zeros((n_samples, 1))),
        val=(x_val, np.zeros((n_val, 1))), task="regression", batching=batching,
        name=f"ring of {n_modes} Gaussians",
    )


# --- models ------------------------------------------------------------------------------
def _mlp(input_dim, hidden_units, outputs, activation, name):
    import keras

    layers = [keras.Input((input_dim,))]
    for i, units in enumerate(hidden_units):
        layers.append(keras.layers.Dense(int(units), activation=activation, name=f"dense_{i}"))
    layers.append(keras.layers.Dense(outputs, name="head"))
    return keras.Sequential(layers, name=name)


def gan_models(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    latent_dim: int = 2,
    generator_units: list[int] = (128, 128, 128),
    critic_units: list[int] = (128, 128, 128),
    activation: str = "relu",
) -> dict:
    """``{"generator": z -> x, "critic": x -> score}``, two MLPs for flat samples.

    ``input_shape`` is the sample shape (the generator's output and the critic's
    input); ``num_outputs`` is ignored (a critic has one score). The critic has
    no normalization layer: the gradient penalty is per example.
    """
    del num_outputs
    dim = int(np.prod(input_shape))
    return {
        "generator": _mlp(latent_dim, generator_units, dim, activation, "generator"),
        "critic": _mlp(dim, critic_units, 1, activation, "critic"),
    }


# --- the step ----------------------------------------------------------------------------
class WganStep(Step):
    """Wasserstein GAN step: ``n_critic`` critic updates, then one generator update.

    All of it runs in one ``train_step(batch)`` call, so one compiled execution
    holds ``steps_per_execution`` of them. The batch holds real samples (its
    targets are ignored); every critic update sees the whole batch against fresh
    generated samples (as Keras's WGAN-GP example does). The generator's noise is
    drawn statelessly from ``(seed, global step, update)``: no retracing, and the
    same draws eagerly, compiled and after resuming.

    Critic loss: ``mean critic(fake) - mean critic(real) + penalties`` where the
    penalties are the step's regularizers (critic regularizers from
    ``trainer.regularizers``: ``GradientPenalty`` for WGAN-GP, ``R1Penalty``,
    ``R2Penalty``), run on a ``CriticContext``; their lazy schedules count
    critic updates. Generator loss: ``-mean critic(G(z))``.

    Args:
        model: ``{"generator": ..., "critic": ...}`` (see ``gan_models``).
        optimizer: ``{"generator": ..., "critic": ...}`` Keras optimizers.
        n_critic: critic updates per generator update.
        seed: base seed of the generator's noise.
        eval_samples: generated samples drawn for ``final_metrics``.
        coverage_share: a mode counts as covered when at least this share of the
            generated samples lies within 3 standard deviations of it.
    """

    def __init__(
        self,
        *,
        model: dict,
        optimizer: dict,
        regularizers=(),
        n_critic: int = 5,
        seed: int = 0,
        eval_samples: int = 2500,
        coverage_share: float = 0.01,
    ):
        for what, value in (("model", model), ("optimizer", optimizer)):
            if not isinstance(value, Mapping) or set(value) != {"generator", "critic"}:
                raise UserError(f"the GAN step needs {what} with keys generator and critic; "
                                f"got {value!r}")
        wrong = [r.name for r in regularizers if r.applies_to != "critic"]
        if wrong:
            raise UserError(f"regularizer {', '.join(wrong)} penalises a supervised loss; the GAN "
                            "step takes critic regularizers (gradient_penalty, r1, r2)")
        if n_critic < 1:
            raise UserError(f"step.n_critic={n_critic} must be at least 1")
        # Optimizers named after the models: Step.build gives each its model's variables.
        super().__init__(models={"generator": model["generator"], "critic": model["critic"]},
                         optimizers={"generator": optimizer["generator"],
                                     "critic": optimizer["critic"]},
                         regularizers=regularizers)
        self.generator, self.critic = model["generator"], model["critic"]
        self.generator_optimizer = self._optimizers["generator"]
        self.critic_optimizer = self._optimizers["critic"]
        self.latent_dim = int(self.generator.input_shape[-1])
        self.n_critic = int(n_critic)
        self.seed = int(seed)
        self.eval_samples = int(eval_samples)
        self.coverage_share = float(coverage_share)

    # --- the math --------------------------------------------------------------------------
    def noise(self, n, *counters):
        """``n`` latent vectors, a pure function of ``(seed, counters)``.

        Under a strategy they are this replica's rows of the global batch's draw.
        """
        z = normal(tf.stack([global_batch_size(n), self.latent_dim]),
                   fold_seed(self.seed, "latent", *counters))
        return local_rows(z)

    def critic_objective(self, real, fake, tape, iteration):
        """``(total loss, critic loss, wasserstein estimate, penalty logs)``; inside ``tape``."""
        real_score = tf.reduce_mean(self.critic(real, training=True))
        fake_score = tf.reduce_mean(self.critic(fake, training=True))
        critic_loss = fake_score - real_score
        ctx = CriticContext(step=self, critic=self.critic, real=real, fake=fake, tape=tape,
                            iteration=iteration)
        total, reg_logs = critic_loss, {}
        for reg in self.regularizers:
            contribution, value = reg.contribute(ctx)
            total += contribution
            reg_logs[f"reg/{reg.name}"] = value
        return total, critic_loss, real_score - fake_score, reg_logs

    def generator_objective(self, z):
        return -tf.reduce_mean(self.critic(self.generator(z, training=True), training=True))

    def train_step(self, batch, info: StepInfo | None = None) -> dict:
        """``n_critic`` critic updates and one generator update.

        Logs (means over the critic updates): ``loss`` (the critic's objective with
        its penalties), ``critic_loss`` (without them), ``wasserstein`` (the critic's
        estimate ``mean critic(real) - mean critic(fake)``), ``reg/<name>``; and
        ``generator_loss`` and the generator's ``grad_norm``.
        """
        real = tf.cast(batch[0], tf.float32)
        n = tf.shape(real)[0]
        step = (info or StepInfo.at()).global_step
        critic_vars = self.critic.trainable_variables
        sums = {}
        for i in range(self.n_critic):  # unrolled: n_critic is small and static
            update = step * self.n_critic + i
            # Generated outside the critic's tape: the critic update does not reach the generator.
            fake = self.generator(self.noise(n, update, 0), training=True)
            with tf.GradientTape() as tape:
                total, critic_loss, w, reg_logs = self.critic_objective(real, fake, tape, update)
            self.apply(tape, total, critic_vars, self.critic_optimizer)
            logs = {"loss": total, "critic_loss": critic_loss, "wasserstein": w, **reg_logs}
            sums = {k: sums.get(k, 0.0) + v for k, v in logs.items()}
        logs = {k: v / self.n_critic for k, v in sums.items()}
        gen_vars = self.generator.trainable_variables
        with tf.GradientTape() as tape:
            gen_loss = self.generator_objective(self.noise(n, step, 1))
        grads = self.apply(tape, gen_loss, gen_vars, self.generator_optimizer)
        logs["generator_loss"] = gen_loss
        logs["grad_norm"] = self.grad_norm(grads)
        return logs

    def test_step(self, batch) -> dict:
        """The critic's Wasserstein estimate on a validation batch against fixed noise."""
        real = tf.cast(batch[0], tf.float32)
        fake = self.generator(self.noise(tf.shape(real)[0], -1, 2), training=False)
        real_score = tf.reduce_mean(self.critic(real, training=False))
        fake_score = tf.reduce_mean(self.critic(fake, training=False))
        return {"loss": fake_score - real_score, "wasserstein": real_score - fake_score,
                "generator_loss": -fake_score}

    def gradients_by_path(self, batch, info: StepInfo | None = None) -> dict:
        """Critic gradients of the critic loss and generator gradients of the generator loss."""
        real = tf.cast(batch[0], tf.float32)
        n, step = tf.shape(real)[0], (info or StepInfo.at()).global_step
        fake = self.generator(self.noise(n, step * self.n_critic, 0), training=True)
        critic_vars, gen_vars = self.critic.trainable_variables, self.generator.trainable_variables
        with tf.GradientTape() as tape:
            total, *_ = self.critic_objective(real, fake, tape, step * self.n_critic)
        out = dict(zip([v.path for v in critic_vars], tape.gradient(total, critic_vars)))
        with tf.GradientTape() as tape:
            gen_loss = self.generator_objective(self.noise(n, step, 1))
        out.update(zip([v.path for v in gen_vars], tape.gradient(gen_loss, gen_vars)))
        return {k: tf.zeros(v.shape, v.dtype) if out[k] is None else out[k]
                for k, v in zip(out, [*critic_vars, *gen_vars])}

    # --- after training --------------------------------------------------------------------
    def sample(self, n: int, counter: int = -2) -> np.ndarray:
        """``n`` generated samples as a numpy array (fixed noise for a given ``counter``)."""
        z = self.noise(tf.constant(n), tf.constant(counter, tf.int64), 3)
        return self.generator(z, training=False).numpy()

    def final_metrics(self, data) -> dict:
        """Mode coverage and sample quality on ``eval_samples`` generated samples.

        ``gan/share_near_mode``: share of samples within 3 standard deviations of
        the nearest mode. ``gan/modes_covered``: modes with at least
        ``coverage_share`` of the samples within 3 standard deviations of them
        (out of ``gan/modes``).
        """
        if not isinstance(data, MixtureData):
            return {}
        modes = data.modes
        x = self.sample(self.eval_samples)
        dist = np.linalg.norm(x[:, None, :] - modes[None], axis=-1)
        nearest = dist.argmin(axis=1)
        near = dist.min(axis=1) <= 3 * data.std
        counts = np.bincount(nearest[near], minlength=len(modes))
        covered = int((counts >= self.coverage_share * len(x)).sum())
        return {"gan/modes_covered": covered, "gan/modes": len(modes),
                "gan/share_near_mode": float(near.mean())}


# --- TensorBoard -------------------------------------------------------------------------
def latent_noise(n: int, latent_dim: int, seed: int = 0) -> np.ndarray:
    """``n`` standard normal latent vectors, the same for a given ``seed``.

    Drawn with numpy, apart from the step's noise streams, so drawing images never
    changes the training run; a fixed draw shows how the generator's map of the
    same points moves from image to image.
    """
    return np.random.default_rng(seed).standard_normal((n, latent_dim)).astype(np.float32)


def ring_modes(n_modes: int, radius: float) -> np.ndarray:
    """The ``[n_modes, 2]`` centres of ``ring_of_gaussians``: evenly spaced on a circle."""
    angles = 2 * np.pi * np.arange(n_modes) / n_modes
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


class SampleImages(ImageCallback):
    """Scatter image of generated samples (orange) over real ones (blue), modes in green.

    Real samples are the first ``n_samples`` of ``trainer.validation_batches()``;
    generated ones are ``trainer.models["generator"]`` applied to a fixed
    ``latent_noise`` draw. The modes come from the config (the experiment sets
    them from the data config by interpolation); without them none are drawn.

    Args:
        every_n_steps: drawing interval in steps.
        n_samples: points drawn of each kind.
        size: image side in pixels.
        n_modes: modes of the ring of Gaussians, or None to draw no modes.
        radius: the ring's radius (needed with ``n_modes``).
        seed: seed of the latent draw.
    """

    tag = "gan/samples"
    description = "generated (orange) against real (blue) samples; mixture modes in green"

    def __init__(self, *, every_n_steps: int = 500, n_samples: int = 1000, size: int = 256,
                 n_modes: int | None = None, radius: float | None = None, seed: int = 0):
        super().__init__(every_n_steps=every_n_steps)
        if n_modes is not None and (radius is None or n_modes < 1):
            raise UserError(f"callbacks.samples: n_modes={n_modes} needs n_modes >= 1 and a "
                            f"radius (got radius={radius})")
        self.n_samples, self.size, self.seed = int(n_samples), int(size), int(seed)
        self.modes = None if n_modes is None else ring_modes(int(n_modes), float(radius))

    def draw(self, trainer) -> np.ndarray:
        real = np.concatenate([np.asarray(x) for x, _ in trainer.validation_batches()])
        real = real[: self.n_samples]
        generator = trainer.models["generator"]
        z = latent_noise(self.n_samples, int(generator.input_shape[-1]), self.seed)
        fake = np.asarray(generator(z, training=False))
        extent = 1.25 * float(np.abs(real).max())
        canvas = Canvas((-extent, extent), (-extent, extent), height=self.size, width=self.size)
        canvas.axes().points(real[:, 0], real[:, 1], COLORS["real"])
        canvas.points(fake[:, 0], fake[:, 1], COLORS["fake"])
        if self.modes is not None:
            canvas.points(self.modes[:, 0], self.modes[:, 1], COLORS["mode"], radius=2)
        return canvas.image
