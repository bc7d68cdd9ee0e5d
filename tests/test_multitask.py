"""The multitask experiment: PCGrad by hand, persistent-tape gradients, eager vs compiled, Hydra."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import Trainer
from trainer.common.keys import SAMPLED
from trainer.data import Batching, digits
from trainer.experiments.multitask import MultitaskStep, pcgrad, two_head_mlp


def _const(*values):
    return tf.constant(values, tf.float32)


def test_pcgrad_projects_conflicting_gradients_by_hand():
    # g1.g2 = -1 < 0: g1' = g1 - (-1/2) g2 = [0.5, 0.5]; g2' = g2 - (-1/1) g1 = [0, 1].
    out, conflict = pcgrad({"a": [_const(1.0, 0.0)], "b": [_const(-1.0, 1.0)]})
    assert bool(conflict)
    np.testing.assert_allclose(out["a"][0].numpy(), [0.5, 0.5], atol=1e-7)
    np.testing.assert_allclose(out["b"][0].numpy(), [0.0, 1.0], atol=1e-7)
    # Each projected gradient is orthogonal to the other task's original gradient.
    assert float(tf.reduce_sum(out["a"][0] * _const(-1.0, 1.0))) == pytest.approx(0.0)


def test_pcgrad_works_on_the_flattened_gradient_of_several_variables():
    # Two variables per task; the dot product is over both: 1*(-2) + (0*1 + 1*0) = -2.
    a = [tf.constant([1.0]), tf.constant([0.0, 1.0])]
    b = [tf.constant([-2.0]), tf.constant([1.0, 0.0])]
    out, conflict = pcgrad({"a": a, "b": b})
    assert bool(conflict)
    # a' = a - (-2 / 5) b = [1 - 0.8, 0 + 0.4, 1]; b' = b - (-2 / 2) a = [-1, 1, 1].
    np.testing.assert_allclose(out["a"][0].numpy(), [0.2], atol=1e-6)
    np.testing.assert_allclose(out["a"][1].numpy(), [0.4, 1.0], atol=1e-6)
    np.testing.assert_allclose(out["b"][0].numpy(), [-1.0], atol=1e-6)
    np.testing.assert_allclose(out["b"][1].numpy(), [1.0, 1.0], atol=1e-6)
    assert out["a"][1].shape == (2,)


def test_pcgrad_leaves_agreeing_gradients_alone():
    out, conflict = pcgrad({"a": [_const(1.0, 0.0)], "b": [_const(1.0, 1.0)]})
    assert not bool(conflict)
    np.testing.assert_array_equal(out["a"][0].numpy(), [1.0, 0.0])
    np.testing.assert_array_equal(out["b"][0].numpy(), [1.0, 1.0])


def test_pcgrad_compiled_equals_eager():
    g = {"a": [_const(1.0, 2.0, -3.0)], "b": [_const(-1.0, 0.5, 2.0)]}
    eager, c1 = pcgrad(g)
    compiled, c2 = tf.function(pcgrad)(g)
    assert bool(c1) and bool(c2)
    np.testing.assert_allclose(eager["a"][0].numpy(), compiled["a"][0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(eager["b"][0].numpy(), compiled["b"][0].numpy(), rtol=1e-6)


def _step(seed=0, optimizer=None):
    keras.utils.set_random_seed(seed)
    model = two_head_mlp(input_shape=(64,), num_outputs=10, hidden_units=[16, 8])
    return MultitaskStep(model=model, optimizer=optimizer or keras.optimizers.Adam(1e-2))


def _batch(n=32):
    data = digits(batching=Batching(batch_size=n))
    return tf.constant(data.x_train[:n]), tf.constant(data.y_train[:n])


@pytest.mark.parametrize("compiled", [False, True])
def test_persistent_tape_gradients_equal_separate_single_task_tapes(compiled):
    step = _step()
    x, y = _batch()
    shared, heads = step.split_variables()
    assert [v.path for v in heads["digit"]] == ["digit/kernel", "digit/bias"]
    assert [v.path for v in heads["parity"]] == ["parity/kernel", "parity/bias"]
    assert [v.path for v in shared] == ["trunk_0/kernel", "trunk_0/bias",
                                        "trunk_1/kernel", "trunk_1/bias"]

    def persistent():
        return step.task_gradients(x, y, shared, heads)[2]

    grads = (tf.function(persistent) if compiled else persistent)()
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for name, labels in (("digit", y), ("parity", y % 2)):
        with tf.GradientTape() as tape:  # one task, its own (non-persistent) tape
            loss = ce(labels, step.model(x, training=True)[name])
        expected = tape.gradient(loss, shared + heads[name])
        assert len(grads[name]) == len(expected)
        for g, e in zip(grads[name], expected):
            np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=1e-7)


def test_train_step_applies_the_sum_of_projected_trunk_gradients():
    step = _step(optimizer=keras.optimizers.SGD(0.1))
    step.build()
    x, y = _batch()
    shared, heads = step.split_variables()
    _, _, grads = step.task_gradients(x, y, shared, heads)
    k = len(shared)
    projected, conflict = pcgrad({n: grads[n][:k] for n in grads})
    before = [v.numpy().copy() for v in shared + heads["digit"] + heads["parity"]]
    logs = tf.function(step.train_step)((x, y))
    expected = [p + q for p, q in zip(projected["digit"], projected["parity"])]
    expected += grads["digit"][k:] + grads["parity"][k:]
    after = shared + heads["digit"] + heads["parity"]
    for v, b, g in zip(after, before, expected):
        np.testing.assert_allclose(v.numpy(), b - 0.1 * g.numpy(), rtol=1e-4, atol=1e-6)
    assert float(logs["pcgrad/conflict"]) == float(conflict)
    assert set(logs) >= {"loss", "loss/digit", "loss/parity", "accuracy/digit",
                         "accuracy/parity", "pcgrad/conflict", "pcgrad/cosine"}
    # The sampled gradient norm is the update's: of the projected trunk and the heads.
    assert float(logs[SAMPLED]["grad_norm"]) == pytest.approx(
        float(tf.linalg.global_norm(expected)), rel=1e-5)
    assert float(logs["loss"]) == pytest.approx(
        float(logs["loss/digit"]) + float(logs["loss/parity"]), rel=1e-6)


def _fit(run_eagerly):
    step = _step(seed=3)
    data = digits(batching=Batching(batch_size=64, seed=3))
    trainer = Trainer(epochs=1, max_steps=6, steps_per_execution=3, run_eagerly=run_eagerly)
    logs = trainer.fit(step, data)
    return logs, [v.numpy() for v in step.model.variables]


def test_eager_and_compiled_runs_agree():
    eager_logs, eager_weights = _fit(run_eagerly=True)
    compiled_logs, compiled_weights = _fit(run_eagerly=False)
    for a, b in zip(eager_weights, compiled_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for key in ("train/loss/digit", "train/loss/parity", "train/pcgrad/conflict",
                "train/pcgrad/conflict_steps", "val/accuracy/digit"):
        assert eager_logs[key] == pytest.approx(compiled_logs[key], rel=1e-4, abs=1e-6), key


def test_validation_metrics_cover_the_split_once():
    """val/accuracy/* is each head's accuracy over the 360 validation images, every time."""
    step = _step(seed=1)
    data = digits(batching=Batching(batch_size=64))  # 360 = 5 x 64 + 40: a short last batch
    trainer = Trainer(epochs=2, steps_per_execution=5)
    logs = trainer.fit(step, data)
    out = step.model(data.x_val)
    for name, labels in (("digit", data.y_val), ("parity", data.y_val % 2)):
        direct = np.mean(np.argmax(out[name].numpy(), axis=-1) == labels)
        assert logs[f"val/accuracy/{name}"] == pytest.approx(direct, abs=1e-6)
        for _ in range(2):  # evaluating again gives the same numbers
            assert trainer.evaluate()[f"val/accuracy/{name}"] == pytest.approx(direct, abs=1e-6)


def test_experiment_runs_through_hydra(make_cfg, tmp_path):
    from trainer.driver.run import run

    cfg = make_cfg("+experiment=multitask", "trainer.epochs=2", "trainer.max_steps=8",
                   "trainer.steps_per_execution=4", "model.hidden_units=[32]",
                   "callbacks.tensorboard.histogram_every_n_steps=4",
                   "callbacks.progress.mode=log")
    metrics = run(cfg, run_dir=tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for split in ("train", "val"):
        for key in ("loss", "loss/digit", "loss/parity", "accuracy/digit", "accuracy/parity"):
            assert f"{split}/{key}" in saved
    assert 0.0 <= saved["train/pcgrad/conflict"] <= 1.0
    assert "train/pcgrad/conflict_steps" in saved
    assert "val/pcgrad/conflict" not in saved
    assert saved["step"] == 8
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    assert set(reloaded(np.zeros((1, 64), "float32"))) == {"digit", "parity"}
