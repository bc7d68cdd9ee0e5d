"""One owner of training state: every piece a restart needs is in the trainer's checkpoint."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import fit_linear, linear_model, regression_data
from trainer import Step, TapeStep, Trainer, UserError
from trainer.driver.run import run
from trainer.training.state import FORMAT_VERSION

STATEFUL_RUN = [
    "+experiment=dense", "data=synthetic", "data.task=classification", "trainer.epochs=3",
    "trainer.steps_per_execution=4", "model.dropout=0.5", "model.hidden_units=[16,8]",
    "tape.reset.when=[nonfinite]", "regularizer=input_gradient",
    "regularizer.input_gradient.every=2",
    "callbacks=early_stopping", "callbacks.early_stopping.patience=10",
    "callbacks.checkpoint.min_interval_seconds=0", "callbacks.progress.mode=log",
    "freeze.patterns=[mlp/dense_0/*]",
    "+freeze.unfreeze=[{at_epoch: 2, patterns: [mlp/dense_0/*]}]",
]


def _latest(run_dir):
    return tf.train.latest_checkpoint(str(run_dir / "checkpoints"))


def _names(path) -> set[str]:
    return {n.replace("/.ATTRIBUTES/VARIABLE_VALUE", "") for n, _ in tf.train.list_variables(path)}


@pytest.mark.slow
@pytest.mark.parametrize("in_memory", [True, False])
def test_checkpoint_holds_every_piece_of_training_state(make_cfg, tmp_path, in_memory):
    cfg = make_cfg(*STATEFUL_RUN, f"data.in_memory={str(in_memory).lower()}")
    metrics = run(cfg, run_dir=tmp_path)
    path = _latest(tmp_path)
    names = _names(path)

    def value(name):
        return tf.train.load_variable(path, name + "/.ATTRIBUTES/VARIABLE_VALUE")

    # The layout's version, and the trainer's counters.
    assert value("format_version") == FORMAT_VERSION == 2
    per_epoch = metrics["step"] // 3  # three full epochs ran (patience 10)
    assert value("global_step") == metrics["step"] and metrics["epoch"] == 3
    assert value("epoch") == 2
    # Models, and the optimizer's iterations and two Adam slots for every weight (the
    # unfrozen first layer included).
    shapes = dict(tf.train.list_variables(path))
    weights = [tuple(s) for n, s in shapes.items() if n.startswith("models/model/")]
    slots = [tuple(s) for n, s in shapes.items() if "optimizers/optimizer/" in n and
             "_variables/" in n]
    assert len(weights) == 6 and sorted(slots) == sorted(weights * 2)
    assert value("optimizers/optimizer/optimizers/base/_iterations") == metrics["step"]
    # The dropout layer's seed generator: a Keras model's own checkpoint leaves it out.
    assert {"seed_generators/model_0", "seed_generators/model_1"} <= names
    # The step's state: the reset policy's statistics and the lazy regularizer's last value.
    assert {"step/reset/resets", "step/reset/streak", "step/reset/window",
            "step/regularizers/input_gradient/last"} <= names
    assert value("step/reset/resets") == metrics["train/tape/resets"] == 0
    assert value("step/regularizers/input_gradient/last") > 0
    # The data order and position.
    if in_memory:
        assert {"data/epoch", "data/position", "data/seed"} <= names
        assert value("data/epoch") == 2 and value("data/position") == per_epoch
    else:
        assert any(n.startswith("data/iterator") for n in names)
    # Callback state: early stopping's best value and the freeze schedule's position.
    assert value("callbacks/early_stopping/best") == pytest.approx(
        min(h["val/loss"] for h in _history(tmp_path)), rel=1e-6)
    assert value("callbacks/freeze_schedule/position") == 1


def _history(run_dir):
    """The epochs' val/loss from the TensorBoard val event file."""
    from tests.tb_reader import load, scalars

    return [{"val/loss": v} for _, v in scalars(load(run_dir / "tb" / "val"), "loss")]


def test_checkpoint_of_a_two_model_step_keeps_models_and_optimizers_apart():
    # A GAN's models and optimizers share names (generator, critic): both must be saved.
    from trainer.data import Batching
    from trainer.experiments.gan import WganStep, gan_models, ring_of_gaussians

    data = ring_of_gaussians(n_samples=64, n_val=32, batching=Batching(batch_size=32))
    models = gan_models(input_shape=(2,), num_outputs=1, generator_units=[8],
                        critic_units=[8])
    optimizers = {"generator": keras.optimizers.Adam(1e-3),
                  "critic": keras.optimizers.Adam(1e-3)}
    trainer = Trainer(epochs=1, max_steps=2, steps_per_execution=2)
    trainer.fit(WganStep(model=models, optimizer=optimizers, n_critic=2), data)
    names = _names(trainer.checkpoint.write(str(trainer.run_dir) + "/../gan_ckpt/c"))
    for kind in ("models", "optimizers"):
        for name in ("generator", "critic"):
            assert any(n.startswith(f"{kind}/{name}/") for n in names), (kind, name)


@pytest.mark.slow
def test_the_checkpoint_tracks_live_objects(tmp_path):
    # Built once at fit start, it saves the values of the moment, not a copy.
    trainer, model, _ = fit_linear(epochs=1)
    first = trainer.checkpoint.write(str(tmp_path / "a"))
    trainer.epochs = 2
    trainer.fit(trainer.step, trainer.data)
    second = trainer.checkpoint.write(str(tmp_path / "b"))
    assert tf.train.load_variable(first, "global_step/.ATTRIBUTES/VARIABLE_VALUE") == 7
    assert tf.train.load_variable(second, "global_step/.ATTRIBUTES/VARIABLE_VALUE") == 14
    kernel = next(n for n, _ in tf.train.list_variables(second)
                  if n.startswith("models/model/") and "kernel" in n)
    np.testing.assert_array_equal(tf.train.load_variable(second, kernel),
                                  model.trainable_variables[0].numpy())


# --- the step contract ------------------------------------------------------------------
def test_fit_rejects_what_is_not_a_step_or_data():
    trainer = Trainer(epochs=1)
    with pytest.raises(UserError, match=r"is not a trainer\.Step"):
        trainer.fit(object(), regression_data())

    class NoUpdate(Step):
        pass

    with pytest.raises(UserError, match="NoUpdate does not define train_step"):
        trainer.fit(NoUpdate(models={"model": linear_model()},
                             optimizers={"optimizer": keras.optimizers.SGD()}),
                    regression_data())
    step = TapeStep(model=linear_model(), optimizer=keras.optimizers.SGD(), task="regression")
    with pytest.raises(UserError, match=r"is not a trainer\.data\.Data"):
        trainer.fit(step, object())


def test_a_minimal_step_subclassing_the_base_trains():
    class MeanSquared(Step):
        """Only train_step and test_step: every other member comes from the base."""

        def __init__(self, *, model, optimizer):
            super().__init__(models={"model": model}, optimizers={"optimizer": optimizer})
            self.model = model

        def train_step(self, batch, info=None):
            x, y = batch
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean((self.model(x) - y) ** 2)
            self.apply(tape, loss, self.trainable_variables, self.optimizers["optimizer"])
            return {"loss": loss}

        def test_step(self, batch):
            x, y = batch
            return {"loss": tf.reduce_mean((self.model(x) - y) ** 2)}

    model = linear_model()
    custom = MeanSquared(model=model, optimizer=keras.optimizers.SGD(0.05))
    logs = Trainer(epochs=2, steps_per_execution=4).fit(custom, regression_data())
    # The same updates as the default step with the same loss, optimizer and batches.
    _, reference, ref_logs = fit_linear(epochs=2)
    for a, b in zip(model.trainable_variables, reference.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert logs["val/loss"] == pytest.approx(ref_logs["val/loss"], rel=1e-5)
