"""Transfer learning on digits: a pretrained backbone, frozen, then partly unfrozen."""

from __future__ import annotations

import logging

import keras

from trainer.common.errors import UserError

log = logging.getLogger(__name__)


def _dense_backbone(input_shape, units, activation, dropout):
    layers = [keras.Input(shape=tuple(input_shape))]
    if len(input_shape) > 1:
        layers.append(keras.layers.Flatten(name="flatten"))
    for i, n in enumerate(units):
        layers.append(keras.layers.Dense(int(n), activation=activation, name=f"dense_{i}"))
        if dropout > 0:
            layers.append(keras.layers.Dropout(dropout, name=f"dropout_{i}"))
    return keras.Sequential(layers, name="backbone")


def _pretrained_backbone(input_shape, units, activation, dropout, *, classes, epochs,
                         learning_rate, batch_size, seed):
    """Train a fresh backbone with a throwaway head on the digits ``classes``."""
    from trainer.data import Batching, digits
    from trainer.step.tape_step import TapeStep
    from trainer.training.trainer import Trainer

    source = digits(classes=list(classes), batching=Batching(batch_size=batch_size, seed=seed))
    if source.input_shape != tuple(input_shape):
        raise UserError(f"model.pretrain_classes: the digits source task has inputs "
                        f"{source.input_shape}, the run's data {tuple(input_shape)}; set "
                        "model.backbone_path to a backbone trained on data like the run's")
    backbone = _dense_backbone(input_shape, units, activation, dropout)
    model = keras.Sequential(
        [keras.Input(shape=tuple(input_shape)), backbone,
         keras.layers.Dense(source.num_outputs, name="pretrain_head")],
        name="pretrain",
    )
    log.info("pretraining the backbone on digits %s for %d epochs", list(classes), epochs)
    step = TapeStep(model=model, optimizer=keras.optimizers.Adam(learning_rate))
    # This framework's own loop, without callbacks: nothing is written to the run directory.
    logs = Trainer(epochs=epochs).fit(step, source)
    log.info("pretrained backbone: source-task val/accuracy %.4f", logs["val/accuracy"])
    return backbone


def _loaded_backbone(path, input_shape):
    """Every layer but the last (the head) of a saved Sequential model, as a new "backbone".

    The layers are rebuilt from their configs under the name ``backbone`` and
    given the saved weights, so variable paths read ``backbone/<layer>/...``
    whatever the saved model was called (freeze patterns rely on that).
    """
    try:
        source = keras.models.load_model(path)
    except (OSError, ValueError) as e:
        raise UserError(f"model.backbone_path={path!r}: cannot load it ({e})") from None
    if not isinstance(source, keras.Sequential) or len(source.layers) < 2:
        raise UserError(f"model.backbone_path={path!r} must be a Sequential model with a head "
                        "layer last, such as the model.keras of a dense run")
    if tuple(source.input_shape[1:]) != tuple(input_shape):
        raise UserError(f"model.backbone_path={path!r} takes inputs {source.input_shape[1:]}, "
                        f"the data has {tuple(input_shape)}")
    kept = source.layers[:-1]
    clones = [type(layer).from_config(layer.get_config()) for layer in kept]
    backbone = keras.Sequential([keras.Input(shape=tuple(input_shape)), *clones],
                                name="backbone")
    for old, new in zip(kept, clones):
        new.set_weights(old.get_weights())
    log.info("loaded the backbone from %s (%s)", path, ", ".join(lay.name for lay in kept))
    return backbone


def transfer_model(
    *,
    input_shape: tuple[int, ...],
    num_outputs: int,
    backbone_units: list[int] = (256, 128),
    activation: str = "relu",
    dropout: float = 0.0,
    backbone_path: str | None = None,
    pretrain_classes: list[int] = (0, 1, 2, 3, 4),
    pretrain_epochs: int = 20,
    pretrain_learning_rate: float = 1e-3,
    pretrain_batch_size: int = 64,
    seed: int = 0,
    name: str = "transfer",
):
    """A backbone (a nested Keras model named ``backbone``) and a fresh Dense ``head``.

    The backbone is either loaded from ``backbone_path`` (a saved Sequential model
    such as a dense run's ``model.keras``, its last layer dropped) or, by
    default, built from ``backbone_units`` (layers ``dense_<i>``) and pretrained
    in-process for ``pretrain_epochs`` on the digits ``pretrain_classes`` with
    this framework's ``Trainer``. Its variables are ``backbone/dense_<i>/...``,
    what ``freeze.patterns`` and ``optimizer.groups`` refer to.
    """
    if backbone_path:
        backbone = _loaded_backbone(backbone_path, input_shape)
    else:
        backbone = _pretrained_backbone(
            input_shape, backbone_units, activation, dropout, classes=pretrain_classes,
            epochs=int(pretrain_epochs), learning_rate=float(pretrain_learning_rate),
            batch_size=int(pretrain_batch_size), seed=int(seed),
        )
    return keras.Sequential(
        [keras.Input(shape=tuple(input_shape)), backbone,
         keras.layers.Dense(int(num_outputs), name="head")],
        name=name,
    )
