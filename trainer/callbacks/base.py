"""Callback: the hooks the trainer calls between compiled executions."""

from __future__ import annotations

from pathlib import Path

from trainer.common.errors import UserError

#: The prefixes of the epoch's evaluations: of the trained weights, and of their average
#: (``trainer.ema``: ``val_ema/``, ``trainer.swa``: ``val_swa/``).
VAL = ("val/", "val_ema/", "val_swa/")


class Callback:
    """Base class; override any hook. Every hook gets the trainer first.

    Hooks run on the host between executions, never inside the compiled step, and
    use only the trainer's public API (``trainer.models``, ``trainer.global_step``,
    ``trainer.current_step``, ``trainer.epoch``, ``trainer.validation_batches()``,
    ``trainer.training_state``, ``trainer.is_chief``, ``trainer.clock()``, ...), never the
    step's or the data source's internals.
    ``global_step`` is the trainer's global step at the hook (a Python int).
    ``logs`` are flat dicts of Python floats with slash-namespaced keys.

    A callback whose state must survive a restart returns it from ``state(trainer)``;
    the trainer's training state (``trainer.training_state``) saves it under
    ``callbacks/<state_key>``.
    When a run resumes, the trainer reads the callbacks' state back first and calls
    ``on_restore`` (before the step is compiled), then restores everything else, all
    before ``on_fit_start``.

    The trainer runs callbacks in the order given, stably sorted by ``order``: a
    callback that saves the others' state (checkpoints) runs after them. ``on_fit_end``
    runs in the reverse order, as teardown does: the checkpoint callback first saves
    the last state, then the others may change the models (restore best weights).
    """

    #: Callbacks run sorted by this (stable); the checkpoint callback runs last (100).
    order: int = 0

    #: Whether only the chief of a multi-worker run runs this callback (the run's files:
    #: TensorBoard, images, the profiler). The driver leaves it out on other workers.
    chief_only: bool = False

    #: The callback's name in the checkpoint (``callbacks/<state_key>``); it must stay
    #: the same across versions, or a restart cannot find the saved state. Needed only
    #: when ``state()`` is not empty.
    state_key: str | None = None

    #: Whether this callback reads the layers' health (``trainer.health``): the trainer then
    #: compiles its computation into the step, off until a callback requests it.
    uses_health: bool = False

    def state(self, trainer) -> dict:
        """The trackable state (``tf.Variable``s or trackables) to checkpoint, by name.

        Called once when the trainer builds its checkpoint (the models exist then,
        so state shaped like them can be made here); read on the host. The default
        has none.
        """
        return {}

    def on_restore(self, trainer) -> None:
        """After this callback's state was read back from a checkpoint, before the step
        is compiled: re-establish what the state implies (the freeze schedule
        re-applies the unfreezes of the restored run, so the optimizer is built for
        the same variables as when the checkpoint was written)."""

    def on_fit_start(self, trainer) -> None:
        """Before the first execution (the step is compiled, the checkpoint restored)."""

    def on_epoch_start(self, trainer, epoch: int) -> None:
        """Before the first execution of epoch ``epoch`` (0-based)."""

    def on_execution_end(self, trainer, global_step: int, logs: dict) -> None:
        """After each execution; ``logs`` are means over its steps (``train/...``)."""

    def on_rollback(self, trainer, global_step: int, line: str) -> None:
        """After the trainer rolled the training state back on a blow-up
        (``trainer.recovery``): ``global_step`` is where it blew up, ``line`` says why and
        to where; ``trainer.current_step`` is the step it went back to."""

    def on_validation_end(self, trainer, global_step: int, logs: dict) -> None:
        """After every validation: at each epoch's end (before ``on_epoch_end``, with the
        same logs) and, with ``trainer.val_every_n_steps``, at the steps between (an
        execution ends there); ``logs`` hold the open epoch's ``train/...`` means so far,
        ``val/...``, ``epoch`` (1-based, the epoch it falls in) and ``step``. Callbacks
        that judge validations (early stopping, the best checkpoint) judge them here."""

    def on_epoch_end(self, trainer, epoch: int, logs: dict) -> None:
        """After evaluation; ``logs`` hold ``train/...``, ``val/...``, ``epoch``, ``step``."""

    def on_fit_end(self, trainer, logs: dict) -> None:
        """After the last epoch, also when training stopped early."""


def improved(value: float, best: float, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` (``mode``: min or max)."""
    return value < best - min_delta if mode == "min" else value > best + min_delta


def ship_best(trainer, monitor: str, best: float) -> None:
    """Tell ``trainer`` whose weights the models now hold: the validation whose ``monitor``
    log is ``best`` (the first that reached it, since a later one had to beat it), an
    epoch's end (``weights_epoch``) or one between (``weights_step`` too); None when no
    validation logged it."""
    found = [logs for logs in (*trainer.history, *trainer.validations)
             if logs.get(monitor) == best]
    logs = min(found, key=lambda logs: logs["step"]) if found else None
    trainer.weights_epoch = logs["epoch"] if logs else None
    ended = logs is not None and any(h["step"] == logs["step"] for h in trainer.history)
    trainer.weights_step = logs["step"] if logs and not ended else None


def resolve(trainer, path: str) -> Path:
    """A callback's path, relative to the trainer's run directory unless absolute."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(trainer.run_dir) / p


def callback_states(callbacks, trainer) -> dict:
    """``{state_key: state()}`` of the callbacks that have state, for the training state.

    Raises a ``UserError`` when a callback with state has no ``state_key`` or two
    share one (two ``EarlyStopping`` callbacks: set ``state_key`` on one instance).
    """
    states = {}
    for cb in callbacks:
        state = cb.state(trainer)
        if not state:
            continue
        key = cb.state_key
        if not key:
            raise UserError(f"callback {type(cb).__name__} has state but no state_key; "
                            "set the class attribute state_key")
        if key in states:
            raise UserError(f"two callbacks save their state as callbacks/{key}; give one "
                            "of them another state_key")
        states[key] = state
    return states
