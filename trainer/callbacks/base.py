"""Callback: the hooks the trainer calls between compiled executions."""

from __future__ import annotations

from pathlib import Path


class Callback:
    """Base class; override any hook. Every hook gets the trainer first.

    Hooks run on the host between executions, never inside the compiled step.
    ``logs`` are flat dicts of Python floats with slash-namespaced keys.
    """

    def on_fit_start(self, trainer) -> None:
        """Before the first execution (the step is already compiled)."""

    def on_epoch_start(self, trainer, epoch: int) -> None:
        """Before the first execution of epoch ``epoch`` (0-based)."""

    def on_execution_end(self, trainer, step: int, logs: dict) -> None:
        """After each execution; ``logs`` are means over its steps (``train/...``)."""

    def on_epoch_end(self, trainer, epoch: int, logs: dict) -> None:
        """After evaluation; ``logs`` hold ``train/...``, ``val/...``, ``epoch``, ``step``."""

    def on_fit_end(self, trainer, logs: dict) -> None:
        """After the last epoch, also when training stopped early."""


def resolve(trainer, path: str) -> Path:
    """A callback's path, relative to the trainer's run directory unless absolute."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(trainer.run_dir) / p
