"""Penalties on a supervised step's loss: input gradient, Jacobian, Hessian trace, gradient norm."""

from __future__ import annotations

import tensorflow as tf

from trainer.common.errors import UserError
from trainer.regularizers import functional as F
from trainer.regularizers.base import RandomRegularizer, Regularizer


def _input_tape(reg, ctx):
    if getattr(ctx, "input_tape", None) is None:
        raise UserError(
            f"regularizer {reg.name} needs a step that records its forward pass on an input "
            "tape (TapeStep and its compute_loss subclasses do); remove it from this experiment"
        )
    return ctx.input_tape


def _sample_loss(ctx):
    """A closure recomputing the loss of ``ctx``'s batch, for penalties that need a nested tape
    around the forward pass itself."""
    return lambda: ctx.step.compute_loss(ctx.x, ctx.y, training=True)[0]


class InputGradientPenalty(Regularizer):
    """Double backpropagation (Drucker and LeCun 1992): ``mean_i ||d loss_i / d x_i||^2``.

    Uses the input tape of the recorded forward pass: one extra backward pass to
    get the input gradient, and the update differentiates through it.
    """

    name = "input_gradient"
    needs_input_tape = True

    def penalty(self, ctx):
        _input_tape(self, ctx)
        return F.input_gradient_penalty(ctx.input_gradient())


class JacobianNorm(RandomRegularizer):
    """Squared Frobenius norm of the input-output Jacobian by random projections.

    Hoffman, Roberts and Yaida (2019): ``mean_i ||d f(x_i) / d x_i||_F^2`` estimated
    from ``n_projections`` random unit vectors in the output space, each one
    backward pass through the recorded forward pass (no extra forward pass).

    Args:
        n_projections: projections per step; the estimate is unbiased for any
            number, and exact for a model with one output.
    """

    name = "jacobian_norm"

    def __init__(self, *, n_projections: int = 1, **kwargs):
        if n_projections < 1:
            raise UserError(f"regularizer jacobian_norm: n_projections={n_projections} must be "
                            ">= 1")
        super().__init__(**kwargs)
        self.n_projections = int(n_projections)
        # One gradient call on the input tape per projection (record() makes it persistent).
        self.needs_input_tape = self.n_projections

    def penalty(self, ctx):
        tape = _input_tape(self, ctx)
        return F.jacobian_norm(tape, ctx.y_pred, ctx.x, seed=self.draw_seed(ctx),
                               n_projections=self.n_projections)


class HessianTrace(RandomRegularizer):
    """Trace of the loss Hessian by Hutchinson's estimator with Rademacher probes.

    With ``wrt="inputs"`` it is the mean over examples of ``tr(d^2 loss_i / d x_i^2)``
    (a curvature penalty on the input space); with ``wrt="parameters"`` it is
    ``tr(d^2 loss / d theta^2)`` of the batch loss (a flatness penalty). The loss is
    recomputed under two nested tapes (the inner gives the gradient, the outer
    differentiates ``gradient . probe``), so each step costs one more forward pass
    and two more backward passes per probe, and the update differentiates all of it.

    Args:
        wrt: ``"inputs"`` or ``"parameters"``.
        n_probes: Rademacher probes per step (exact for a diagonal Hessian with one).
    """

    name = "hessian_trace"

    def __init__(self, *, wrt: str = "inputs", n_probes: int = 1, **kwargs):
        if wrt not in ("inputs", "parameters"):
            raise UserError(f"regularizer hessian_trace: wrt={wrt!r} must be 'inputs' or "
                            "'parameters'")
        if n_probes < 1:
            raise UserError(f"regularizer hessian_trace: n_probes={n_probes} must be >= 1")
        super().__init__(**kwargs)
        self.wrt = wrt
        self.n_probes = int(n_probes)

    def penalty(self, ctx):
        seed = self.draw_seed(ctx)
        if self.wrt == "parameters":
            return F.hessian_trace(_sample_loss(ctx), ctx.step.trainable_variables, seed=seed,
                                   n_probes=self.n_probes)
        x = tf.convert_to_tensor(ctx.x)

        def loss_fn():
            return ctx.step.compute_loss(x, ctx.y, training=True)[0]

        # The batch loss is the mean of the examples' losses, so its Hessian in x is block
        # diagonal with blocks H_i / B: its trace is already the mean of tr(H_i).
        return F.hessian_trace(loss_fn, [x], seed=seed, n_probes=self.n_probes)


class ParameterGradientNorm(Regularizer):
    """Gradient-norm penalty on the parameters: ``||d loss / d theta||^2``.

    Penalising the gradient norm steers training toward flat regions (Barrett and
    Dherin 2021, implicit gradient regularization made explicit). The loss is
    recomputed on a nested tape over the trainable variables, and the update
    differentiates that gradient: one more forward and two more backward passes.
    """

    name = "param_grad_norm"
    synchronizes = True  # of the global batch's gradient under a strategy

    def penalty(self, ctx):
        return F.parameter_gradient_norm(_sample_loss(ctx), ctx.step.trainable_variables)
