"""Sharpness-aware minimization (SAM, Foret et al. 2021) and adaptive SAM (ASAM, Kwon et
al. 2021) as a step: ``step=sam``. Pure TensorFlow and Keras 3.

Each update takes two gradients of the same batch. The first, at the weights ``w``, gives
the ascent ``eps``; the second is taken at ``w + eps`` and applied to ``w`` by the step's
optimizer (its parameter groups, loss scale and accumulation as usual).

The perturbed pass does not write the weights: the model is run in a
``keras.StatelessScope`` that maps each trainable variable to the tensor ``w + eps`` and
differentiates with respect to those tensors. So the weights are never changed and
restored (they stay bit for bit ``w``), every replica of a strategy can perturb its own
way (``perturbation=replica``) although the variables are mirrored, and the step compiles
with XLA like any other. The same scope maps the models' random seed generators to their
values before the first pass: dropout draws the same masks in both passes. Anything the
perturbed pass would write to the models (batch-norm moving statistics, the seed
generators' advance) is discarded; the first pass's writes stand, as in a plain step.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from trainer.common.errors import UserError
from trainer.common.keys import SAMPLED
from trainer.distribute.replicas import (
    in_replicas,
    summed_flat,
    unflat,
)
from trainer.step.tape import gradients
from trainer.step.tape_step import TapeStep, unpack

PERTURBATIONS = ("global", "replica")


class SharpnessAware:
    """Turns a supervised ``TapeStep`` (or a subclass) into its SAM or ASAM version.

    Put it first among the bases: ``class MySam(SharpnessAware, MyStep)``; ``SamStep`` is
    ``TapeStep`` with it. The wrapped step's ``compute_loss`` and regularizers define the
    objective of both passes.

    Args:
        rho: the radius of the ascent (``step.rho``), > 0.
        adaptive: ASAM (``step.adaptive``): the ascent is ``rho * T^2 g / ||T g||`` with
            ``T = |w| + eta`` elementwise, for every trainable variable (biases too),
            instead of SAM's ``rho * g / ||g||``.
        eta: ASAM's offset in ``T`` (``step.eta``), >= 0: a weight at zero is still
            perturbed. Unused by SAM.
        perturbation: under a ``tf.distribute`` strategy, ``"global"`` ascends along the
            all-reduced gradient (every replica perturbs alike: the one-device update) or
            ``"replica"`` along each replica's own gradient (m-sharpness with m the
            replica's batch; no extra all-reduce). Either is the same on one device.
        **kwargs: the wrapped step's arguments.
    """

    def __init__(self, *args, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01,
                 perturbation: str = "global", **kwargs):
        super().__init__(*args, **kwargs)
        if not rho > 0:
            raise UserError(f"step.rho={rho} must be > 0 (SAM's ascent radius, e.g. 0.05; "
                            "ASAM's is larger, e.g. 0.5)")
        if not eta >= 0:
            raise UserError(f"step.eta={eta} must be >= 0 (ASAM's offset of |w|, e.g. 0.01)")
        if perturbation not in PERTURBATIONS:
            raise UserError(f"step.perturbation={perturbation!r} must be one of "
                            f"{', '.join(PERTURBATIONS)}")
        self.rho, self.adaptive, self.eta = float(rho), bool(adaptive), float(eta)
        self.perturbation = perturbation

    def split_xla_blockers(self) -> list[str]:
        return [*super().split_xla_blockers(),
                f"the step {type(self).__name__} takes two gradients (SAM) with an "
                "all-reduce between them"]

    # --- the ascent ------------------------------------------------------------------------
    def epsilon(self, grads, variables) -> list:
        """The ascent for each variable (None where ``grads`` has None).

        ``grads`` may carry any positive factor (a replica's share of the batch, a loss
        scale): the ascent depends on their direction only. With ``perturbation=global``
        under a strategy, the direction is the replicas' summed gradient, the one-device one.
        """
        present = [(tf.convert_to_tensor(g), v) for g, v in zip(grads, variables)
                   if g is not None]
        dtype = tf.float64 if any(v.dtype == tf.float64 for _, v in present) else tf.float32
        gs = [tf.cast(g, dtype) for g, _ in present]
        if self.perturbation == "global" and in_replicas():
            gs = unflat(summed_flat(gs, dtype), gs)
        if self.adaptive:
            ts = [tf.abs(tf.cast(v, dtype)) + self.eta for _, v in present]
            scaled = [t * g for t, g in zip(ts, gs)]
            directions = [t * s for t, s in zip(ts, scaled)]
        else:
            scaled = directions = gs
        norm = tf.sqrt(tf.add_n([tf.reduce_sum(tf.square(s)) for s in scaled]))
        factor = tf.math.divide_no_nan(tf.constant(self.rho, dtype), norm)
        eps = iter(tf.cast(factor * d, v.dtype) for d, (_, v) in zip(directions, present))
        return [None if g is None else next(eps) for g in grads]

    def perturbed_gradients(self, x, y, w, info, regularizers, variables, eps, seeds):
        """``(total loss, context, gradients)`` of the objective at ``w + eps`` on the same
        batch, with the seed generators at ``seeds`` (their values before the first pass);
        gradients scaled as ``Step.gradients`` scales them, None where ``eps`` is None."""
        perturbed = [tf.stop_gradient(tf.convert_to_tensor(v) if e is None
                                      else tf.convert_to_tensor(v) + e)
                     for v, e in zip(variables, eps)]
        # A variable's value in the scope is its tensor here, for the model and for
        # penalties that differentiate by the parameters (they watch ``variable.value``).
        with keras.StatelessScope(state_mapping=[*zip(variables, perturbed), *seeds]):
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(perturbed)
                total, ctx, _ = self.record(x, y, tape, info, regularizers, w)
            grads = gradients(tape, total, perturbed, unconnected=self.unconnected,
                              scale=self.gradient_scale())
        return total, ctx, [None if e is None else g for g, e in zip(grads, eps)]

    def _seed_states(self) -> list:
        """``(seed generator state, its value now)`` of every model's layers."""
        return [(sg.state, tf.identity(sg.state.value))
                for m in self._models.values() for layer in m._flatten_layers()
                for sg in getattr(layer, "_seed_generators", ())]

    # --- the update ------------------------------------------------------------------------
    def _train_step(self, batch, info, regularizers) -> dict:
        x, y, w = unpack(batch)
        variables = self.trainable_variables
        seeds = self._seed_states()  # read before the first pass advances them
        tape, total, ctx, logs, bad = self.forward(x, y, w, info, regularizers)
        grads = self.gradients(tape, total, variables)
        del tape
        eps = self.epsilon(grads, variables)
        _, ctx2, sam_grads = self.perturbed_gradients(x, y, w, info, regularizers, variables,
                                                      eps, seeds)
        # L(w + eps) - L(w) of the data loss: the sharpness SAM minimizes, per batch.
        logs["sam/sharpness"] = tf.cast(ctx2.loss, tf.float32) - tf.cast(ctx.loss, tf.float32)
        if self.reset is not None:
            return self._guarded_update(None, total, variables, logs, bad, batch, info,
                                        grads=sam_grads, y_pred=ctx.y_pred)
        before = self._health_before(info, variables)  # at w again, after the probe at w+eps
        self.optimizer.apply_gradients(
            [(g, v) for g, v in zip(sam_grads, variables) if g is not None])
        self.update_metrics("train", y, ctx.y_pred, w)
        if info.sampled:
            logs[SAMPLED] = {"grad_norm": self.grad_norm(sam_grads),
                             **self._health_logs(info, sam_grads, variables, before)}
        return logs


class SamStep(SharpnessAware, TapeStep):
    """The default supervised step with SAM or ASAM updates (``step=sam``).

    Takes ``SharpnessAware``'s ``rho``, ``adaptive``, ``eta`` and ``perturbation`` and
    ``TapeStep``'s arguments. Logs what ``TapeStep`` logs (the loss and metrics at ``w``;
    ``grad_norm``, sampled, of the applied gradient, the one at ``w + eps``) and
    ``sam/sharpness``, ``L(w + eps) - L(w)`` of the batch.
    """
