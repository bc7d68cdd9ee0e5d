"""The step contract (``Step``) and the default supervised step (``TapeStep``). Pure TensorFlow."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import keras
import tensorflow as tf

from trainer.errors import UserError
from trainer.keys import SAMPLED, WEIGHT, batch_size, float_logs
from trainer.metrics import DEFAULT_METRICS
from trainer.optim import GroupedOptimizer
from trainer.tape import check_unconnected, global_norm, gradients

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInfo:
    """What the loop tells a step about the update it runs.

    Attributes:
        global_step: the global step before this update (int64 tensor). Lazy
            schedules and stateless random draws read it, so they are the same
            eager, compiled and after a restart.
        sampled: whether this is its execution's sampled step (a Python bool,
            fixed when the step is traced). The loop runs the first step of each
            execution sampled and the others not; a step computes costly
            diagnostics (the default step's ``grad_norm``) only then and returns
            them under ``trainer.keys.SAMPLED``: they are logged as that step's
            values, not averaged.
    """

    global_step: Any
    sampled: bool = True

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

    def __init__(self, *, models: dict, optimizers: dict, regularizers=(),
                 unconnected_gradients: str = "none"):
        if not models:
            raise UserError(f"{type(self).__name__} has no models; pass models={{name: model}}")
        self._models = dict(models)
        self._optimizers = {k: o if isinstance(o, GroupedOptimizer) else GroupedOptimizer(o)
                            for k, o in optimizers.items()}
        self.regularizers = list(regularizers)
        self.unconnected = check_unconnected(unconnected_gradients)
        self._warned_unconnected: set[str] = set()

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

        May also return ``trainer.keys.WEIGHT`` (the weight of these logs in the
        execution's averages; default the batch size) and ``trainer.keys.SAMPLED``
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

    def gradients_by_path(self, batch, info: StepInfo | None = None) -> dict:
        """Gradients of the training objective by variable path, no update (for histograms).

        Default: none (the TensorBoard callback then writes weight histograms only).
        """
        return {}

    def state(self) -> dict:
        """Trackable state beyond models and optimizers that a restart needs (by name).

        Default: the regularizers' state. Subclasses add theirs to it.
        """
        return {"regularizers": {r.name: r.state() for r in self.regularizers}}

    def state_logs(self) -> dict:
        """Tensors read at the end of each execution and logged as they are (not averaged)."""
        return {}

    def check_state(self, state: dict) -> None:
        """Host side, after each execution, with ``state_logs()``'s values: raise to stop."""

    def final_metrics(self, data) -> dict:
        """Results measured once after training, added to ``metrics.json``. Default: none."""
        return {}

    # --- helpers for train steps ---------------------------------------------------------
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


class TapeStep(Step):
    """The default supervised step: forward on a ``tf.GradientTape``, loss, gradients, update.

    The tape watches ``self.trainable_variables`` (the model's, read each time the
    step is traced, so freezing and unfreezing are honoured). Subclasses override
    the smallest hook that does the job:

    - ``compute_loss(x, y, training)`` for a different objective;
    - ``compute_metrics(y, y_pred)`` for other metrics;
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
        reset: a ``trainer.tape.ResetPolicy``: when to discard the recorded tape.
    """

    def __init__(self, *, model, optimizer, task: str = "classification", loss=None,
                 regularizers=(), unconnected_gradients: str = "none", reset=None):
        for reg in regularizers:
            if reg.applies_to != "supervised":
                raise UserError(f"regularizer {reg.name} penalises a GAN critic, not this step's "
                                "loss; use it with a GAN step (+experiment=gan)")
        super().__init__(models={"model": model}, optimizers={"optimizer": optimizer},
                         regularizers=regularizers, unconnected_gradients=unconnected_gradients)
        self.model = model
        self.optimizer = self._optimizers["optimizer"]
        self.task = task
        self.loss_fn = loss if loss is not None else default_loss(task)
        self.metric_fns = dict(DEFAULT_METRICS.get(task, {}))
        self.reset = reset

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

    # --- hooks -----------------------------------------------------------------------------
    def compute_loss(self, x, y, training: bool):
        """Return ``(loss, y_pred)`` for one batch. Runs inside the tape."""
        y_pred = self.model(x, training=training)
        return self.loss_fn(y, y_pred), y_pred

    def compute_metrics(self, y, y_pred) -> dict:
        """Scalar metrics of one batch. Runs outside the tape (under stop_recording)."""
        return {name: fn(y, y_pred) for name, fn in self.metric_fns.items()}

    def record(self, x, y, tape, info: StepInfo | None = None,
               regularizers=None) -> tuple[Any, StepContext, dict]:
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
                loss, y_pred = self.compute_loss(x, y, training=True)
        else:
            itape = None
            loss, y_pred = self.compute_loss(x, y, training=True)
        ctx = StepContext(step=self, x=x, y=y, y_pred=y_pred, loss=loss, tape=tape,
                          iteration=info.global_step, input_tape=itape)
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
        if self.regularizers and all(r.every > 1 for r in self.regularizers):
            # Every regularizer is lazy: steps where none is due take a plain update, so
            # they cost what a step without regularizers costs (differentiating through
            # a cond inside the tape would not be free).
            due = tf.reduce_any([tf.equal(info.global_step % r.every, 0)
                                 for r in self.regularizers])
            return tf.cond(due, lambda: self._train_step(batch, info, None),
                           lambda: self._train_step(batch, info, ()))
        return self._train_step(batch, info, None)

    def _train_step(self, batch, info, regularizers) -> dict:
        x, y = batch
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            total, ctx, reg_logs = self.record(x, y, tape, info, regularizers)
            with tape.stop_recording():
                logs = {"loss": ctx.loss, **self.compute_metrics(y, ctx.y_pred), **reg_logs}
                bad = self.reset.check_loss(total) if self.reset is not None else None
            if bad is not None and tf.executing_eagerly() and bool(bad):
                tape.reset()  # the seed's literal reset: nothing recorded so far counts
        if self.reset is None:
            grads = self.apply(tape, total, variables, self.optimizer)
            if info.sampled:
                logs[SAMPLED] = {"grad_norm": global_norm(grads)}
            return logs
        return self._guarded_update(tape, total, variables, logs, bad, batch, info)

    def _guarded_update(self, tape, total, variables, logs, bad, batch, info):
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
        self.reset.record(total, bad, info.global_step + 1)
        ok = tf.logical_not(bad)
        # A discarded step's values (often NaN) must not poison the execution's averages.
        logs = {k: tf.where(ok, tf.cast(v, tf.float32), 0.0) for k, v in logs.items()}
        if info.sampled:
            logs[SAMPLED] = {"grad_norm": tf.where(ok, global_norm([g for g, _ in pairs]), 0.0)}
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
        x, y = batch
        loss, y_pred = self.compute_loss(x, y, training=False)
        return {"loss": loss, **self.compute_metrics(y, y_pred)}

    def gradients_by_path(self, batch, info: StepInfo | None = None) -> dict:
        """Gradients of the training objective keyed by variable path (no update)."""
        x, y = batch
        sources = {v.path: v for v in self.trainable_variables}
        with tf.GradientTape() as tape:
            total, _, _ = self.record(x, y, tape, info)
        return gradients(tape, total, sources, unconnected="zero")
