"""The step contract: ``Step``, what the trainer and the driver use of a step. Pure TensorFlow."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import tensorflow as tf

from trainer.common.errors import UserError
from trainer.common.keys import float_logs
from trainer.distribute.replicas import in_replicas, share, summed_flat
from trainer.step.metrics import MetricSet
from trainer.step.optimizers import GroupedOptimizer
from trainer.step.tape import check_unconnected, global_norm, gradients

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInfo:
    """What the loop tells a step about the update it runs.

    Attributes:
        global_step: the global step before this update (an int64 tensor, or the
            trainer's variable, which the loop advances only after the step). Lazy
            schedules and stateless random draws read it, so they are the same
            eager, compiled and after a restart.
        sampled: whether this is its execution's sampled step (a Python bool,
            fixed when the step is traced). The loop runs the first step of each
            execution sampled and the others not; a step computes costly
            diagnostics (the default step's ``grad_norm``) only then and returns
            them under ``trainer.common.keys.SAMPLED``: they are logged as that step's
            values, not averaged.
        jit_gradients: compile the step's forward pass and gradients with XLA and
            apply the update outside it: what XLA can do under a ``tf.distribute``
            strategy, where a compiled update cannot reach the other replicas'
            variables. Set only when the compile plan chose it, which it does only for
            steps whose ``split_xla_blockers()`` is empty.
        health: on the sampled step of a run that watches its layers' health, a
            ``trainer.step.layer_health.LayerHealth`` for the model of ``Step.health_model()``;
            the step adds its ``logs(...)`` to its ``SAMPLED`` logs. None otherwise.
    """

    global_step: Any
    sampled: bool = True
    jit_gradients: bool = False
    health: Any = None

    @staticmethod
    def at(global_step: int = 0, sampled: bool = True) -> StepInfo:
        """A ``StepInfo`` for calling a step by hand (tests, notebooks)."""
        return StepInfo(global_step=tf.constant(global_step, tf.int64), sampled=sampled)


@dataclass
class Objective:
    """One objective of a multi-objective step: its loss, what it updates, and with what."""

    name: str
    loss: Any
    variables: list
    optimizer: Any


class Step:
    """Everything the trainer and the driver use of a step, with defaults.

    A step turns one batch into updated variables and a dict of scalar logs.
    Subclasses implement ``train_step(batch, info)`` (and usually ``test_step``);
    every other member has a working default. The trainer builds the optimizers'
    state before tracing, gathers ``models``, ``optimizers`` and ``state()`` into
    its checkpoint, and calls nothing else.

    Args:
        models: the step's Keras models by name (``{"model": ...}``; a GAN has two).
        optimizers: Keras optimizers by name; each is wrapped in a
            ``GroupedOptimizer`` (unless it is one), so that unfreezing can
            extend its state outside any traced function.
        regularizers: objects from ``trainer.regularizers`` the step adds to its
            loss; their state is checkpointed and an XLA failure names them.
        unconnected_gradients: ``"none"`` (variables the loss does not reach are
            named once in a warning and left alone) or ``"zero"`` (zero gradients).
    """

    #: Whether ``train_step`` and ``test_step`` take batches ``(x, y, sample_weight)`` of
    #: weighted data (``Data.weighted``) and weigh their loss and metrics by them.
    takes_sample_weight = False

    def __init__(self, *, models: dict, optimizers: dict, regularizers=(),
                 unconnected_gradients: str = "none"):
        if not models:
            raise UserError(f"{type(self).__name__} has no models; pass models={{name: model}}")
        self._models = dict(models)
        self._optimizers = {k: o if isinstance(o, GroupedOptimizer) else GroupedOptimizer(o)
                            for k, o in optimizers.items()}
        self.regularizers = list(regularizers)
        self.unconnected = check_unconnected(unconnected_gradients)
        #: The ``trainer.step.optimizers.LossScale`` of mixed float16 (``use_loss_scale``), or None.
        self.loss_scale = None
        #: Keras metrics by split (``"train"``, ``"val"``), kept over an epoch; a step that
        #: reports such metrics sets them (``TapeStep`` does) and updates them in its steps.
        self.metric_sets: dict[str, MetricSet] = {}
        self._warned_unconnected: set[str] = set()

    def use_loss_scale(self, loss_scale) -> None:
        """Scale every gradient by ``loss_scale`` (a ``trainer.step.optimizers.LossScale``, shared
        by all the step's optimizers, which unscale and skip overflowing updates).

        The driver calls this for ``precision=mixed_float16``; create it in the
        strategy's scope.
        """
        self.loss_scale = loss_scale
        for opt in self._optimizers.values():
            opt.loss_scale = loss_scale

    # --- what the trainer reads ----------------------------------------------------------
    @property
    def models(self) -> dict:
        """Models by name: checkpointed, saved as ``<name>.keras``, shown in the variable table."""
        return dict(self._models)

    @property
    def optimizers(self) -> dict:
        """Optimizers by name: built before tracing, checkpointed, their learning rates logged."""
        return dict(self._optimizers)

    @property
    def trainable_variables(self) -> list:
        """Variables the step updates, read fresh on every call (freezing is honoured).

        The trainer recompiles the step when this set changes.
        """
        return [v for m in self._models.values() for v in m.trainable_variables]

    def build(self) -> None:
        """Create optimizer state for the current trainable variables, outside any tf.function.

        Default: one optimizer builds for all trainable variables; several
        optimizers named like the models build each for its model's variables.
        Other layouts override this.
        """
        opts = self._optimizers
        if len(opts) == 1:
            next(iter(opts.values())).build(self.trainable_variables)
        elif set(opts) <= set(self._models):
            for name, opt in opts.items():
                opt.build(self._models[name].trainable_variables)
        else:
            raise UserError(f"{type(self).__name__}: optimizers {sorted(opts)} are not named "
                            f"after the models {sorted(self._models)}; override build()")

    def train_step(self, batch, info: StepInfo | None = None) -> dict:
        """One update from ``batch``; returns scalar logs (``{"loss": ...}``).

        The loop always passes ``info``; called by hand without it, a step runs as
        the sampled step at global step 0 (``StepInfo.at()``).

        May also return ``trainer.common.keys.WEIGHT`` (the weight of these logs in the
        execution's averages; default the batch size) and ``trainer.common.keys.SAMPLED``
        (a dict of logs computed only when ``info.sampled``).
        """
        raise NotImplementedError(f"{type(self).__name__} must define train_step(batch, info)")

    def test_step(self, batch) -> dict:
        """Scalar logs of one validation batch, no update. Default: no validation logs."""
        return {}

    def run_step(self, next_batch, train_step) -> dict:
        """Pull the batch(es) of one update with ``next_batch()`` and run ``train_step`` on them.

        ``train_step(batch)`` is this step's ``train_step`` as the loop compiled
        it (its ``info`` bound). The default runs one batch; a step that may
        replace a discarded batch by the next one (the reset policy's retry)
        overrides this. Returns float32 logs with ``WEIGHT`` set.
        """
        batch = next_batch()
        return float_logs(train_step(batch), batch)

    def inference_loss(self, batch):
        """The loss of ``batch`` as the training objective computes it, in inference mode
        (``training=False``: no dropout), without regularizers, updates or metric updates:
        what sharpness is measured on (``trainer.callbacks.SharpnessCallback``).

        Default: none; a step whose loss has a Hessian worth measuring overrides this.
        """
        raise UserError(f"{type(self).__name__} defines no inference_loss(batch), which "
                        "callbacks.sharpness measures; remove callbacks.sharpness or define it")

    def health_model(self):
        """The model whose per-layer health this step reports (``StepInfo.health``), or
        None (the default: a step reports none, and the health callback says so once)."""
        return None

    def gradients_by_path(self, batch, info: StepInfo | None = None) -> dict:
        """Gradients of the training objective by variable path, no update (for histograms).

        Default: none (the TensorBoard callback then writes weight histograms only).
        """
        return {}

    def state(self) -> dict:
        """Trackable state beyond models and optimizers that a restart needs (by name).

        Default: the regularizers' state. Subclasses add theirs to it.
        """
        state = {"regularizers": {r.name: r.state() for r in self.regularizers}}
        if self.loss_scale is not None:
            state["loss_scale"] = self.loss_scale.state()
        train_metrics = self.metric_sets.get("train")
        if train_metrics:
            # An epoch's metrics so far: a run resumed mid-epoch ends with the same values.
            state["metrics"] = train_metrics.variables
        return state

    def build_metrics(self, num_outputs: int) -> None:
        """Create the variables of metrics that make them on their first update (Keras'
        ``F1Score``) for a model with ``num_outputs`` outputs: the trainer calls this in
        the strategy's scope before its checkpoint lists the step's state and before any
        tracing, so every replica has them and a restart restores them."""
        for metrics in self.metric_sets.values():
            metrics.build(num_outputs)

    def metric_results(self, split: str = "train") -> dict:
        """The Keras metrics of ``split`` over the examples since their last reset, by
        name; read by the trainer at the end of each execution (outside the replicas)."""
        metrics = self.metric_sets.get(split)
        return metrics.results() if metrics is not None else {}

    def reset_metrics(self, split: str = "train") -> None:
        """Zero the Keras metrics of ``split``: the trainer calls it when an epoch opens
        (``"train"``) and before each evaluation (``"val"``)."""
        metrics = self.metric_sets.get(split)
        if metrics is not None:
            metrics.reset()

    def state_logs(self) -> dict:
        """Tensors read at the end of each execution and logged as they are (not averaged)."""
        return {}

    def check_state(self, state: dict) -> None:
        """Host side, after each execution, with ``state_logs()``'s values: raise to stop."""

    def after_rollback(self) -> None:
        """After the trainer rolled the training state back (``trainer.recovery``): clear
        host-visible alarms that are not part of the state (a failed reset streak)."""

    def final_metrics(self, data) -> dict:
        """Results measured once after training, added to ``metrics.json``. Default: none."""
        return {}

    def split_xla_blockers(self) -> list[str]:
        """Why this step cannot compile its forward pass and gradients with XLA apart from
        its update (``StepInfo.jit_gradients``, what XLA can do under a strategy); empty
        when it can. The compile plan reads it (``trainer.compile.plan``). Default: a
        step that does not split its update."""
        return [f"the step {type(self).__name__} does not split its gradients from its "
                "update (TapeStep does)"]

    # --- helpers for train steps ---------------------------------------------------------
    def gradient_scale(self):
        """What ``gradients`` multiplies gradients by: under a strategy, this replica's
        share of the global batch (``trainer.distribute.strategies.share``), so the optimizer's
        sum over replicas is the one-device gradient; 1.0 on one device. Times the
        loss scale with ``use_loss_scale`` (mixed float16): the optimizers divide
        it back out."""
        if self.loss_scale is None:
            return share()
        return share() * self.loss_scale.value

    def gradients(self, tape, loss, variables):
        """Gradients of ``loss`` for ``variables`` under the unconnected-gradient policy.

        ``loss`` is computed as on one device (a mean over the batch the step sees);
        the gradients come scaled by ``gradient_scale()``.

        With ``"none"``, variables that get no gradient are named once in a warning;
        if none gets one the run stops with an error (both decided while tracing).
        """
        grads = gradients(tape, loss, variables, unconnected=self.unconnected,
                          scale=self.gradient_scale())
        missing = [v.path for g, v in zip(grads, variables) if g is None]
        if missing and len(missing) == len(variables):
            raise UserError(
                "the loss reaches none of the trainable variables; check compute_loss and "
                "freeze.patterns"
            )
        new = sorted(set(missing) - self._warned_unconnected)
        if new:
            self._warned_unconnected.update(new)
            log.warning("no gradient reaches %s; left unchanged (tape.unconnected_gradients"
                        "=zero gives them zeros)", ", ".join(new))
        return grads

    def grad_norm(self, grads, *, loss_scaled: bool = True):
        """The global norm of ``grads`` (``None`` skipped) as one device would report it:
        under a strategy, of the replicas' summed gradients; with a loss scale (mixed
        float16), of the gradients it is divided out of (``loss_scaled``: ``grads`` come
        from ``gradients``, multiplied by it; the accumulated sums are not)."""
        grads = [g for g in grads if g is not None]
        norm = tf.norm(summed_flat(grads)) if in_replicas() else global_norm(grads)
        if loss_scaled and self.loss_scale is not None:
            norm = norm / tf.cast(self.loss_scale.applied(), norm.dtype)
        return norm

    def apply(self, tape, loss, variables, optimizer):
        """Differentiate ``loss`` on ``tape`` and apply the gradients; return them."""
        grads = self.gradients(tape, loss, variables)
        optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
        return grads

    def apply_objectives(self, tape, objectives, transform=None) -> dict:
        """Take each objective's gradients from one persistent ``tape``, then apply them.

        The forward pass is recorded once; every gradient is taken before any
        update (so all see the same weights). ``transform(grads_by_name)`` may edit
        the gradients in between (gradient surgery such as PCGrad). Returns the
        gradients by objective name. The caller drops the tape afterwards
        (``del tape``) to release its resources.
        """
        grads = {o.name: self.gradients(tape, o.loss, o.variables) for o in objectives}
        if transform is not None:
            grads = transform(grads)
        # One apply per optimizer: a variable shared by several objectives gets the sum of
        # their gradients in one update (not one optimizer step per objective).
        updates: dict[int, tuple] = {}
        for o in objectives:
            opt, summed = updates.setdefault(id(o.optimizer), (o.optimizer, {}))
            for g, v in zip(grads[o.name], o.variables):
                if g is not None:
                    prev = summed.get(id(v), (None, v))[0]
                    summed[id(v)] = (g if prev is None else prev + g, v)
        # In a graph, program order does not order the gradient ops (stateless) before the
        # updates: without this, a gradient that reads a variable another objective updates
        # could run after that update (seen as a flaky wrong gradient).
        taken = [g for gs in grads.values() for g in tf.nest.flatten(gs) if g is not None]
        with tf.control_dependencies(taken):  # a no-op eagerly, where order is program order
            for opt, summed in updates.values():
                opt.apply_gradients(list(summed.values()))
        return grads
