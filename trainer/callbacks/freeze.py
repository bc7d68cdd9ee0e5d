"""FreezeSchedule: unfreeze variables at given epochs; the trainer then recompiles its step."""

from __future__ import annotations

from trainer.callbacks.base import Callback
from trainer.errors import UserError
from trainer.freeze import _matched, set_trainable


class FreezeSchedule(Callback):
    """Unfreezes variables matched by glob patterns at the start of given epochs.

    Args:
        unfreeze: a list of ``{"at_epoch": N, "patterns": [...]}``; the variables
            are trainable from epoch N on (epochs count from 1). Before the next
            execution the trainer sees the new trainable set, builds optimizer state
            for it outside tf.function, and retraces the step (the Keras
            "recompile after changing trainable" chore, done for you).
    """

    def __init__(self, *, unfreeze):
        self.unfreeze = [dict(u) for u in unfreeze]
        for i, u in enumerate(self.unfreeze):
            if set(u) != {"at_epoch", "patterns"} or int(u["at_epoch"]) < 1:
                raise UserError(f"freeze.unfreeze[{i}] needs at_epoch >= 1 and patterns")

    def on_fit_start(self, trainer):
        models = list(trainer.step.models.values())
        for i, u in enumerate(self.unfreeze):
            _matched(models, u["patterns"], f"freeze.unfreeze[{i}].patterns")

    def on_epoch_start(self, trainer, epoch):
        for i, u in enumerate(self.unfreeze):
            if int(u["at_epoch"]) == epoch + 1:
                set_trainable(trainer.step.models.values(), list(u["patterns"]), True,
                              where=f"freeze.unfreeze[{i}].patterns")
