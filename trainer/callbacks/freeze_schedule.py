"""FreezeSchedule: unfreeze variables at given epochs; the trainer then recompiles its step."""

from __future__ import annotations

import logging

import tensorflow as tf

from trainer.callbacks.base import Callback
from trainer.common.errors import UserError
from trainer.step.freezing import _matched, set_trainable

log = logging.getLogger(__name__)


class FreezeSchedule(Callback):
    """Unfreezes variables matched by glob patterns at the start of given epochs.

    Args:
        unfreeze: a list of ``{"at_epoch": N, "patterns": [...]}``; the variables
            are trainable from epoch N on (epochs count from 1). Before the next
            execution the trainer sees the new trainable set, builds optimizer state
            for it outside tf.function, and retraces the step (the Keras
            "recompile after changing trainable" chore, done for you).

    Entries apply in order of ``at_epoch`` (ties in list order), each once: at the
    start of the first epoch ``epoch`` with ``epoch + 1 >= at_epoch``.

    Restarts. ``state()`` holds ``position``, how many entries have been applied,
    saved with the weights. Trainable flags are not checkpointed: a resumed run
    builds fresh models, frozen again by ``freeze.patterns``, while the restored
    weights were trained with the first ``position`` entries applied. So
    ``on_restore`` (the trainer calls it before building the optimizer, which then
    gets slots for the same variables as when the checkpoint was written) re-applies
    those entries to the fresh models, and the epoch rule applies the rest. Which
    entries *these* models have had is tracked apart from the checkpointed position
    (which a restore overwrites), so no entry is applied twice or skipped.
    """

    state_key = "freeze_schedule"

    def __init__(self, *, unfreeze):
        self.unfreeze = [dict(u) for u in unfreeze]
        for i, u in enumerate(self.unfreeze):
            if set(u) != {"at_epoch", "patterns"} or int(u["at_epoch"]) < 1:
                raise UserError(f"freeze.unfreeze[{i}] needs at_epoch >= 1 and patterns")
        # (index in the config, entry) in schedule order; the index names the entry in errors.
        self._order = sorted(enumerate(self.unfreeze), key=lambda e: int(e[1]["at_epoch"]))
        self._position = tf.Variable(0, dtype=tf.int64, trainable=False, name="position")
        self._applied = 0  # entries applied to this process's models

    def state(self, trainer) -> dict:
        return {"position": self._position}

    @property
    def position(self) -> int:
        """How many entries (in ``at_epoch`` order) have been applied in this run."""
        return int(self._position.numpy())

    def on_restore(self, trainer):
        """Re-apply the entries the restored run had applied, before the optimizer is built."""
        restored = min(self.position, len(self._order))
        if restored > self._applied:
            log.info("freeze schedule: re-applying %d unfreeze entries of the restored run",
                     restored - self._applied)
            self._apply_through(trainer, restored)

    def on_fit_start(self, trainer):
        models = list(trainer.models.values())
        for i, u in self._order:
            _matched(models, u["patterns"], f"freeze.unfreeze[{i}].patterns")

    def on_epoch_start(self, trainer, epoch):
        due = sum(1 for _, u in self._order if epoch + 1 >= int(u["at_epoch"]))
        if due > self._applied:
            self._apply_through(trainer, due)

    def _apply_through(self, trainer, count: int) -> None:
        """Unfreeze entries ``_applied .. count - 1`` and record the new position."""
        for i, u in self._order[self._applied:count]:
            set_trainable(trainer.models.values(), list(u["patterns"]), True,
                          where=f"freeze.unfreeze[{i}].patterns")
        self._applied = count
        # Never backwards: a restored position ahead of the schedule (the run's config
        # changed) is kept for the next checkpoint.
        self._position.assign(max(count, self.position))
