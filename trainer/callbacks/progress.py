"""Progress: a per-epoch bar on a terminal, one log line per epoch otherwise."""

from __future__ import annotations

import logging
import sys

from trainer.callbacks.base import VAL, Callback

log = logging.getLogger("trainer")


def _fmt(logs: dict) -> str:
    keys = [k for k in logs if k.startswith(("train/", *VAL))]
    return " ".join(f"{k}={logs[k]:.4g}" for k in keys)


class ProgressCallback(Callback):
    """Shows training progress.

    Args:
        mode: ``"auto"`` (a bar when stdout is a terminal, log lines otherwise),
            ``"bar"`` or ``"log"``.
    """

    def __init__(self, *, mode: str = "auto"):
        self.mode = mode
        self.bar = None

    def _use_bar(self) -> bool:
        return self.mode == "bar" or (self.mode == "auto" and sys.stdout.isatty())

    def on_epoch_start(self, trainer, epoch):
        self._start = trainer.current_step
        if self._use_bar():
            import keras

            print(f"Epoch {epoch + 1}/{trainer.epochs}")
            self.bar = keras.utils.Progbar(trainer.steps_per_epoch, stateful_metrics=[])

    def on_execution_end(self, trainer, global_step, logs):
        if self.bar is not None:
            values = [(k, v) for k, v in logs.items() if k.startswith("train/")]
            self.bar.update(global_step - self._start, values=values)

    def on_epoch_end(self, trainer, epoch, logs):
        if self.bar is not None:
            values = [(k, v) for k, v in logs.items() if k.startswith(VAL)]
            self.bar.update(trainer.steps_per_epoch, values=values, finalize=True)
            self.bar = None
        else:
            log.info("epoch %d/%d step %d %s", epoch + 1, trainer.epochs, logs["step"],
                     _fmt(logs))
