"""TapeStep: one batch in, variables updated, a dict of scalar logs out. Pure TensorFlow."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from trainer.metrics import DEFAULT_METRICS
from trainer.tape import check_unconnected, gradients


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
            persistent if more than one did.
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
        optimizer: a Keras optimizer (built here before any tracing).
        task: ``"classification"`` or ``"regression"``; picks the default loss and metrics.
        loss: a callable ``loss(y_true, y_pred)``; defaults to the task's loss.
        regularizers: objects from ``trainer.regularizers`` added to the loss inside
            the tape; each logs ``reg/<name>``.
        unconnected_gradients: ``"none"`` or ``"zero"`` (see ``trainer.tape.gradients``).
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
    ):
        self.model = model
        self.optimizer = optimizer
        self.task = task
        self.loss_fn = loss if loss is not None else default_loss(task)
        self.metric_fns = dict(DEFAULT_METRICS.get(task, {}))
        self.regularizers = list(regularizers)
        self.unconnected = check_unconnected(unconnected_gradients)
        self.iteration = None  # the trainer's global step, set by bind()

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

    # --- hooks -----------------------------------------------------------------------
    def compute_loss(self, x, y, training: bool):
        """Return ``(loss, y_pred)`` for one batch. Runs inside the tape."""
        y_pred = self.model(x, training=training)
        return self.loss_fn(y, y_pred), y_pred

    def compute_metrics(self, y, y_pred) -> dict:
        """Scalar metrics of one batch. Runs outside the tape (or under stop_recording)."""
        return {name: fn(y, y_pred) for name, fn in self.metric_fns.items()}

    def apply(self, tape, loss, variables, optimizer):
        """Differentiate ``loss`` on ``tape`` and apply the gradients; return them."""
        grads = gradients(tape, loss, variables, unconnected=self.unconnected)
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        optimizer.apply_gradients(pairs)
        return grads

    def record(self, x, y, tape) -> tuple[Any, StepContext, dict]:
        """Record the forward pass and the regularizers on ``tape``.

        Returns ``(total_loss, context, penalty_logs)``; must be called inside ``tape``.
        """
        needs = sum(bool(getattr(r, "needs_input_tape", False)) for r in self.regularizers)
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
            contribution, value = reg.contribute(ctx)
            total += contribution
            reg_logs[f"reg/{reg.name}"] = value
        return total, ctx, reg_logs

    def train_step(self, batch) -> dict:
        """One update. Returns scalar logs: ``loss``, the metrics, ``grad_norm``, ``reg/*``."""
        x, y = batch
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            total, ctx, reg_logs = self.record(x, y, tape)
            with tape.stop_recording():
                logs = {"loss": ctx.loss, **self.compute_metrics(y, ctx.y_pred), **reg_logs}
        grads = self.apply(tape, total, variables, self.optimizer)
        logs["grad_norm"] = tf.linalg.global_norm([g for g in grads if g is not None])
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
