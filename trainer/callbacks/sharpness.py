"""Sharpness: the top Hessian eigenvalue and the Hessian trace of the training loss, logged."""

from __future__ import annotations

import logging

import tensorflow as tf

from trainer.callbacks.base import Callback, resolve
from trainer.common.errors import UserError
from trainer.step.hessian import SharpnessOptions, sharpness
from trainer.training.periodic import Periodic

log = logging.getLogger(__name__)


class SharpnessCallback(Callback):
    """Measures the Hessian of the training loss every ``every_n_steps`` steps.

    Writes ``sharpness/top_eigenvalue`` (power iteration), ``sharpness/trace``
    (Hutchinson, Rademacher probes) and ``sharpness/trace_stderr`` (the estimate's
    standard error) as scalars into ``<log_dir>/train``, at the start and at the
    first execution boundary at or past each multiple of ``every_n_steps``, and
    keeps them in ``history`` (``{"step", "top_eigenvalue", "trace",
    "trace_stderr"}`` per measurement).

    What is measured: the Hessian, for the trainable variables, of the step's loss
    (``trainer.inference_loss``: its loss function and sample weights, in inference
    mode so dropout is off, without regularizers) averaged over a fixed set of
    training examples: the first ``num_examples`` of the first epoch's order, taken
    once when the fit starts, so every measurement sees the same examples (all of
    them when the training set is no larger). Random draws are stateless from
    ``(seed, global step)``: eager and compiled runs measure the same values.

    The measurement is one ``tf.function``, traced once per set of trainable
    variables (eager under ``trainer.run_eagerly``). Under a ``tf.distribute``
    strategy it runs on one device in the cross-replica context (on the variables'
    values, which every replica shares), as the gradient histograms do: the same
    value as one device, with no collective, whatever the number of replicas.
    ``trainer.accumulate_steps`` does not change it (it is not a training step).

    Args:
        every_n_steps: interval in steps; 0 measures at the start only.
        num_examples: training examples the loss is averaged over.
        iterations: the most power iterations (Hessian-vector products).
        tolerance: stop the power iteration once the estimate changes by at most this
            fraction of itself; 0 always runs ``iterations``.
        trace_probes: Hutchinson probes (a Hessian-vector product each); 0 skips the trace.
        seed: the seed of the power iteration's start and of the probes.
        log_dir: the TensorBoard directory (its ``train`` run), relative to the run dir.
    """

    chief_only = True

    def __init__(self, *, every_n_steps: int = 100, num_examples: int = 256,
                 iterations: int = 20, tolerance: float = 1e-3, trace_probes: int = 10,
                 seed: int = 0, log_dir: str = "tb"):
        checks = [("every_n_steps", every_n_steps, every_n_steps >= 0, ">= 0 (0: at the start "
                   "only)"),
                  ("num_examples", num_examples, num_examples >= 1, ">= 1"),
                  ("iterations", iterations, iterations >= 1, ">= 1"),
                  ("tolerance", tolerance, tolerance >= 0, ">= 0 (0: run every iteration)"),
                  ("trace_probes", trace_probes, trace_probes >= 0, ">= 0 (0: no trace)")]
        for key, value, ok, rule in checks:
            if not ok:
                raise UserError(f"callbacks.sharpness.{key}={value} must be {rule}")
        self.every_n_steps = int(every_n_steps)
        self.num_examples = int(num_examples)
        self.options = SharpnessOptions(iterations=int(iterations), tolerance=float(tolerance),
                                        trace_probes=int(trace_probes))
        self.seed = int(seed)
        self.log_dir = log_dir
        #: One dict per measurement: ``step``, ``top_eigenvalue``, ``trace``, ``trace_stderr``.
        self.history: list[dict] = []
        self._when = Periodic(every_n_steps=self.every_n_steps, at_start=True)
        self._examples = None
        self._examples_of = None
        self._measure = None
        self._measure_key = None
        self._writer = None

    def on_fit_start(self, trainer):
        if self._examples_of is not trainer.data:
            self._examples = fixed_examples(trainer.data, self.num_examples)
            self._examples_of = trainer.data
            self._measure = None
        self._writer = tf.summary.create_file_writer(
            str(resolve(trainer, self.log_dir) / "train"))
        global_step = trainer.current_step
        self._when.reset(global_step)
        if self._when.due(global_step, start=True):
            self.measure(trainer, global_step)

    def on_execution_end(self, trainer, global_step, logs):
        if self.every_n_steps and self._when.due(global_step):
            self.measure(trainer, global_step)

    def on_fit_end(self, trainer, logs):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def measure(self, trainer, global_step: int) -> dict:
        """Measure now, write the values at ``global_step`` and return them."""
        variables = trainer.trainable_variables
        key = (tuple(id(v) for v in variables), trainer.run_eagerly)
        if self._measure is None or self._measure_key != key:
            self._measure, self._measure_key = self._build(trainer, variables), key
        seed = tf.constant([self.seed, global_step], tf.int64)
        values = {k: float(v) for k, v in self._measure(self._examples, seed).items()}
        if self._writer is not None:
            with self._writer.as_default(step=global_step):
                for name, value in values.items():
                    tf.summary.scalar(f"sharpness/{name}", value)
            self._writer.flush()
        self.history.append({"step": global_step, **values})
        return values

    def _build(self, trainer, variables):
        options = self.options

        def measure(batch, seed):
            return sharpness(lambda: trainer.inference_loss(batch), variables, seed, options)

        return measure if trainer.run_eagerly else tf.function(measure)


def fixed_examples(data, num_examples: int):
    """The first ``num_examples`` training examples of epoch 0's order, as one batch of
    tensors (all of them when there are fewer): the same on every call for a data set."""
    if not callable(getattr(data, "train_dataset", None)):
        raise UserError(f"callbacks.sharpness takes its examples from the data's train_dataset(), "
                        f"which {type(data).__name__} does not define; define it or remove "
                        "callbacks.sharpness")
    dataset = data.train_dataset().take(data.steps_per_epoch("train")).unbatch()
    batch = next(iter(dataset.batch(num_examples).take(1)))
    if int(tf.shape(batch[0])[0]) < num_examples:
        log.info("callbacks.sharpness: the training set has %d examples; measuring on all of "
                 "them (num_examples=%d)", int(tf.shape(batch[0])[0]), num_examples)
    return tuple(batch)
