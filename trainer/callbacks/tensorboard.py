"""TensorBoard: scalars, histograms, the config as text and an HParams summary."""

from __future__ import annotations

import tensorflow as tf
from tensorboard.plugins.hparams import api as hp

from trainer.callbacks.base import Callback, resolve


class TensorBoardCallback(Callback):
    """Writes event files under ``<log_dir>/train`` and ``<log_dir>/val``.

    - every execution: the train logs (``loss``, metrics, ``grad_norm``,
      ``learning_rate``, ``time/steps_per_second``) into ``train``;
    - every epoch: the validation logs into ``val`` under the same tags, so
      TensorBoard draws train and validation on one chart;
    - every ``histogram_every_n_steps`` steps (at the first execution boundary
      past each multiple; 0 turns them off): histograms of every weight and of
      its gradient on a fixed probe batch, and ``grad_norm/<path>`` per variable;
    - at the start: the resolved config and the variable table (path, shape,
      parameters, trainable or frozen) as text, and the HParams session
      (``log_dir`` itself is the session, ``train``/``val`` its metric groups).

    Args:
        log_dir: relative to the run directory unless absolute.
        histogram_every_n_steps: histogram interval in steps; 0 disables.
    """

    def __init__(self, *, log_dir: str = "tb", histogram_every_n_steps: int = 100):
        self.log_dir = log_dir
        self.histogram_every_n_steps = histogram_every_n_steps
        self.writers = {}
        self._last_histogram_bucket = -1

    def _writer(self, name):
        return self.writers[name]

    def on_fit_start(self, trainer):
        root = resolve(trainer, self.log_dir)
        self.writers = {
            name: tf.summary.create_file_writer(str(root / name) if name else str(root))
            for name in ("", "train", "val")
        }
        step = trainer.current_step
        with self._writer("").as_default(step=step):
            if trainer.hparams:
                hp.hparams(trainer.hparams)
            if trainer.config_text:
                tf.summary.text("config", "```\n" + trainer.config_text + "\n```")
            tf.summary.text("variables", trainer.variable_table)
        self._write_histograms(trainer, step)

    def on_execution_end(self, trainer, step, logs):
        self._scalars(logs, step)
        if self.histogram_every_n_steps:
            self._write_histograms(trainer, step)

    def on_epoch_end(self, trainer, epoch, logs):
        self._scalars({k: v for k, v in logs.items() if k.startswith("val/")}, logs["step"])
        for w in self.writers.values():
            w.flush()

    def on_fit_end(self, trainer, logs):
        if trainer.hparams:
            # Name the metrics the HParams dashboard compares (epoch-level train and val
            # values), instead of letting it offer every scalar tag of the run.
            metrics = [hp.Metric(k.partition("/")[2], group=k.partition("/")[0])
                       for k in sorted(logs) if k.startswith(("train/", "val/"))]
            with self._writer("").as_default(step=trainer.current_step):
                hp.hparams_config(hparams=[hp.HParam(k) for k in sorted(trainer.hparams)],
                                  metrics=metrics)
        for w in self.writers.values():
            w.close()

    def _scalars(self, logs, step):
        for key, value in logs.items():
            group, _, tag = key.partition("/")
            if group in ("train", "val"):
                writer = self._writer(group)
            else:
                writer, tag = self._writer("train"), key
            with writer.as_default(step=step):
                tf.summary.scalar(tag, value)

    def _write_histograms(self, trainer, step):
        n = self.histogram_every_n_steps
        if not n or step // n == self._last_histogram_bucket:
            return
        self._last_histogram_bucket = step // n
        grads = trainer.gradients_by_path()
        with self._writer("train").as_default(step=step):
            for model in trainer.step.models.values():
                for v in model.variables:
                    tf.summary.histogram(f"weights/{v.path}", v.value)
            for path, g in grads.items():
                tf.summary.histogram(f"gradients/{path}", g)
                tf.summary.scalar(f"grad_norm/{path}", float(tf.norm(g)))
