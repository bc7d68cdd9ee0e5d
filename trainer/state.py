"""The training state a restart needs, gathered from its owners into one checkpoint."""

from __future__ import annotations

import json

import tensorflow as tf

from trainer.callbacks.base import callback_states


def seed_generators(models: dict) -> dict:
    """The state variables of the models' Keras seed generators (dropout, noise layers).

    A ``tf.train.Checkpoint`` of a Keras model does not hold them, yet they decide
    the next dropout masks. Keyed by model name and position among the model's
    seed variables, which depends only on the architecture.
    """
    out = {}
    for name, model in models.items():
        seeds = [v for v in model.variables if v.name == "seed_generator_state"]
        out.update({f"{name}_{i}": v for i, v in enumerate(seeds)})
    return out


def training_checkpoint(trainer, *, step, source, callbacks) -> tf.train.Checkpoint:
    """One ``tf.train.Checkpoint`` of everything that must survive a restart.

    - ``global_step``, ``epoch``, ``progress``: the trainer's counters and its host-side
      progress (``Progress``: the epochs' history, the open epoch's running sums);
    - ``models``, ``optimizers``: the step's (optimizer slots and iterations);
    - ``seed_generators``: the models' random-number state (``seed_generators``);
    - ``step``: the step's own state (``Step.state()``: regularizers, reset policy);
    - ``data``: the training source's order and position (``Source.state()``);
    - ``callbacks``: each stateful callback's ``state()`` under its ``state_key``.

    The objects are tracked, not copied: a save writes their current values.
    """
    return tf.train.Checkpoint(
        global_step=trainer.global_step,
        epoch=trainer.epoch_variable,
        progress=trainer.progress,
        models=step.models,
        optimizers=step.optimizers,
        seed_generators=seed_generators(step.models),
        step=step.state(),
        data=source.state(),
        callbacks=callback_states(callbacks, trainer),
    )


class Progress(tf.train.experimental.PythonState):
    """The trainer's host-side progress, written into the checkpoint as JSON at each save.

    Nothing is copied while training: ``serialize`` runs only when a checkpoint is
    written, so keeping this state costs no step any time.

    Attributes:
        history: the logs of every finished epoch, in order.
        open_epoch: the epoch started and not yet ended (its steps may all be done:
            a resumed run then runs its evaluation and epoch-end callbacks), or None.
        sums, examples: the open epoch's example-weighted sums of the train logs and
            their total weight, so its means cover the whole epoch across a restart.
        state: the last execution's state logs (learning rate, counters).
        stopped: fit was ended by a callback (early stopping): a resumed run stays stopped.
        steps_per_epoch: of the run that wrote the checkpoint (a resumed run checks it).
        train_seconds, fit_seconds: time spent so far, across restarts.
        xla: whether ``jit_compile=auto`` chose XLA by timing both (None: not measured).
    """

    def __init__(self):
        self.history: list[dict] = []
        self.open_epoch: int | None = None
        self.sums: dict = {}
        self.examples = 0.0
        self.state: dict = {}
        self.stopped = False
        self.steps_per_epoch = 0
        self.train_seconds = 0.0
        self.fit_seconds = 0.0
        self.xla: bool | None = None

    _FIELDS = ("history", "open_epoch", "sums", "examples", "state", "stopped",
               "steps_per_epoch", "train_seconds", "fit_seconds", "xla")

    def serialize(self) -> str:
        return json.dumps({k: getattr(self, k) for k in self._FIELDS})

    def deserialize(self, string_value) -> None:
        text = string_value.decode() if isinstance(string_value, bytes) else string_value
        saved = json.loads(text)
        for k in self._FIELDS:
            setattr(self, k, saved.get(k, getattr(Progress(), k)))  # fields added later
