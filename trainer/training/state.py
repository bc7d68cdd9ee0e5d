"""The training state a restart needs, gathered from its owners into one checkpoint."""

from __future__ import annotations

import json
import logging

import tensorflow as tf

from trainer.callbacks.base import callback_states
from trainer.common.errors import UserError
from trainer.training.resume import check_compatible, restore

log = logging.getLogger(__name__)


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


#: The layout of the checkpoints this trainer writes and reads. Raise it whenever a key is
#: renamed or its meaning changes: a checkpoint of another version is refused, with one
#: line, rather than loaded into the wrong places. Version 1: written before versions were
#: recorded (no ``format_version`` key); 2: the version recorded, Keras callbacks' state.
FORMAT_VERSION = 2


class CheckpointVersionError(UserError):
    """A checkpoint written in another format version than this trainer reads."""


def format_version(path: str) -> int:
    """The format version a checkpoint was written in (1: before versions were recorded)."""
    reader = tf.train.load_checkpoint(path)
    key = "format_version/.ATTRIBUTES/VARIABLE_VALUE"
    return int(reader.get_tensor(key)) if reader.has_tensor(key) else 1


def check_format_version(path: str) -> None:
    """Raise ``CheckpointVersionError`` unless ``path`` is of ``FORMAT_VERSION``."""
    version = format_version(path)
    if version != FORMAT_VERSION:
        raise CheckpointVersionError(
            f"checkpoint {path} has format version {version}, this trainer reads version "
            f"{FORMAT_VERSION}: finish that run with the trainer release that wrote it, or "
            "start fresh with trainer.resume=never (or another hydra.run.dir)")


class TrainingState:
    """Everything a restart needs, in one ``tf.train.Checkpoint``: made, saved and restored
    here, and nowhere else.

    ``TrainingState.of(trainer, ...)`` gathers it at the start of ``fit``:

    - ``format_version``: ``FORMAT_VERSION``, the layout of the keys below;
    - ``global_step``, ``epoch``, ``progress``: the trainer's counters and its host-side
      progress (``Progress``: the epochs' history, the open epoch's running sums, the
      timers, the compile plan);
    - ``models``, ``optimizers``: the step's (optimizer slots and iterations);
    - ``seed_generators``: the models' random-number state (``seed_generators``);
    - ``step``: the step's own state (``Step.state()``: regularizers, reset policy, metrics);
    - ``data``: the training source's order and position (``Source.state()``);
    - ``callbacks``: each stateful callback's ``state()`` under its ``state_key`` (early
      stopping, the best checkpoint's value, the freeze schedule, Keras callbacks);
    - ``averages``: with ``trainer.ema``, the weight average (``WeightAverage``).

    The objects are tracked, not copied: a save writes their current values. The
    checkpoint callback saves through ``manager`` and ``save``; resuming reads back with
    ``restore_callbacks`` (before the step is compiled) and ``restore`` (after), each of
    which first refuses a checkpoint of another format version or another run.

    Args:
        objects: the trackables to save, by key (``of`` gives the trainer's).
    """

    def __init__(self, **objects):
        self.version = tf.Variable(FORMAT_VERSION, dtype=tf.int64, trainable=False,
                                   name="format_version")
        #: What is saved, by key: ``objects`` and ``format_version``.
        self.objects = {"format_version": self.version, **objects}
        #: The ``tf.train.Checkpoint`` that is written (``trainer.checkpoint``).
        self.checkpoint = tf.train.Checkpoint(**self.objects)

    @classmethod
    def of(cls, trainer, *, step, source, callbacks) -> TrainingState:
        """The training state of ``trainer`` running ``step`` on ``source``."""
        return cls(
            global_step=trainer.global_step,
            epoch=trainer.epoch_variable,
            progress=trainer.progress,
            models=step.models,
            optimizers=step.optimizers,
            seed_generators=seed_generators(step.models),
            step=step.state(),
            data=source.state(),
            callbacks=callback_states(callbacks, trainer),
            # The weight average (trainer.ema), only when there is one.
            **({"averages": trainer.averages} if trainer.averages is not None else {}),
        )

    def manager(self, directory: str, max_to_keep: int) -> tf.train.CheckpointManager:
        """A ``tf.train.CheckpointManager`` of this state in ``directory``, numbering
        checkpoints by global step (``<directory>/ckpt-<step>``)."""
        return tf.train.CheckpointManager(self.checkpoint, str(directory),
                                          max_to_keep=max_to_keep)

    def save(self, manager: tf.train.CheckpointManager, global_step: int) -> str:
        """Write the state as ``manager``'s checkpoint ``global_step``; return its path.

        TensorFlow writes to temporary files and renames them when complete, and updates
        the index last, so a save cut short by a kill leaves the previous ones intact.
        """
        if manager.checkpoint is not self.checkpoint:
            raise ValueError("the manager saves another checkpoint than this training state")
        path = manager.save(checkpoint_number=global_step)
        log.debug("saved checkpoint %s", path)
        return path

    def restore_callbacks(self, path: str) -> None:
        """Read the callbacks' state back from ``path``, alone (what it implies, such as
        the freeze schedule's unfreezes, decides what the step is compiled for).

        Checked first, like the rest: no part of a foreign checkpoint is loaded.
        """
        check_format_version(path)
        part = tf.train.Checkpoint(callbacks=self.checkpoint.callbacks)
        check_compatible(part, path, prefix="callbacks/")
        part.read(path).expect_partial()

    def restore(self, path: str) -> None:
        """Read the whole state back from ``path``: every object gets its value, or, for a
        checkpoint of another format version, model or config, none does."""
        check_format_version(path)
        restore(self.checkpoint, path)


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
        plan: the compile plan the run was compiled by (``CompilePlan.to_json``; a resumed
            run keeps it), or None before the first fit.
        rollbacks, lr_scale: rollbacks on blow-up so far and the learning-rate scale they
            left (``trainer.training.recovery``): a resumed run goes on with both.
        validations: the logs of the validations between epoch ends
            (``trainer.val_every_n_steps``), in order.
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
        self.plan: dict | None = None
        self.rollbacks = 0
        self.lr_scale = 1.0
        self.validations: list[dict] = []

    _FIELDS = ("history", "open_epoch", "sums", "examples", "state", "stopped",
               "steps_per_epoch", "train_seconds", "fit_seconds", "plan", "rollbacks", "lr_scale",
               "validations")

    def serialize(self) -> str:
        return json.dumps({k: getattr(self, k) for k in self._FIELDS})

    def deserialize(self, string_value) -> None:
        text = string_value.decode() if isinstance(string_value, bytes) else string_value
        saved = json.loads(text)
        for k in self._FIELDS:
            setattr(self, k, saved.get(k, getattr(Progress(), k)))  # fields added later
