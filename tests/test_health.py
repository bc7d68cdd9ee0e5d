"""Per-layer health: values against hand computations, where it runs, and its alerts."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import tb_reader
from trainer import Callback, HealthCallback, TapeStep, Trainer, UserError
from trainer.callbacks.health import ALERTS, Alerts, Thresholds
from trainer.data import Batching, DataModule

BATCH, STEPS_PER_EPOCH = 16, 4
LAYERS = ("sequential/dense_0", "sequential/head")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the health callback writes tb/ into the run directory


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * STEPS_PER_EPOCH, 3)).astype("float32")
    y = (x @ rng.normal(size=(3, 1)) + 0.5).astype("float32")
    return DataModule(train=(x, y), val=(x[:16], y[:16]), task="regression",
                      batching=Batching(batch_size=BATCH, seed=0, shuffle=False))


def _model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((3,)),
                             keras.layers.Dense(4, activation="relu", name="dense_0"),
                             keras.layers.Dense(1, name="head")], name="sequential")


class Record(Callback):
    """The trainer's health logs after each execution, with the weights around it."""

    def __init__(self):
        self.rows = []

    def on_fit_start(self, trainer):
        self._before = _weights(trainer)

    def on_execution_end(self, trainer, global_step, logs):
        after = _weights(trainer)
        self.rows.append((trainer.health_step, dict(trainer.health_logs), self._before, after))
        self._before = after


def _weights(trainer):
    return [v.numpy() for v in trainer.models["model"].trainable_variables]


def _fit(*, every=1, spe=1, steps=4, epochs=1, eager=False, distribution=None, accumulate=1,
         step_class=TapeStep, prepare=None, log_dir="tb", run_dir=".", **thresholds):
    scope = distribution.scope() if distribution is not None else _null()
    with scope:
        model = _model()
        if prepare is not None:
            prepare(model)
        step = step_class(model=model, optimizer=keras.optimizers.SGD(0.1), task="regression")
    health = HealthCallback(every_n_steps=every, min_interval_seconds=0.0, log_dir=log_dir,
                            **thresholds)
    record = Record()
    trainer = Trainer(epochs=epochs, max_steps=steps, steps_per_execution=spe, run_eagerly=eager,
                      jit_compile=False, callbacks=[health, record], distribution=distribution,
                      accumulate_steps=accumulate, run_dir=str(run_dir))
    trainer.fit(step, _data())
    return trainer, health, record


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _by_layer_norm(arrays, layer_of_index):
    out = {}
    for i, a in enumerate(arrays):
        out[layer_of_index[i]] = out.get(layer_of_index[i], 0.0) + float(np.sum(np.square(a)))
    return {k: np.sqrt(v) for k, v in out.items()}


@pytest.mark.parametrize("eager", [False, True], ids=["compiled", "eager"])
def test_values_match_a_hand_computation(tmp_path, eager):
    trainer, health, record = _fit(eager=eager, run_dir=tmp_path)
    x, y = _data().x_train, _data().y_train
    variables = trainer.models["model"].trainable_variables
    layer_of = [v.path.rsplit("/", 1)[0] for v in variables]
    assert [r[0] for r in record.rows] == [1, 2, 3, 4]  # every step, at its update's step
    for step, logs, before, after in record.rows:
        rows = slice((step - 1) * BATCH, step * BATCH)
        model = _model()
        model.set_weights(before)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x[rows]) - y[rows]))
        grads = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
        grad = _by_layer_norm(grads, layer_of)
        weight = _by_layer_norm(before, layer_of)
        delta = _by_layer_norm([a - b for a, b in zip(after, before)], layer_of)
        for layer in LAYERS:
            assert logs[f"health/{layer}/grad_norm"] == pytest.approx(grad[layer], rel=1e-5)
            assert logs[f"health/{layer}/weight_norm"] == pytest.approx(weight[layer], rel=1e-5)
            assert logs[f"health/{layer}/update_ratio"] == pytest.approx(
                delta[layer] / weight[layer], rel=1e-4)
            # Plain SGD: the update is the learning rate times the gradient.
            assert logs[f"health/{layer}/update_ratio"] == pytest.approx(
                0.1 * grad[layer] / weight[layer], rel=1e-4)
            assert logs[f"health/{layer}/nonfinite_fraction"] == 0.0
        assert f"health/{LAYERS[1]}/dead_fraction" not in logs  # the head is linear
    assert health.raised == []  # a healthy run raises no alert


def test_only_requested_executions_measure_at_their_first_step():
    # Epochs of 4 steps, 3 per execution: executions start at steps 0, 3, 4, 7, 8, 11;
    # the first is measured, and the first at or past each multiple of 4.
    trainer, _, record = _fit(every=4, spe=3, steps=12, epochs=3)
    assert [r[0] for r in record.rows] == [1, None, 5, None, 9, None]
    assert [bool(r[1]) for r in record.rows] == [True, False, True, False, True, False]
    assert trainer.health.keys() == sorted(record.rows[0][1], key=trainer.health.keys().index)


def _kill_units(units):
    def prepare(model):
        _, bias = model.get_layer("dense_0").weights
        b = bias.numpy()
        b[list(units)] = -100.0  # ReLU(x @ k - 100) is 0 for inputs of size ~1
        bias.assign(b)
    return prepare


def test_dead_fraction_counts_units_off_for_every_probe_example():
    _, health, record = _fit(steps=1, prepare=_kill_units([0, 2]))
    _, logs, before, _ = record.rows[0]
    probe = _data().x_train[:BATCH]  # the first batch of epoch 0, unshuffled
    out = np.maximum(probe @ before[0] + before[1], 0.0)
    expected = float(np.mean(np.all(out == 0.0, axis=0)))
    assert expected == 0.5
    assert logs["health/sequential/dense_0/dead_fraction"] == pytest.approx(expected)
    assert not any("dead" in a for a in health.raised)


def test_a_dead_layer_raises_one_alert(tmp_path, caplog):
    _, health, _ = _fit(steps=3, prepare=_kill_units(range(4)), log_dir=tmp_path / "tb")
    dead = [a for a in health.raised if "units are dead" in a]
    assert dead == ["step 1: layer sequential/dense_0: 100% of its units are dead (zero for "
                    "every probe example)"]  # once, though the layer stays dead
    assert "health alert: step 1: layer sequential/dense_0: 100%" in caplog.text
    texts = tb_reader.load(tmp_path / "tb" / "train").Tensors(ALERTS)
    assert texts and "units are dead" in texts[0].tensor_proto.string_val[0].decode()


class NormOfZeroBias(TapeStep):
    """The loss plus the norm of the head's bias, which starts at zero: d||b||/db is 0/0."""

    def compute_loss(self, x, y, training, sample_weight=None):
        loss, y_pred = super().compute_loss(x, y, training)
        return loss + tf.norm(self.model.get_layer("head").bias), y_pred


def test_non_finite_gradient_entries_are_counted_and_alerted():
    record, health = Record(), HealthCallback(every_n_steps=1, min_interval_seconds=0.0)
    trainer = Trainer(epochs=1, max_steps=1, steps_per_execution=1, jit_compile=False,
                      callbacks=[health, record])
    with pytest.raises(FloatingPointError):  # the NaN update poisons the validation loss
        trainer.fit(NormOfZeroBias(model=_model(), optimizer=keras.optimizers.SGD(0.1),
                                   task="regression"), _data())
    logs = record.rows[0][1]
    assert logs["health/sequential/head/nonfinite_fraction"] == pytest.approx(1 / 5)  # 4+1
    assert logs["health/sequential/dense_0/nonfinite_fraction"] == 0.0
    assert np.isfinite(logs["health/sequential/head/grad_norm"])  # of the finite entries
    assert any("layer sequential/head: 0.2 of its gradient entries are not finite" in a
               for a in health.raised)


def test_a_loss_scale_skipping_an_overflowed_update_raises_no_alert():
    # Under mixed float16 a scale of 2**40 overflows the first updates: the loss scale skips
    # them and halves; the health records the non-finite entries but raises no alert.
    from trainer.step.optimizers import LossScale

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        record, health = Record(), HealthCallback(every_n_steps=1, min_interval_seconds=0.0)
        step = TapeStep(model=_model(), optimizer=keras.optimizers.SGD(0.1), task="regression")
        step.use_loss_scale(LossScale(initial_scale=2.0**40))
        trainer = Trainer(epochs=1, max_steps=3, steps_per_execution=1, jit_compile=False,
                          callbacks=[health, record])
        trainer.fit(step, _data())
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert int(step.loss_scale.overflows.numpy()) == 3
    assert record.rows[0][1]["health/sequential/head/nonfinite_fraction"] > 0
    assert health.raised == []


def test_gradient_thresholds_raise_vanishing_and_exploding_alerts():
    _, health, _ = _fit(steps=3, exploding_grad_norm=1e-3, vanishing_grad_norm=1e-4)
    assert [a.split(": exploding")[0] for a in health.raised] == [
        f"step 1: layer {layer}" for layer in LAYERS]  # once each, not at steps 2 and 3
    _, health, _ = _fit(steps=3, vanishing_grad_norm=100.0, exploding_grad_norm=1e3)
    assert [a.split(": vanishing")[0] for a in health.raised] == [
        f"step 1: layer {layer}" for layer in LAYERS]


def test_an_update_ratio_jump_against_the_layers_history_is_alerted_once():
    # The running mean of log10 ratios: -3, then 0.9 * mean + 0.1 * new: -2.970, -2.973, -2.976.
    alerts = Alerts(Thresholds(update_ratio_decades=2.0, update_ratio_history=3))
    key = "health/m/dense/update_ratio"
    assert [alerts.check({key: r}, s) for s, r in enumerate([1e-3, 2e-3, 1e-3, 1e-3])] == \
        [[]] * 4
    assert alerts.check({key: 0.5}, 4) == [
        "step 4: layer m/dense: update/weight ratio 0.5 is 2.7 decades from its usual 0.00106"]
    assert alerts.check({key: 0.5}, 5) == []  # once per condition
    assert Alerts(Thresholds(update_ratio_history=3)).check({key: 0.5}, 0) == []  # no history


def test_bad_thresholds_are_user_errors():
    with pytest.raises(UserError, match=r"callbacks\.health\.every_n_steps=0"):
        HealthCallback(every_n_steps=0)
    with pytest.raises(UserError, match="vanishing_grad_norm must be below"):
        HealthCallback(vanishing_grad_norm=1.0, exploding_grad_norm=0.5)
    with pytest.raises(UserError, match=r"dead_fraction=0\.0"):
        HealthCallback(dead_fraction=0.0)
    with pytest.raises(UserError, match=r"min_interval_seconds=-1"):
        HealthCallback(min_interval_seconds=-1)


def test_event_files_hold_the_scalars_the_layout_and_no_other_run(tmp_path):
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    from tensorboard.util import tensor_util

    _, _, record = _fit(every=2, steps=4, log_dir=tmp_path / "tb")
    acc = tb_reader.load(tmp_path / "tb" / "train")
    expected = [(r[0], r[1]["health/sequential/head/grad_norm"]) for r in record.rows if r[1]]
    got = tb_reader.scalars(acc, "health/sequential/head/grad_norm")
    assert [s for s, _ in got] == [1, 3] == [s for s, _ in expected]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-6)
    (layout_event,) = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(
        layout_event.tensor_proto).item())
    titles = [c.title for c in layout.category]
    assert titles == ["health: all layers"] + [f"health: {layer}" for layer in LAYERS]
    tags = [t for c in layout.category[1:2] for ch in c.chart for t in ch.multiline.tag]
    assert r"^health/sequential/dense_0/grad_norm$" in [t.replace("\\", "") for t in tags]


def _compare(a_rows, b_rows, rel=1e-5):
    assert [r[0] for r in a_rows] == [r[0] for r in b_rows]
    for (_, a, _, _), (_, b, _, _) in zip(a_rows, b_rows):
        assert sorted(a) == sorted(b)
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=rel, abs=1e-7), k


@pytest.mark.slow
def test_mirrored_and_accumulated_equal_one_device():
    from trainer.distribute import Mirrored

    _, _, one = _fit(steps=4)
    _, _, mirrored = _fit(steps=4, distribution=Mirrored(cpu_replicas=2))
    _compare(one.rows, mirrored.rows)
    _, _, accumulated = _fit(steps=4, accumulate=2)
    _compare(one.rows, accumulated.rows)
    _, _, both = _fit(steps=4, accumulate=2, distribution=Mirrored(cpu_replicas=2))
    _compare(one.rows, both.rows)


def test_steps_without_health_report_none():
    from trainer import Step

    assert Step.health_model(object()) is None

    class OwnUpdate(TapeStep):
        def train_step(self, batch, info=None):
            return super().train_step(batch, info)

    step = OwnUpdate(model=_model(), optimizer=keras.optimizers.SGD(0.1), task="regression")
    assert step.health_model() is None
    trainer = Trainer(epochs=1, max_steps=2, steps_per_execution=1, jit_compile=False,
                      callbacks=[HealthCallback(every_n_steps=1)])
    trainer.fit(step, _data())
    assert trainer.health is None and trainer.health_logs == {}


def test_the_flag_turns_the_computation_off_in_the_graph():
    from trainer.step.layer_health import LayerHealth

    model = _model()
    health = LayerHealth(model, probe_x=_data().x_train[:BATCH])
    variables = model.trainable_variables
    grads = [tf.ones_like(v) for v in variables]

    @tf.function
    def measure():
        return health.logs(grads, variables, health.weights(variables))

    assert {float(v) for v in measure().values()} == {0.0}  # not requested: the empty branch
    health.request(True)
    on = {k: float(v) for k, v in measure().items()}
    assert on["health/sequential/head/grad_norm"] == pytest.approx(np.sqrt(5))
    assert on["health/sequential/dense_0/update_ratio"] == 0.0  # nothing was applied


def test_a_split_execution_keeps_the_health_of_its_first_step():
    from trainer.common.keys import EXAMPLES
    from trainer.compile.executions import merge_executions

    first = ({"loss": 1.0, EXAMPLES: 2.0}, {"health/l/grad_norm": 3.0, "global_step": 2.0})
    last = ({"loss": 2.0, EXAMPLES: 2.0}, {"health/l/grad_norm": 5.0, "global_step": 3.0})
    means, state = merge_executions(first, last)
    assert state == {"health/l/grad_norm": 3.0, "global_step": 3.0}
    assert means["loss"] == 1.5
