"""Metrics: Keras metric objects kept over an epoch (``MetricSet``), and stateless helpers."""

from __future__ import annotations

import keras
import tensorflow as tf

from trainer.common.errors import UserError


def accuracy(y_true, logits):
    """Share of examples whose largest logit is the true class (one batch, stateless)."""
    pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.reduce_mean(tf.cast(tf.equal(pred, tf.cast(y_true, tf.int32)), tf.float32))


class Accuracy(keras.metrics.Metric):
    """Share of examples whose largest logit is the true class, over every example added
    since the last reset (weighted by ``sample_weight``): Keras'
    ``SparseCategoricalAccuracy``, computed on the logits themselves (the largest logit is
    the largest probability) in a handful of ops, as it runs in every training step."""

    #: Takes the model's logits and integer labels (``MetricSet`` skips the softmax).
    takes_logits = True

    def __init__(self, name: str = "accuracy", dtype=None):
        super().__init__(name=name, dtype=dtype)
        # (correct, examples) in one variable: one state update per step, not two.
        self.sums = self.add_variable(shape=(2,), initializer="zeros", name="sums")

    @property
    def count(self):
        """Examples (sample weights) added since the last reset."""
        return tf.convert_to_tensor(self.sums)[1]

    def update_state(self, y_true, y_pred, sample_weight=None):
        # As few ops as it takes: it runs in every step, and a tiny model's step is a few
        # dozen ops (labels already int32 of rank 1 and a static batch size cost none).
        labels = _int_labels(y_true)
        correct = tf.cast(tf.equal(tf.argmax(y_pred, axis=-1, output_type=tf.int32), labels),
                          tf.float32)
        if sample_weight is None:
            rows = correct.shape[0]
            count = (tf.constant(float(rows)) if rows is not None
                     else tf.cast(tf.size(correct), tf.float32))
            sums = tf.stack([tf.reduce_sum(correct), count])
        else:
            weight = tf.cast(tf.reshape(sample_weight, [-1]), tf.float32)
            sums = tf.stack([tf.reduce_sum(correct * weight), tf.reduce_sum(weight)])
        self.sums.assign_add(sums)

    def result(self):
        sums = tf.convert_to_tensor(self.sums)
        return tf.math.divide_no_nan(sums[0], sums[1])


def _int_labels(y_true):
    """Integer class labels of rank 1 (no op when they already are)."""
    if y_true.shape.rank != 1:
        y_true = tf.reshape(y_true, [-1])
    return y_true if y_true.dtype == tf.int32 else tf.cast(y_true, tf.int32)


def mae(y_true, y_pred):
    """Mean absolute error of one batch (stateless)."""
    return tf.reduce_mean(tf.abs(tf.cast(y_true, y_pred.dtype) - y_pred))


#: The task's own metric as a stateless per-batch function (``TapeStep.metric_fns``).
STATELESS_DEFAULTS = {"classification": {"accuracy": accuracy}, "regression": {"mae": mae}}


def default_metrics(task: str) -> list:
    """The task's metric: accuracy for classification, mean absolute error for regression."""
    if task == "classification":
        return [Accuracy(name="accuracy")]
    if task == "regression":
        return [keras.metrics.MeanAbsoluteError(name="mae")]
    return []


def wants_sparse_labels(metric) -> bool:
    """Whether a classification metric takes integer labels (Keras' ``Sparse*`` metrics) rather
    than one-hot ones (``AUC``, ``Precision``, ``F1Score``, ``TopKCategoricalAccuracy``)."""
    return type(metric).__name__.startswith("Sparse")


class MetricSet:
    """Keras metric objects of one split, kept over a whole epoch.

    ``update`` adds a batch to every metric's state (inside the compiled step; under
    a ``tf.distribute`` strategy each replica adds its rows to its own copy of the
    metric's variables, which Keras creates ``ON_READ`` with ``SUM`` aggregation);
    ``results`` reads them (outside the replicas, where reading sums the copies);
    ``reset`` zeroes them. AUC, precision or F1 of an epoch are therefore the values
    over all its examples, never a mean of batch values.

    For classification the model outputs logits: each metric sees the softmax
    probabilities or the predicted class ids, and the labels as integers or one-hot,
    as the metric expects (``metric_inputs``).

    Args:
        metrics: ``keras.metrics.Metric`` objects; their names are the log keys
            (a vector result, such as ``F1Score(average=None)``'s, logs one key per
            entry: ``f1_score/0``, ``f1_score/1``, ...).
        task: ``"classification"`` or ``"regression"``.
    """

    def __init__(self, metrics, *, task: str):
        self.metrics = list(metrics)
        self.task = task
        names = [m.name for m in self.metrics]
        for metric in self.metrics:
            if not isinstance(metric, keras.metrics.Metric):
                raise UserError(f"metrics: {metric!r} is not a keras.metrics.Metric; list metric "
                                "objects, e.g. {_target_: keras.metrics.AUC}")
            if names.count(metric.name) > 1:
                raise UserError(f"metrics: two metrics are named {metric.name!r}; give one of "
                                "them another name (name: ...)")
            if metric.name == "loss" or "/" in metric.name:
                raise UserError(f"metrics: {metric.name!r} cannot be a metric's name (it is "
                                "taken by the loss or holds '/'); set name: ...")
            if task == "classification" and metric.get_config().get("from_logits"):
                raise UserError(f"metrics: {metric.name} has from_logits=true, but metrics see "
                                "probabilities (the softmax of the model's logits); drop it")
        #: Names of the metrics ``update`` was traced for: a step reports only those (one that
        #: never updates its metrics reports none).
        self.used: set[str] = set()

    def clone(self) -> MetricSet:
        """Fresh metrics of the same configuration (validation's own copies)."""
        return MetricSet([type(m).from_config(m.get_config()) for m in self.metrics],
                         task=self.task)

    def __bool__(self) -> bool:
        return bool(self.metrics)

    @property
    def variables(self) -> dict:
        """The metrics' state variables by metric name (for checkpoints)."""
        return {m.name: {str(i): v for i, v in enumerate(m.variables)} for m in self.metrics}

    def build(self, num_outputs: int) -> None:
        """Create the variables of metrics that make them on their first update (``F1Score``),
        here rather than inside a traced step: on every replica (under a strategy), and
        before the checkpoint lists them (``Step.build_metrics``). A dummy update in the
        strategy's replica context, then a reset. Call it in the strategy's scope."""
        lazy = [m for m in self.metrics if not m.variables]
        if not lazy:
            return
        y_pred = tf.zeros([1, num_outputs])
        y_true = (tf.zeros([1], tf.int32) if self.task == "classification"
                  else tf.zeros([1, num_outputs]))
        tf.distribute.get_strategy().run(lambda: _update(lazy, self.task, y_true, y_pred, None))
        for metric in lazy:
            metric.reset_state()

    def update(self, y_true, y_pred, sample_weight=None, skip=()) -> None:
        """Add one batch (this replica's rows of it) to every metric but those named in
        ``skip``."""
        chosen = [m for m in self.metrics if m.name not in skip]
        self.used.update(m.name for m in chosen)
        _update(chosen, self.task, y_true, y_pred, sample_weight)

    def results(self) -> dict:
        """Each metric's result over the examples added since the last reset, by name."""
        out = {}
        for metric in self.metrics:
            if metric.name not in self.used:
                continue
            value = tf.convert_to_tensor(metric.result())
            if value.shape.rank == 0:
                out[metric.name] = value
            else:
                for i, entry in enumerate(tf.unstack(tf.reshape(value, [-1]))):
                    out[f"{metric.name}/{i}"] = entry
        return out

    def reset(self) -> None:
        """Zero every metric (on the host, between executions)."""
        for metric in self.metrics:
            metric.reset_state()


def _update(metrics, task, y_true, y_pred, sample_weight) -> None:
    """``update_state`` of each metric, with the inputs ``MetricSet`` describes."""
    if task != "classification":
        for metric in metrics:
            metric.update_state(y_true, y_pred, sample_weight=sample_weight)
        return
    y_true = tf.convert_to_tensor(y_true)
    made = {}  # each input made once, if a metric needs it
    for metric in metrics:
        if getattr(metric, "takes_logits", False):
            metric.update_state(y_true, y_pred, sample_weight=sample_weight)
            continue
        truth, prediction = metric_inputs(metric)
        metric.update_state(_input(truth, made, y_true, y_pred),
                            _input(prediction, made, y_true, y_pred), sample_weight=sample_weight)


def _input(kind: str, made: dict, y_true, y_pred):
    """The metric input ``kind`` (see ``metric_inputs``), made once per update into ``made``.

    A function of its own, not a closure over ``made``: AutoGraph converts ``_update``
    when a step is traced, and turns a closure's captured names into ``nonlocal`` ones,
    which it cannot do for an annotated name (it then runs the function unconverted,
    with a warning on every run).
    """
    if kind not in made:
        if kind == "labels":
            made[kind] = _int_labels(y_true)
        elif kind == "probabilities":
            made[kind] = tf.nn.softmax(y_pred)
        elif kind == "classes":
            made[kind] = tf.argmax(y_pred, axis=-1, output_type=tf.int32)
        else:  # one_hot; a static width (the model's outputs): F1Score needs it
            made[kind] = tf.one_hot(_input("labels", made, y_true, y_pred), y_pred.shape[-1],
                                    dtype=tf.float32)
    return made[kind]


def metric_inputs(metric) -> tuple[str, str]:
    """What a Keras classification metric is given: ``(labels | one_hot, probabilities |
    classes)``. Integer labels for ``Sparse*`` metrics and for ``IoU``/``MeanIoU`` with
    ``sparse_y_true``; predicted class ids for ``keras.metrics.Accuracy`` (it compares
    values) and ``IoU``/``MeanIoU`` with ``sparse_y_pred``; else one-hot labels and
    probabilities (``AUC``, ``Precision``, ``Recall``, ``F1Score``, ``TopK...``)."""
    if isinstance(metric, keras.metrics.Accuracy):
        return "labels", "classes"
    if hasattr(metric, "sparse_y_pred"):  # the IoU family
        return ("labels" if metric.sparse_y_true else "one_hot",
                "classes" if metric.sparse_y_pred else "probabilities")
    return ("labels" if wants_sparse_labels(metric) else "one_hot"), "probabilities"
