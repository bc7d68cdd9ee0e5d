"""Higher-order gradient regularizers built from nested tapes.

Supervised penalties (added to a ``TapeStep``'s loss): ``InputGradientPenalty``,
``JacobianNorm``, ``HessianTrace``, ``ParameterGradientNorm``. Critic penalties
(added to a GAN critic's loss): ``GradientPenalty`` (WGAN-GP), ``R1Penalty``,
``R2Penalty``. Their functional cores live in ``trainer.regularizers.functional``.
"""

from trainer.regularizers.base import RandomRegularizer, Regularizer
from trainer.regularizers.critic import CriticContext, GradientPenalty, R1Penalty, R2Penalty
from trainer.regularizers.functional import gradient_penalty, r1_penalty, r2_penalty
from trainer.regularizers.supervised_penalties import (
    HessianTrace,
    InputGradientPenalty,
    JacobianNorm,
    ParameterGradientNorm,
)

__all__ = [
    "CriticContext",
    "GradientPenalty",
    "HessianTrace",
    "InputGradientPenalty",
    "JacobianNorm",
    "ParameterGradientNorm",
    "R1Penalty",
    "R2Penalty",
    "RandomRegularizer",
    "Regularizer",
    "gradient_penalty",
    "r1_penalty",
    "r2_penalty",
]
