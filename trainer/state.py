"""The training state a restart needs, gathered from its owners into one checkpoint."""

from __future__ import annotations

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


def training_checkpoint(*, global_step, epoch, step, source, callbacks) -> tf.train.Checkpoint:
    """One ``tf.train.Checkpoint`` of everything that must survive a restart.

    - ``global_step``, ``epoch``: the trainer's counters;
    - ``models``, ``optimizers``: the step's (optimizer slots and iterations);
    - ``seed_generators``: the models' random-number state (``seed_generators``);
    - ``step``: the step's own state (``Step.state()``: regularizers, reset policy);
    - ``data``: the training source's order and position (``Source.state()``);
    - ``callbacks``: each stateful callback's ``state()`` under its ``state_key``.

    The objects are tracked, not copied: a save writes their current values.
    """
    return tf.train.Checkpoint(
        global_step=global_step,
        epoch=epoch,
        models=step.models,
        optimizers=step.optimizers,
        seed_generators=seed_generators(step.models),
        step=step.state(),
        data=source.state(),
        callbacks=callback_states(callbacks),
    )
