"""Multi-task digits: a shared trunk, digit and parity heads, PCGrad on a persistent tape."""

from __future__ import annotations

import keras
import tensorflow as tf

from trainer.common.errors import UserError
from trainer.common.keys import SAMPLED
from trainer.distribute.replicas import batch_mean, step_variable
from trainer.step.metrics import accuracy
from trainer.step.tape_step import TapeStep


def two_head_mlp(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    hidden_units: list[int] = (256, 128),
    activation: str = "relu",
    dropout: float = 0.0,
    name: str = "two_head_mlp",
):
    """A Dense trunk (``trunk_<i>``) feeding two linear heads, returned as a dict.

    The outputs are ``{"digit": logits over num_outputs classes, "parity": 2 logits}``;
    each head is the layer named after its task, which is how ``MultitaskStep``
    tells head variables from shared ones.
    """
    inputs = keras.Input(shape=tuple(input_shape))
    h = keras.layers.Flatten(name="flatten")(inputs) if len(input_shape) > 1 else inputs
    for i, units in enumerate(hidden_units):
        h = keras.layers.Dense(int(units), activation=activation, name=f"trunk_{i}")(h)
        if dropout > 0:
            h = keras.layers.Dropout(dropout, name=f"trunk_dropout_{i}")(h)
    outputs = {
        "digit": keras.layers.Dense(int(num_outputs), name="digit")(h),
        "parity": keras.layers.Dense(2, name="parity")(h),
    }
    return keras.Model(inputs, outputs, name=name)


def _flat(grads) -> tf.Tensor:
    return tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)


def _unflat(flat, like) -> list:
    sizes = [tf.size(g) for g in like]
    return [tf.reshape(part, tf.shape(g)) for part, g in zip(tf.split(flat, sizes), like)]


def pcgrad(grads: dict) -> tuple[dict, tf.Tensor]:
    """PCGrad gradient surgery (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning").

    ``grads`` maps each task to its list of gradients for the same shared
    variables. Each task's gradient, flattened over all those variables, is
    projected off every other task's original gradient it conflicts with::

        if g_i . g_j < 0:  g_i <- g_i - (g_i . g_j) / |g_j|^2  g_j

    Tasks are visited in a fixed order rather than the paper's random one, so a
    run is reproducible and the compiled step equals the eager one (with two
    tasks the order makes no difference). Returns the projected gradients, same
    structure, and a bool tensor: whether any pair of tasks conflicted.
    """
    names = list(grads)
    flat = {n: _flat(grads[n]) for n in names}
    conflict = tf.constant(False)
    projected = {}
    for i, a in enumerate(names):
        g = flat[a]
        for b in names:
            if b == a:
                continue
            dot = tf.reduce_sum(g * flat[b])
            # min(dot, 0) projects only when the gradients conflict, without a tf.cond.
            g = g - tf.math.divide_no_nan(tf.minimum(dot, 0.0),
                                          tf.reduce_sum(tf.square(flat[b]))) * flat[b]
        projected[a] = _unflat(g, grads[a])
        for b in names[i + 1:]:
            conflict = tf.logical_or(conflict, tf.reduce_sum(flat[a] * flat[b]) < 0.0)
    return projected, conflict


def _cosine(a, b) -> tf.Tensor:
    return tf.math.divide_no_nan(tf.reduce_sum(a * b), tf.norm(a) * tf.norm(b))


class MultitaskStep(TapeStep):
    """Two classification tasks on one model: the digit (``y``) and its parity (``y % 2``).

    The forward pass is recorded once on a persistent ``tf.GradientTape``; each
    task takes its own gradients from it (shared trunk plus its own head), the
    tape is released, the trunk gradients go through PCGrad (``pcgrad=False``
    simply sums them) and one optimizer update applies trunk and heads together.
    Head variables are those of the model's layers named after the tasks; every
    other trainable variable is shared.

    Logs ``loss`` (the sum), ``loss/<task>``, ``accuracy/<task>``, ``grad_norm``,
    and in training ``pcgrad/conflict`` (1 when the task gradients on the trunk
    had a negative dot product; its mean over steps is the share of conflicting
    steps) and ``pcgrad/cosine`` (their cosine similarity); ``pcgrad/conflict_steps``
    counts the conflicting steps since the start of the run.

    Args:
        model, optimizer, task, unconnected_gradients: as for ``TapeStep``; the
            step takes no regularizers and no reset policy.
        pcgrad: apply gradient surgery to the shared gradients (else sum them).
    """

    takes_sample_weight = False  # its own train_step: unweighted task losses
    TASKS = ("digit", "parity")

    def __init__(self, *, model, optimizer, task: str = "classification",
                 unconnected_gradients: str = "none", pcgrad: bool = True):
        if task != "classification":
            raise UserError("the multitask step needs classification data (data=digits)")
        super().__init__(model=model, optimizer=optimizer, task=task,
                         unconnected_gradients=unconnected_gradients)
        self.pcgrad = bool(pcgrad)
        self.ce = batch_mean(keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        # Created here, outside any tf.function: the run-wide count of conflicting steps.
        self.conflicts = step_variable(0, dtype=tf.int64, name="pcgrad_conflicts")

    def state(self) -> dict:
        """Adds the count of conflicting steps."""
        return {**super().state(), "pcgrad_conflicts": self.conflicts}

    def state_logs(self) -> dict:
        """Adds ``pcgrad/conflict_steps``: conflicting steps since the start of the run."""
        return {**super().state_logs(), "pcgrad/conflict_steps": self.conflicts}

    def targets(self, y) -> dict:
        """Each task's labels, derived from the digit labels."""
        y = tf.cast(y, tf.int32)
        return {"digit": y, "parity": y % 2}

    def task_losses(self, y, outputs) -> dict:
        """Cross-entropy of each head against its task's labels."""
        return {name: self.ce(t, outputs[name]) for name, t in self.targets(y).items()}

    def compute_loss(self, x, y, training: bool):
        """The summed task losses (what the gradient histograms differentiate)."""
        outputs = self.model(x, training=training)
        return tf.add_n(list(self.task_losses(y, outputs).values())), outputs

    def compute_metrics(self, y, y_pred) -> dict:
        """Accuracy of each head."""
        return {f"accuracy/{n}": accuracy(t, y_pred[n]) for n, t in self.targets(y).items()}

    def split_variables(self) -> tuple[list, dict]:
        """``(shared, heads)``: the trainable variables, split by the head layers' names.

        Read from ``trainable_variables`` on every trace, so frozen variables stay out.
        """
        variables = self.trainable_variables
        heads = {}
        for name in self.TASKS:
            own = {id(v) for v in self.model.get_layer(name).trainable_variables}
            heads[name] = [v for v in variables if id(v) in own]
        in_heads = {id(v) for vs in heads.values() for v in vs}
        return [v for v in variables if id(v) not in in_heads], heads

    def task_gradients(self, x, y, shared, heads):
        """Record the forward pass once; take each task's gradients from the persistent tape.

        Returns ``(outputs, losses, grads)``, ``grads[task]`` aligned with
        ``shared + heads[task]``.
        """
        with tf.GradientTape(persistent=True) as tape:
            outputs = self.model(x, training=True)
            losses = self.task_losses(y, outputs)
        grads = {n: self.gradients(tape, losses[n], shared + heads[n]) for n in self.TASKS}
        del tape  # a persistent tape keeps its recorded ops alive until released
        return outputs, losses, grads

    def train_step(self, batch, info=None) -> dict:
        """One update from both tasks; see the class docstring for the logs."""
        x, y = batch
        shared, heads = self.split_variables()
        outputs, losses, grads = self.task_gradients(x, y, shared, heads)
        k = len(shared)
        pairs = [(g, v) for n in self.TASKS for g, v in zip(grads[n][k:], heads[n])]
        logs = {}
        if k:
            # Unconnected trunk variables (policy "none") take part as zeros in the surgery;
            # a variable no task reaches is left out of the update altogether.
            reached = [any(grads[n][i] is not None for n in self.TASKS) for i in range(k)]
            trunk = {n: [tf.zeros_like(v) if g is None else g
                         for g, v in zip(grads[n][:k], shared)] for n in self.TASKS}
            a, b = (_flat(trunk[n]) for n in self.TASKS)
            logs["pcgrad/cosine"] = _cosine(a, b)
            if self.pcgrad:
                trunk, conflict = pcgrad(trunk)
            else:
                conflict = tf.reduce_sum(a * b) < 0.0
            logs["pcgrad/conflict"] = tf.cast(conflict, tf.float32)
            self.conflicts.assign_add(tf.cast(conflict, tf.int64))
            summed = [tf.add_n(list(gs)) for gs in zip(*(trunk[n] for n in self.TASKS))]
            pairs += [(g, v) for g, v, r in zip(summed, shared, reached) if r]
        pairs = [(g, v) for g, v in pairs if g is not None]
        # One update for trunk and heads: apply_objectives would call the shared optimizer
        # once per task, i.e. two Adam steps (and two iterations) per batch on the trunk.
        self.optimizer.apply_gradients(pairs)
        logs.update(self._logs(y, outputs, losses))
        if info is None or info.sampled:
            # The update's gradient norm, as TapeStep logs it: of the replicas' summed
            # gradient, and of the micro-batches' sum under accumulation.
            logs[SAMPLED] = {"grad_norm": self.grad_norm([g for g, _ in pairs])}
        return logs

    def test_step(self, batch) -> dict:
        """Losses and accuracies of both heads on a validation batch."""
        x, y = batch
        outputs = self.model(x, training=False)
        return self._logs(y, outputs, self.task_losses(y, outputs))

    def _logs(self, y, outputs, losses) -> dict:
        logs = {"loss": tf.add_n(list(losses.values()))}
        logs.update({f"loss/{n}": v for n, v in losses.items()})
        logs.update(self.compute_metrics(y, outputs))
        return logs
