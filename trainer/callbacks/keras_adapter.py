"""KerasCallbacks: standard ``keras.callbacks.Callback`` objects in the trainer's loop."""

from __future__ import annotations

import json
import os

import tensorflow as tf

from trainer.callbacks.base import Callback, resolve, ship_best
from trainer.common.errors import UserError

#: What a resumed run needs of Keras' stateful callbacks (subclasses too): the attributes
#: their ``on_train_begin`` resets or their decisions read. Early stopping's best weights,
#: when it restores them, are saved as variables beside these.
KERAS_STATE = {
    "EarlyStopping": ("wait", "stopped_epoch", "best", "best_epoch"),
    "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
    "ModelCheckpoint": ("best",),
}


def keras_logs(logs: dict) -> dict:
    """The trainer's logs under the names Keras callbacks expect: ``train/loss`` ->
    ``loss``, ``val/accuracy`` -> ``val_accuracy``, ``reg/x`` -> ``reg_x``; the epoch
    and step counters left out."""
    return {keras_name(key): value for key, value in logs.items()
            if key not in ("epoch", "step") and isinstance(value, int | float)}


def keras_name(key: str) -> str:
    """The name Keras callbacks know a trainer log by (``keras_logs``)."""
    if key.startswith("train/"):
        key = key[len("train/"):]
    elif key.startswith("val/"):
        key = "val_" + key[len("val/"):]
    return key.replace("/", "_")


class _OptimizerView:
    """The step's optimizer as one Keras optimizer: ``learning_rate`` (get and set, every
    parameter group following) and ``iterations``. Not its groups: Keras callbacks
    treat an ``optimizers`` attribute as a list of optimizers."""

    def __init__(self, optimizer):
        self._optimizer = optimizer

    @property
    def learning_rate(self):
        return self._optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value) -> None:
        self._optimizer.learning_rate = value

    @property
    def iterations(self):
        return self._optimizer.iterations


class _ModelView:
    """What a Keras callback sees as ``self.model``: the step's model, with the step's
    optimizer as ``optimizer`` and the trainer's ``stop_training``."""

    def __init__(self, model, optimizer, trainer):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_optimizer", optimizer)
        object.__setattr__(self, "_trainer", trainer)

    @property
    def optimizer(self):
        return self._optimizer

    @property
    def stop_training(self) -> bool:
        return self._trainer.stop_training

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        self._trainer.stop_training = bool(value)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __setattr__(self, name, value):
        if name == "stop_training":
            type(self).stop_training.fset(self, value)
        else:
            setattr(self._model, name, value)


class KerasCallbacks(Callback):
    """Runs standard Keras callbacks (``EarlyStopping``, ``ReduceLROnPlateau``,
    ``TerminateOnNaN``, ``CSVLogger``, your own) with the events, logs and
    ``model.stop_training`` they expect.

    Events: ``on_train_begin`` at the start of fit, ``on_epoch_begin``/``on_epoch_end``
    at each epoch (logs renamed the Keras way: ``loss``, ``accuracy``, ``val_loss``,
    ``val_accuracy``, ``learning_rate``), ``on_train_batch_end`` after every compiled
    execution (its mean logs; ``batch`` is the execution's last step in the epoch), and
    ``on_train_end``. ``self.model`` is the step's model (``model``: which, by name)
    whose ``optimizer`` is the step's optimizer: ``ReduceLROnPlateau`` sets its learning
    rate (every parameter group keeps its scale). Setting ``model.stop_training`` stops
    the trainer after the current execution.

    Relative ``filename``/``filepath`` attributes (``CSVLogger``, ``ModelCheckpoint``)
    are taken relative to the run directory; ``CSVLogger`` appends when the run resumes.
    The state of Keras' stateful callbacks is part of the trainer's checkpoint (``state()``,
    ``KERAS_STATE``): ``EarlyStopping``'s wait, best, stopped and best epoch (and its best
    weights with ``restore_best_weights``), ``ReduceLROnPlateau``'s wait, best and cooldown,
    ``ModelCheckpoint``'s best; a resumed run continues them where they were, after their
    ``on_train_begin``. Other callbacks' attributes start afresh. On the workers of a
    multi-worker run other than the chief, callbacks that write files are left out.

    Args:
        callbacks: ``keras.callbacks.Callback`` objects (from YAML: ``_target_`` nodes).
        model: the name of the step's model they see (``"model"``; a GAN's ``"generator"``).
    """

    state_key = "keras"

    def __init__(self, *, callbacks=(), model: str = "model"):
        import keras

        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, keras.callbacks.Callback):
                raise UserError(f"callbacks.keras: {cb!r} is not a keras.callbacks.Callback")
        self.model = model
        self._states: dict[int, _KerasState] = {}  # by id() of the Keras callback
        self._saved: dict | None = None  # state(), made once
        self._restored = False

    def _model(self, trainer):
        models = trainer.models
        if self.model not in models:
            raise UserError(f"callbacks.keras.model={self.model!r} is not one of the step's "
                            f"models {sorted(models)}")
        return models[self.model]

    def state(self, trainer) -> dict:
        """Each stateful Keras callback's state under ``<Class>_<position>`` (its place in
        ``callbacks``): its attributes as JSON (``attributes``) and early stopping's best
        weights (``best_weights``, variables shaped like the model's weights)."""
        if self._saved is None:
            import keras

            self._saved = {}
            for i, cb in enumerate(self.callbacks):
                attributes = next((attrs for name, attrs in KERAS_STATE.items()
                                   if isinstance(cb, getattr(keras.callbacks, name))), ())
                if not attributes:
                    continue
                weights = None
                if getattr(cb, "restore_best_weights", False):
                    weights = [tf.Variable(v, trainable=False, name="best_weight")
                               for v in self._model(trainer).weights]
                state = self._states[id(cb)] = _KerasState(cb, attributes, weights)
                entry = {"attributes": state}
                if weights is not None:
                    entry["best_weights"] = weights
                self._saved[f"{type(cb).__name__}_{i}"] = entry
        return self._saved

    def on_restore(self, trainer):
        # Applied once the callbacks' on_train_begin, which resets them, has run.
        self._restored = True

    def on_fit_start(self, trainer):
        model = self._model(trainer)
        optimizers = trainer.optimizers
        optimizer = optimizers.get(self.model) or next(iter(optimizers.values()))
        view = _ModelView(model, _OptimizerView(optimizer), trainer)
        if not trainer.is_chief:
            self.callbacks = [cb for cb in self.callbacks if not _writes_files(cb)]
        for cb in self.callbacks:
            for attr in ("filename", "filepath"):
                path = getattr(cb, attr, None)
                if isinstance(path, str | os.PathLike) and not os.path.isabs(path):
                    setattr(cb, attr, str(resolve(trainer, str(path))))
            if trainer.restored_from and hasattr(cb, "append"):
                cb.append = True  # CSVLogger: continue the file of the run it resumes
            cb.set_model(view)
            cb.set_params({"epochs": trainer.epochs, "steps": trainer.steps_per_epoch,
                           "verbose": 0})
            cb.on_train_begin({})
        for state in self._states.values():
            if self._restored:
                state.apply()
            state.restored = None
        self._restored = False

    def on_epoch_start(self, trainer, epoch):
        for cb in self.callbacks:
            cb.on_epoch_begin(epoch, {})

    def on_execution_end(self, trainer, global_step, logs):
        batch = (global_step - 1) % max(trainer.steps_per_epoch, 1)
        out = keras_logs(logs)
        for cb in self.callbacks:
            cb.on_train_batch_end(batch, dict(out))

    def on_validation_end(self, trainer, global_step, logs):
        # Keras knows validation at epoch ends only: with trainer.val_every_n_steps, each
        # validation is an epoch end to its callbacks (ReduceLROnPlateau's patience counts
        # validations, as the trainer's early stopping does).
        if trainer.val_every_n_steps:
            self._epoch_end(logs["epoch"] - 1, logs)

    def on_epoch_end(self, trainer, epoch, logs):
        if not trainer.val_every_n_steps:
            self._epoch_end(epoch, logs)

    def _epoch_end(self, epoch, logs):
        out = keras_logs(logs)
        for cb in self.callbacks:
            cb.on_epoch_end(epoch, dict(out))
            if id(cb) in self._states:
                self._states[id(cb)].keep_best_weights()

    def on_fit_end(self, trainer, logs):
        if trainer.preempted:
            # Training is not over: a resumed run goes on from the last weights, and its
            # end calls on_train_end (EarlyStopping's restore_best_weights) instead.
            return
        out = keras_logs(logs)
        for cb in self.callbacks:
            cb.on_train_end(dict(out))
            if getattr(cb, "restore_best_weights", False) and cb.best_weights is not None:
                # Keras' EarlyStopping gave the model the weights of its best epoch: with
                # trainer.val_every_n_steps, of its best validation, found by its value.
                if trainer.val_every_n_steps:
                    ship_best(trainer, _trainer_key(cb.monitor, logs), float(cb.best))
                else:
                    trainer.weights_epoch = cb.best_epoch + 1


class _KerasState(tf.train.experimental.PythonState):
    """One Keras callback's ``KERAS_STATE`` attributes, as JSON in the checkpoint, and
    early stopping's best weights as variables.

    Serialized from the live callback when a checkpoint is written. Read back into
    ``restored`` and applied (``apply``) only after the callback's ``on_train_begin``,
    which would reset them; until then a save writes what was read back.
    """

    def __init__(self, callback, attributes: tuple, weights: list | None):
        self.callback, self.attributes, self.weights = callback, attributes, weights
        self.restored: dict | None = None
        self._kept = None  # the best_weights list last copied into the variables

    def serialize(self) -> str:
        if self.restored is not None:
            return json.dumps(self.restored)
        cb = self.callback
        saved = {a: _plain(getattr(cb, a, None)) for a in self.attributes}
        saved["best_weights"] = getattr(cb, "best_weights", None) is not None
        return json.dumps(saved)

    def deserialize(self, string_value) -> None:
        text = string_value.decode() if isinstance(string_value, bytes) else string_value
        self.restored = json.loads(text)

    def keep_best_weights(self) -> None:
        """Copy new best weights (Keras keeps them as numpy arrays) into the variables."""
        best = getattr(self.callback, "best_weights", None)
        if self.weights is not None and best is not None and best is not self._kept:
            for variable, value in zip(self.weights, best):
                variable.assign(value)
            self._kept = best

    def apply(self) -> None:
        """Give the callback the restored attributes (and best weights)."""
        restored = self.restored or {}
        for attribute in self.attributes:
            if attribute in restored:
                setattr(self.callback, attribute, restored[attribute])
        if restored.get("best_weights") and self.weights is not None:
            self.callback.best_weights = self._kept = [v.numpy() for v in self.weights]


def _trainer_key(keras_key: str, logs: dict) -> str | None:
    """The key of ``logs`` that Keras knows as ``keras_key`` (``keras_name`` backwards:
    ``val_loss`` -> ``val/loss``, ``val_ema_loss`` -> ``val_ema/loss``); None if none is."""
    return next((key for key in logs if keras_name(key) == keras_key), None)


def _plain(value):
    """A JSON value of a callback attribute (numpy and tensor scalars as Python numbers)."""
    if hasattr(value, "numpy"):
        value = value.numpy()
    return value.item() if hasattr(value, "item") else value


def _writes_files(callback) -> bool:
    return any(isinstance(getattr(callback, a, None), str | os.PathLike)
               for a in ("filename", "filepath", "log_dir", "backup_dir"))
