"""TapeStep: one batch in, variables updated, a dict of scalar logs out. Pure TensorFlow."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from trainer.errors import UserError
from trainer.loop import SAMPLED, WEIGHT, batch_size, sampled
from trainer.metrics import DEFAULT_METRICS
from trainer.optim import GroupedOptimizer
from trainer.tape import check_unconnected, global_norm, gradients

log = logging.getLogger(__name__)


def default_loss(task: str):
    """Cross-entropy on logits for classification, mean squared error for regression."""
    if task == "classification":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return keras.losses.MeanSquaredError()


@dataclass
class StepContext:
    """What regularizers (and custom steps) see while the forward pass is recorded.

    Attributes:
        step: the TapeStep being run (its ``model``, ``compute_loss``, ...).
        x, y: the batch.
        y_pred, loss: the recorded forward pass.
        tape: the outer tape over the trainable variables; still recording.
        input_tape: a tape that watched ``x`` during the forward pass, when a
            regularizer asked for input gradients (``needs_input_tape``); it is
            persistent if the regularizers make more than one gradient call on it.
        iteration: the global step before this update (int64 tensor).
    """

    step: Any
    x: Any
    y: Any
    y_pred: Any
    loss: Any
    tape: tf.GradientTape
    iteration: Any
    input_tape: tf.GradientTape | None = None
    cache: dict = field(default_factory=dict)

    def input_gradient(self):
        """d loss / d x from the recorded forward pass (recorded on the outer tape)."""
        return self.input_tape.gradient(self.loss, self.x)


@dataclass
class Objective:
    """One objective of a multi-objective step: its loss, what it updates, and with what."""

    name: str
    loss: Any
    variables: list
    optimizer: Any


class TapeStep:
    """The default supervised step: forward on a ``tf.GradientTape``, loss, gradients, update.

    The tape watches ``self.trainable_variables`` (the model's, read each time the
    step is traced, so freezing and unfreezing are honoured). Subclasses override
    the smallest hook that does the job:

    - ``compute_loss(x, y, training)`` for a different objective;
    - ``compute_metrics(y, y_pred)`` for other metrics;
    - ``train_step(batch)`` / ``test_step(batch)`` for steps with several models
      or optimizers (a GAN), using ``apply(tape, loss, variables, optimizer)``.

    Args:
        model: a Keras model.
        optimizer: a Keras optimizer, or a ``GroupedOptimizer`` for per-group learning
            rates; a plain one is wrapped so that unfreezing can extend its state.
        task: ``"classification"`` or ``"regression"``; picks the default loss and metrics.
        loss: a callable ``loss(y_true, y_pred)``; defaults to the task's loss.
        regularizers: objects from ``trainer.regularizers`` added to the loss inside
            the tape; each logs ``reg/<name>``.
        unconnected_gradients: ``"none"`` (variables the loss does not reach are named
            once in a warning and left alone) or ``"zero"`` (they get zero gradients).
        reset: a ``trainer.tape.ResetPolicy``: when to discard the recorded tape.
    """

    def __init__(
        self,
        *,
        model,
        optimizer,
        task: str = "classification",
        loss=None,
        regularizers=(),
        unconnected_gradients: str = "none",
        reset=None,
    ):
        self.model = model
        if not isinstance(optimizer, GroupedOptimizer):
            optimizer = GroupedOptimizer(optimizer)
        self.optimizer = optimizer
        self.task = task
        self.loss_fn = loss if loss is not None else default_loss(task)
        self.metric_fns = dict(DEFAULT_METRICS.get(task, {}))
        self.regularizers = list(regularizers)
        for reg in self.regularizers:
            if getattr(reg, "applies_to", "supervised") != "supervised":
                raise UserError(f"regularizer {reg.name} penalises a GAN critic, not this step's "
                                "loss; use it with a GAN step (+experiment=gan)")
        self.unconnected = check_unconnected(unconnected_gradients)
        self.reset = reset
        self.iteration = None  # the trainer's global step, set by bind()
        self._warned_unconnected: set[str] = set()

    def bind(self, global_step) -> None:
        """Called by the trainer: the step reads the global step for lazy schedules."""
        self.iteration = global_step

    # --- state the trainer reads -------------------------------------------------------
    @property
    def trainable_variables(self) -> list:
        """Variables the tape differentiates, read fresh on every call."""
        return list(self.model.trainable_variables)

    @property
    def optimizers(self) -> dict:
        """Optimizers by name; the trainer builds them before tracing and checkpoints them."""
        return {"optimizer": self.optimizer}

    @property
    def models(self) -> dict:
        """Models by name, for checkpoints, saving and the variable table."""
        return {"model": self.model}

    def build(self) -> None:
        """Create optimizer slots for the current trainable variables, outside any tf.function."""
        self.optimizer.build(self.trainable_variables)

    def state_logs(self) -> dict:
        """Tensors read at the end of each execution and logged as they are (not averaged)."""
        return self.reset.state_logs() if self.reset is not None else {}

    def check_state(self, state: dict) -> None:
        """Host side, after each execution: raise if the step's state says the run must stop."""
        if self.reset is not None:
            self.reset.raise_if_failed(state)

    # --- hooks -----------------------------------------------------------------------
    def compute_loss(self, x, y, training: bool):
        """Return ``(loss, y_pred)`` for one batch. Runs inside the tape."""
        y_pred = self.model(x, training=training)
        return self.loss_fn(y, y_pred), y_pred

    def compute_metrics(self, y, y_pred) -> dict:
        """Scalar metrics of one batch. Runs outside the tape (or under stop_recording)."""
        return {name: fn(y, y_pred) for name, fn in self.metric_fns.items()}

    def gradients(self, tape, loss, variables):
        """Gradients of ``loss`` for ``variables`` under the unconnected-gradient policy.

        With ``"none"``, variables that get no gradient are named once in a warning;
        if none gets one the run stops with an error (both decided while tracing).
        """
        grads = gradients(tape, loss, variables, unconnected=self.unconnected)
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

    def record(self, x, y, tape, regularizers=None) -> tuple[Any, StepContext, dict]:
        """Record the forward pass and the regularizers on ``tape``.

        ``regularizers`` (default: all) are the ones computed; the others contribute
        nothing and log their last value. Returns ``(total_loss, context,
        penalty_logs)``; must be called inside ``tape``.
        """
        active = self.regularizers if regularizers is None else list(regularizers)
        # needs_input_tape is True or the number of gradient calls a penalty makes on the
        # input tape; more than one call in all needs a persistent tape.
        needs = sum(int(getattr(r, "needs_input_tape", False)) for r in active)
        iteration = self.iteration if self.iteration is not None else tf.constant(0, tf.int64)
        if needs:
            with tf.GradientTape(persistent=needs > 1, watch_accessed_variables=False) as itape:
                itape.watch(x)
                loss, y_pred = self.compute_loss(x, y, training=True)
        else:
            itape = None
            loss, y_pred = self.compute_loss(x, y, training=True)
        ctx = StepContext(step=self, x=x, y=y, y_pred=y_pred, loss=loss, tape=tape,
                          iteration=iteration, input_tape=itape)
        total, reg_logs = loss, {}
        for reg in self.regularizers:
            if any(reg is r for r in active):
                contribution, value = reg.contribute(ctx)
                total += contribution
            else:
                value = reg.last_value()
            reg_logs[f"reg/{reg.name}"] = value
        return total, ctx, reg_logs

    def train_step(self, batch) -> dict:
        """One update. Returns scalar logs: ``loss``, the metrics, ``reg/*``, and when
        ``trainer.loop.sampled()`` the global gradient norm (``SAMPLED: {"grad_norm": ...}``:
        computed once per execution, it costs a tenth of a small model's step without XLA).

        With a reset policy the update is skipped when the policy says so, and the
        step's logs get zero weight in the execution's averages (``__weight__``).
        """
        if self.regularizers and all(r.every > 1 for r in self.regularizers):
            # Every regularizer is lazy: steps where none is due take a plain update, so
            # they cost what a step without regularizers costs (differentiating through
            # a cond inside the tape would not be free).
            iteration = self.iteration if self.iteration is not None else tf.constant(0, tf.int64)
            due = tf.reduce_any([tf.equal(iteration % r.every, 0) for r in self.regularizers])
            return tf.cond(due, lambda: self._train_step(batch, None),
                           lambda: self._train_step(batch, ()))
        return self._train_step(batch, None)

    def _train_step(self, batch, regularizers) -> dict:
        x, y = batch
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            total, ctx, reg_logs = self.record(x, y, tape, regularizers)
            with tape.stop_recording():
                logs = {"loss": ctx.loss, **self.compute_metrics(y, ctx.y_pred), **reg_logs}
                bad = self.reset.check_loss(total) if self.reset is not None else None
            if bad is not None and tf.executing_eagerly() and bool(bad):
                tape.reset()  # the seed's literal reset: nothing recorded so far counts
        if self.reset is None:
            grads = self.apply(tape, total, variables, self.optimizer)
            if sampled():
                logs[SAMPLED] = {"grad_norm": global_norm(grads)}
            return logs
        return self._guarded_update(tape, total, variables, logs, bad, batch)

    def _guarded_update(self, tape, total, variables, logs, bad, batch):
        if tf.executing_eagerly() and bool(bad):
            grads = [None] * len(variables)  # the tape was reset: there is nothing to take
        else:
            grads = self.gradients(tape, total, variables)
            bad = tf.logical_or(bad, self.reset.check_gradients(grads))
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]

        def update():
            self.optimizer.apply_gradients(pairs)
            return tf.constant(True)

        if tf.executing_eagerly():
            if not bool(bad):
                update()
        else:
            tf.cond(bad, lambda: tf.constant(False), update)
        iteration = self.iteration if self.iteration is not None else tf.constant(0, tf.int64)
        self.reset.record(total, bad, iteration + 1)
        ok = tf.logical_not(bad)
        # A discarded step's values (often NaN) must not poison the execution's averages.
        logs = {k: tf.where(ok, tf.cast(v, tf.float32), 0.0) for k, v in logs.items()}
        if sampled():
            logs[SAMPLED] = {"grad_norm": tf.where(ok, global_norm([g for g, _ in pairs]), 0.0)}
        logs[WEIGHT] = tf.cast(ok, tf.float32) * batch_size(batch)
        return logs

    def test_step(self, batch) -> dict:
        """Loss and metrics of one validation batch, no update."""
        x, y = batch
        loss, y_pred = self.compute_loss(x, y, training=False)
        return {"loss": loss, **self.compute_metrics(y, y_pred)}

    def gradients_by_path(self, batch) -> dict:
        """Gradients of the training objective keyed by variable path (no update)."""
        x, y = batch
        sources = {v.path: v for v in self.trainable_variables}
        with tf.GradientTape() as tape:
            total, _, _ = self.record(x, y, tape)
        return gradients(tape, total, sources, unconnected="zero")
