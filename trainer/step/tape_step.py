"""TapeStep: the default supervised step, built on the ``Step`` contract. Pure TensorFlow."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from trainer.common.errors import UserError
from trainer.common.keys import SAMPLED, WEIGHT, batch_size
from trainer.distribute.replicas import any_replica, batch_mean, global_mean, in_replicas
from trainer.step.base import Step, StepInfo
from trainer.step.metrics import STATELESS_DEFAULTS, MetricSet, default_metrics
from trainer.step.tape import gradients


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
        sample_weight: the batch's per-example weights, or None (unweighted data).
    """

    step: Any
    x: Any
    y: Any
    y_pred: Any
    loss: Any
    tape: tf.GradientTape
    iteration: Any
    input_tape: tf.GradientTape | None = None
    sample_weight: Any = None
    cache: dict = field(default_factory=dict)

    def input_gradient(self):
        """d loss / d x from the recorded forward pass (recorded on the outer tape)."""
        return self.input_tape.gradient(self.loss, self.x)


class TapeStep(Step):
    """The default supervised step: forward on a ``tf.GradientTape``, loss, gradients, update.

    The tape watches ``self.trainable_variables`` (the model's, read each time the
    step is traced, so freezing and unfreezing are honoured). Subclasses override
    the smallest hook that does the job:

    - ``compute_loss(x, y, training)`` for a different objective (accepting
      ``sample_weight=None`` too, for weighted data);
    - ``compute_metrics(y, y_pred)`` for stateless per-batch metrics (averaged over
      the execution), besides the Keras ``metrics``;
    - ``train_step(batch, info)`` / ``test_step(batch)`` for another update, using
      ``apply(tape, loss, variables, optimizer)`` (or subclass ``Step`` directly
      for steps with several models, such as a GAN).

    Args:
        model: a Keras model.
        optimizer: a Keras optimizer, or a ``GroupedOptimizer`` for per-group learning
            rates; a plain one is wrapped so that unfreezing can extend its state.
        task: ``"classification"`` or ``"regression"``; picks the default loss and metrics.
        loss: a callable ``loss(y_true, y_pred)``; defaults to the task's loss.
        regularizers: supervised regularizers from ``trainer.regularizers``, added to
            the loss inside the tape; each logs ``reg/<name>``.
        unconnected_gradients: see ``Step``.
        reset: a ``trainer.step.tape.ResetPolicy``: when to discard the recorded tape.
        metrics: ``keras.metrics.Metric`` objects besides the task's own (``accuracy``
            or ``mae``; one of the same name replaces it), kept over each epoch for
            training and, in copies, for validation (``trainer.step.metrics.MetricSet``).
            The task's own is a stateless per-batch log on unweighted batches (exact
            over the epoch: it decomposes) and a weighted Keras metric on weighted ones.

    Batches are ``(x, y)`` or, for weighted data, ``(x, y, sample_weight)``: the
    weights enter the loss (``sum(w * loss) / batch size``, Keras' reduction) and
    the Keras metrics.
    """

    takes_sample_weight = True

    def __init__(self, *, model, optimizer, task: str = "classification", loss=None,
                 regularizers=(), unconnected_gradients: str = "none", reset=None,
                 metrics=()):
        for reg in regularizers:
            if reg.applies_to != "supervised":
                raise UserError(f"regularizer {reg.name} penalises a GAN critic, not this step's "
                                "loss; use it with a GAN step (+experiment=gan)")
        super().__init__(models={"model": model}, optimizers={"optimizer": optimizer},
                         regularizers=regularizers, unconnected_gradients=unconnected_gradients)
        self.model = model
        self.optimizer = self._optimizers["optimizer"]
        self.task = task
        # A plain mean over the batch the step sees: under a strategy, gradients are
        # scaled by the replica's share instead (see trainer.distribute.strategies).
        self.loss_fn = batch_mean(loss if loss is not None else default_loss(task))
        #: Stateless per-batch metrics by name (``compute_metrics``); none by default.
        user = MetricSet(metrics, task=task).metrics
        taken = {m.name for m in user}
        # The task's own metric (accuracy, mae) decomposes over batches: on unweighted data it
        # is a stateless per-batch log, whose example-weighted mean over the epoch is exact
        # and costs no state update per step (a few percent of a small model's step without
        # XLA). Weighted batches update its Keras form instead, weighted over the epoch.
        self.metric_fns = {k: f for k, f in STATELESS_DEFAULTS.get(task, {}).items()
                           if k not in taken}
        self._weighted_only = set(self.metric_fns)
        chosen = [m for m in default_metrics(task) if m.name not in taken] + user
        train = MetricSet(chosen, task=task)
        self.metric_sets = {"train": train, "val": train.clone()}
        self.reset = reset
        self._jit_cache: dict = {}  # XLA-compiled forward and gradients (jit_gradients)

    # --- state ---------------------------------------------------------------------------
    def state(self) -> dict:
        """The regularizers' state and the reset policy's statistics."""
        state = super().state()
        if self.reset is not None:
            state["reset"] = self.reset.state()
        return state

    def state_logs(self) -> dict:
        """``tape/resets`` and ``tape/failed_at_step`` with a reset policy."""
        return self.reset.state_logs() if self.reset is not None else {}

    def check_state(self, state: dict) -> None:
        """Stop the run after ``max_consecutive`` resets in a row."""
        if self.reset is not None:
            self.reset.raise_if_failed(state)

    def after_rollback(self) -> None:
        """Arm the reset policy again: its streak came back with the rolled-back state."""
        if self.reset is not None:
            self.reset.rearm()

    # --- hooks -----------------------------------------------------------------------------
    def compute_loss(self, x, y, training: bool, sample_weight=None):
        """Return ``(loss, y_pred)`` for one batch. Runs inside the tape.

        ``sample_weight`` (weighted data) weighs each example's loss; the mean is
        still over the batch's examples, as Keras' default reduction.

        Under a mixed-precision policy the model computes in float16 or bfloat16;
        its outputs are cast to float32 here, so the loss, the metrics and the
        regularizers are computed in float32.
        """
        y_pred = as_float32(self.model(x, training=training))
        if sample_weight is None:
            return self.loss_fn(y, y_pred), y_pred
        return self.loss_fn(y, y_pred, sample_weight=sample_weight), y_pred

    def compute_metrics(self, y, y_pred) -> dict:
        """Stateless scalar metrics of one batch (``metric_fns``), averaged over each
        execution by the loop. Runs outside the tape (under stop_recording)."""
        return {name: fn(y, y_pred) for name, fn in self.metric_fns.items()}

    def _batch_metrics(self, y, y_pred, sample_weight) -> dict:
        """``compute_metrics``, less the task's own metric on weighted batches (its Keras
        form, weighted, is updated instead)."""
        logs = self.compute_metrics(y, y_pred)
        if sample_weight is None:
            return logs
        return {k: v for k, v in logs.items() if k not in self._weighted_only}

    def update_metrics(self, split: str, y, y_pred, sample_weight=None) -> None:
        """Add a batch to the Keras metrics of ``split`` (``"train"`` or ``"val"``)."""
        skip = self._weighted_only if sample_weight is None else ()
        self.metric_sets[split].update(y, y_pred, sample_weight, skip=skip)

    def _forward(self, x, y, training: bool, sample_weight):
        """``compute_loss``, given the weights only when there are some (subclasses
        written for unweighted data need not take them)."""
        if sample_weight is None:
            return self.compute_loss(x, y, training=training)
        try:
            return self.compute_loss(x, y, training=training, sample_weight=sample_weight)
        except TypeError as e:
            if "sample_weight" not in str(e):
                raise
            raise UserError(f"{type(self).__name__}: compute_loss or its loss takes no "
                            f"sample_weight ({e}), but the data is weighted (data.class_weight or "
                            "per-example weights); accept sample_weight=None, or drop the "
                            "weights") from None

    def record(self, x, y, tape, info: StepInfo | None = None,
               regularizers=None, sample_weight=None) -> tuple[Any, StepContext, dict]:
        """Record the forward pass and the regularizers on ``tape``.

        ``regularizers`` (default: all) are the ones computed; the others contribute
        nothing and log their last value. Returns ``(total_loss, context,
        penalty_logs)``; must be called inside ``tape``.
        """
        info = info or StepInfo.at()
        active = self.regularizers if regularizers is None else list(regularizers)
        # needs_input_tape is True or the number of gradient calls a penalty makes on the
        # input tape; more than one call in all needs a persistent tape.
        needs = sum(int(r.needs_input_tape) for r in active)
        if needs:
            with tf.GradientTape(persistent=needs > 1, watch_accessed_variables=False) as itape:
                itape.watch(x)
                loss, y_pred = self._forward(x, y, True, sample_weight)
        else:
            itape = None
            loss, y_pred = self._forward(x, y, True, sample_weight)
        ctx = StepContext(step=self, x=x, y=y, y_pred=y_pred, loss=loss, tape=tape,
                          iteration=info.global_step, input_tape=itape,
                          sample_weight=sample_weight)
        total, reg_logs = loss, {}
        for reg in self.regularizers:
            if any(reg is r for r in active):
                contribution, value = reg.contribute(ctx)
                total += contribution
            else:
                value = reg.last_value()
            reg_logs[f"reg/{reg.name}"] = value
        return total, ctx, reg_logs

    def train_step(self, batch, info: StepInfo | None = None) -> dict:
        """One update. Returns scalar logs: ``loss``, the metrics, ``reg/*``, and when
        ``info.sampled`` the global gradient norm (under ``SAMPLED``: computed once per
        execution, it costs a tenth of a small model's step without XLA).

        With a reset policy the update is skipped when the policy says so, and the
        step's logs get zero weight in the execution's averages (``WEIGHT``).
        """
        info = info or StepInfo.at()
        if self.regularizers and all(r.every > 1 for r in self.regularizers) and not in_replicas():
            # Every regularizer is lazy: steps where none is due take a plain update, so
            # they cost what a step without regularizers costs (differentiating through
            # a cond inside the tape would not be free). Not under a strategy: the update
            # all-reduces gradients, which a replica's tf.cond branch cannot hold.
            due = tf.reduce_any([tf.equal(info.global_step % r.every, 0)
                                 for r in self.regularizers])
            return tf.cond(due, lambda: self._train_step(batch, info, None),
                           lambda: self._train_step(batch, info, ()))
        return self._train_step(batch, info, None)

    def _train_step(self, batch, info, regularizers) -> dict:
        x, y, w = unpack(batch)
        variables = self.trainable_variables
        if info.jit_gradients:  # the compile plan's choice (split_xla_blockers)
            return self._jit_gradients_step(x, y, w, info, regularizers, variables)
        tape, total, ctx, logs, bad = self.forward(x, y, w, info, regularizers,
                                                   literal_reset=True)
        if self.reset is None:
            before = self._health_before(info, variables)
            grads = self.apply(tape, total, variables, self.optimizer)
            self.update_metrics("train", y, ctx.y_pred, w)
            if info.sampled:
                logs[SAMPLED] = {"grad_norm": self.grad_norm(grads),
                                 **self._health_logs(info, grads, variables, before)}
            return logs
        return self._guarded_update(tape, total, variables, logs, bad, batch, info,
                                    y_pred=ctx.y_pred)

    def forward(self, x, y, w, info, regularizers, *, literal_reset: bool = False):
        """Record the forward pass on a new tape: ``(tape, total loss, context, logs,
        bad)``, where ``logs`` has the loss, the batch metrics and ``reg/*``, and ``bad``
        is the reset policy's verdict on the global batch's loss (None without a policy).

        ``literal_reset``: when run eagerly and the batch is bad, reset the tape inside
        its context (the seed's literal reset: nothing recorded so far counts).
        """
        with tf.GradientTape() as tape:
            total, ctx, reg_logs = self.record(x, y, tape, info, regularizers, w)
            with tape.stop_recording():
                logs = {"loss": ctx.loss, **self._batch_metrics(y, ctx.y_pred, w), **reg_logs}
                # Decided on the global batch's loss, so every replica decides alike.
                bad = (self.reset.check_loss(global_mean(total)) if self.reset is not None
                       else None)
            if literal_reset and bad is not None and tf.executing_eagerly() and bool(bad):
                tape.reset()
        return tape, total, ctx, logs, bad

    def health_model(self):
        """The model, when this class's update is TapeStep's own; None when a subclass
        replaces ``train_step`` (its update is its own to report)."""
        return self.model if type(self).train_step is TapeStep.train_step else None

    def _health_before(self, info, variables):
        """The weights before the update, and the loss scale of its gradients, when this
        step computes the layers' health (``StepInfo.health``); else None."""
        if info.health is None:
            return None
        scale = None if self.loss_scale is None else tf.identity(self.loss_scale.value)
        return info.health.weights(variables), scale

    @staticmethod
    def _health_logs(info, grads, variables, before) -> dict:
        if before is None:
            return {}
        weights, scale = before
        return info.health.logs(grads, variables, weights, scale=scale)

    def split_xla_blockers(self) -> list[str]:
        # A lazy regularizer writes its last value, a write other replicas must see: it
        # cannot happen inside an XLA program.
        return [f"regularizer {r.name} is lazy (every {r.every}): its last value is a "
                "variable the replicas share, written outside XLA"
                for r in self.regularizers if r.every != 1]

    def _jit_gradients_step(self, x, y, w, info, regularizers, variables) -> dict:
        """The forward pass, metrics and gradients compiled with XLA; the checks that
        talk to other replicas and the update outside it (``StepInfo.jit_gradients``)."""
        # By the trainable set too: after an unfreeze the gradients are of other variables.
        key = (info.sampled, None if regularizers is None else len(regularizers),
               tuple(id(v) for v in variables))
        compiled = self._jit_cache.get(key)
        if compiled is None:
            def forward_backward(x, y, w, global_step):
                with tf.GradientTape() as tape:
                    total, ctx, reg_logs = self.record(
                        x, y, tape, StepInfo(global_step=global_step), regularizers, w)
                    with tape.stop_recording():
                        logs = {"loss": ctx.loss, **self._batch_metrics(y, ctx.y_pred, w),
                                **reg_logs}
                return total, logs, ctx.y_pred, self.gradients(tape, total, variables)

            compiled = self._jit_cache[key] = tf.function(forward_backward, jit_compile=True)
        total, logs, y_pred, grads = compiled(x, y, w, tf.convert_to_tensor(info.global_step))
        # The Keras metrics' updates run outside XLA, with the update.
        if self.reset is None:
            before = self._health_before(info, variables)
            self.optimizer.apply_gradients(
                [(g, v) for g, v in zip(grads, variables) if g is not None])
            self.update_metrics("train", y, y_pred, w)
            if info.sampled:
                logs[SAMPLED] = {"grad_norm": self.grad_norm(grads),
                                 **self._health_logs(info, grads, variables, before)}
            return logs
        bad = self.reset.check_loss(global_mean(total))
        batch = (x, y) if w is None else (x, y, w)
        return self._guarded_update(None, total, variables, logs, bad, batch, info,
                                    grads=grads, y_pred=y_pred)

    def _guarded_update(self, tape, total, variables, logs, bad, batch, info, grads=None,
                        y_pred=None):
        if grads is not None:
            bad = tf.logical_or(bad, any_replica(self.reset.check_gradients(grads)))
        elif tf.executing_eagerly() and bool(bad):
            grads = [None] * len(variables)  # the tape was reset: there is nothing to take
        else:
            grads = self.gradients(tape, total, variables)
            bad = tf.logical_or(bad, any_replica(self.reset.check_gradients(grads)))
        pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
        before = self._health_before(info, [v for _, v in pairs])
        self.optimizer.apply_gradients(pairs, skip=bad)
        self.reset.record(global_mean(total), bad, info.global_step + 1)
        ok = tf.logical_not(bad)
        _, y, w = unpack(batch)
        # A discarded step's examples stay out of the epoch's metrics, as out of its means.
        if tf.executing_eagerly():
            if bool(ok):
                self.update_metrics("train", y, y_pred, w)
        else:
            def update():
                self.update_metrics("train", y, y_pred, w)
                return tf.constant(True)

            tf.cond(ok, update, lambda: tf.constant(False))
        # A discarded step's values (often NaN) must not poison the execution's averages.
        logs = {k: tf.where(ok, tf.cast(v, tf.float32), 0.0) for k, v in logs.items()}
        if info.sampled:
            logs[SAMPLED] = {"grad_norm": tf.where(ok, self.grad_norm([g for g, _ in pairs]),
                                                   0.0),
                             # Of the discarded update too: its gradients are the news.
                             **self._health_logs(info, [g for g, _ in pairs],
                                                 [v for _, v in pairs], before)}
        logs[WEIGHT] = tf.cast(ok, tf.float32) * batch_size(batch)
        return logs

    def run_step(self, next_batch, train_step) -> dict:
        """One update; with ``tape.reset.action=retry`` a discarded batch is replaced by
        the next one, up to ``max_retries`` times, within the same step."""
        logs = super().run_step(next_batch, train_step)
        retries = self.reset.max_retries if self.reset is not None else 0
        if retries:
            for _ in tf.range(retries):
                if not self.reset.last_reset:
                    break
                logs = super().run_step(next_batch, train_step)
        return logs

    def test_step(self, batch) -> dict:
        """Loss and metrics of one validation batch, no update."""
        x, y, w = unpack(batch)
        loss, y_pred = self._forward(x, y, False, w)
        self.update_metrics("val", y, y_pred, w)
        return {"loss": loss, **self._batch_metrics(y, y_pred, w)}

    def inference_loss(self, batch):
        """``compute_loss`` of ``batch`` with ``training=False``, sample weights included;
        the regularizers are left out (lazy ones are not a fixed part of the objective,
        and a penalty on gradients would need third derivatives)."""
        x, y, w = unpack(batch)
        return self._forward(x, y, False, w)[0]

    def gradients_by_path(self, batch, info: StepInfo | None = None) -> dict:
        """Gradients of the training objective keyed by variable path (no update)."""
        x, y, w = unpack(batch)
        sources = {v.path: v for v in self.trainable_variables}
        with tf.GradientTape() as tape:
            total, _, _ = self.record(x, y, tape, info, sample_weight=w)
        return gradients(tape, total, sources, unconnected="zero")



def unpack(batch):
    """``(x, y, sample_weight)`` of a batch ``(x, y)`` (weight None) or ``(x, y, w)``."""
    if len(batch) == 3:
        return tuple(batch)
    x, y = batch
    return x, y, None


def as_float32(tensor):
    """A half-precision floating tensor (a mixed-precision model's output) as float32."""
    if tensor.dtype in (tf.float16, tf.bfloat16):
        return tf.cast(tensor, tf.float32)
    return tensor
