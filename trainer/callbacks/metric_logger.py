"""``MetricLogger``: the points TensorBoard's scalars hold, for the other experiment trackers."""

from __future__ import annotations

from trainer.callbacks.base import VAL, Callback

#: The prefix of an epoch's ``train/`` and ``val/`` logs as TensorBoard's HParams session
#: holds them (``epoch/train/loss``: the epoch's mean, not the last execution's).
EPOCH = "epoch/"


def epoch_points(logs: dict) -> dict:
    """The points an epoch's end adds at its step besides its validation's: its ``train/``
    and ``val/`` logs under ``epoch/<key>``."""
    return {f"{EPOCH}{k}": v for k, v in logs.items() if k.startswith(("train/", *VAL))}


class MetricLogger(Callback):
    """Base of the trackers besides TensorBoard: ``write(step, metrics)`` gets the points the
    TensorBoard callback draws as scalars, at the same global steps, keyed by their log key.

    - every execution: its logs (``train/loss``, ``train/learning_rate``,
      ``time/steps_per_second``, ...) at the execution's last global step;
    - every validation (each epoch's end, and the steps of ``trainer.val_every_n_steps``):
      its ``val/`` (``val_ema/``, ``val_swa/``) logs at its step;
    - every epoch: ``epoch_points(logs)`` at the epoch's last global step.

    TensorBoard's run and tag are the key split at its first ``/`` (``train/loss`` is tag
    ``loss`` of run ``train``; ``epoch/train/loss`` is tag ``epoch/train/loss`` of the log
    dir's root; a key without a ``train/`` or ``val/`` prefix is a tag of run ``train``).
    Not written here: the per-variable ``grad_norm/<path>`` of TensorBoard's histogram
    sets; a scheduled learning rate is the execution's logged value, where TensorBoard
    writes the rate of every step.
    """

    chief_only = True

    def on_execution_end(self, trainer, global_step, logs):
        self.write(int(global_step), dict(logs))

    def on_validation_end(self, trainer, global_step, logs):
        self.write(int(global_step), {k: v for k, v in logs.items() if k.startswith(VAL)})

    def on_epoch_end(self, trainer, epoch, logs):
        self.write(int(logs["step"]), epoch_points(logs))

    def write(self, step: int, metrics: dict) -> None:
        """Record ``metrics`` (key -> float) at global step ``step``."""
        raise NotImplementedError
