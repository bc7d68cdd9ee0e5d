"""Penalties on a GAN critic's input gradient: WGAN-GP, R1 and R2."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from trainer.common.errors import UserError
from trainer.regularizers import functional as F
from trainer.regularizers.base import RandomRegularizer, Regularizer


@dataclass
class CriticContext:
    """What critic regularizers see during a critic update of a GAN step.

    Attributes:
        step: the GAN step.
        critic: the critic model (``critic(x) -> scores``).
        real, fake: the real samples and the generated ones of this update.
        tape: the critic update's tape; still recording.
        iteration: the critic-update counter (lazy schedules and seeds count these).
    """

    step: Any
    critic: Any
    real: Any
    fake: Any
    tape: tf.GradientTape
    iteration: Any


def _critic(reg, ctx):
    if not isinstance(ctx, CriticContext):
        raise UserError(
            f"regularizer {reg.name} penalises a GAN critic and needs a GAN step "
            "(+experiment=gan); use input_gradient or jacobian_norm on a supervised step"
        )
    return ctx.critic


class GradientPenalty(RandomRegularizer):
    """WGAN-GP: ``mean (||d critic / d x_hat|| - target)^2`` on random interpolates.

    ``x_hat = real + alpha (fake - real)``, ``alpha ~ U[0, 1)`` per example
    (Gulrajani et al. 2017); safe at zero gradient. Cost per critic update: one
    more critic forward and backward pass, differentiated by the update.

    Args:
        target: the gradient norm the critic is pulled toward (1 for WGAN-GP).
    """

    name = "gradient_penalty"
    applies_to = "critic"

    def __init__(self, *, target: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.target = float(target)

    def penalty(self, ctx):
        critic = _critic(self, ctx)
        return F.gradient_penalty(critic, ctx.real, ctx.fake, seed=self.draw_seed(ctx),
                                  target=self.target)


class R1Penalty(Regularizer):
    """R1 (Mescheder et al. 2018): ``mean ||d critic / d x||^2`` on real samples.

    StyleGAN2 computes it lazily (``every: 16``) with ``weight = gamma / 2``.
    """

    name = "r1"
    applies_to = "critic"

    def penalty(self, ctx):
        return F.r1_penalty(_critic(self, ctx), ctx.real)


class R2Penalty(Regularizer):
    """R2: ``mean ||d critic / d x||^2`` on generated samples."""

    name = "r2"
    applies_to = "critic"

    def penalty(self, ctx):
        return F.r2_penalty(_critic(self, ctx), ctx.fake)
