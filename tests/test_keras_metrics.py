"""Keras metric objects in the loop: kept over the epoch, equal to ``keras.Model.evaluate``."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from trainer import UserError
from trainer.driver.run import build
from trainer.step import metrics as trainer_metrics

# Keras metrics that are not means of batch values (AUC, precision, F1), one with a vector
# result (per-class F1) and integer-label ones.
METRICS = ("metrics=[{_target_: keras.metrics.AUC}, {_target_: keras.metrics.Precision}, "
           "{_target_: keras.metrics.Recall}, {_target_: keras.metrics.F1Score}, "
           "{_target_: keras.metrics.TopKCategoricalAccuracy, k: 2}, "
           "{_target_: keras.metrics.SparseTopKCategoricalAccuracy, k: 3}]")
# The learning rate is zero: the weights never change, so an epoch's training metrics are
# those of the fixed model over the training set, which Keras' evaluate also measures.
FROZEN = ["+experiment=dense", "callbacks=none", "model.dropout=0.0", "optimizer=sgd",
          "optimizer.learning_rate=0.0", "optimizer.momentum=0.0", "data.batch_size=100",
          "trainer.epochs=1", "trainer.steps_per_execution=4", METRICS]
MODES = {
    "compiled": [],
    "eager": ["trainer.run_eagerly=true"],
    "xla": ["trainer.jit_compile=true"],
    "mirrored": ["distribute=mirrored", "distribute.cpu_replicas=2"],
    "mirrored_xla": ["distribute=mirrored", "distribute.cpu_replicas=2",
                     "trainer.jit_compile=true"],
}


def keras_evaluate(model, metrics, x, y, sample_weight=None) -> dict:
    """``keras.Model.evaluate`` of the trainer's model (softmax on its logits) with fresh
    copies of ``metrics`` (weighted ones with ``sample_weight``): integer labels for Sparse*
    metrics, one-hot for the others."""
    probabilities = keras.Sequential([model, keras.layers.Softmax()])
    # The default accuracy is the trainer's own: Keras' SparseCategoricalAccuracy checks it.
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")
               if isinstance(m, trainer_metrics.Accuracy) else m for m in metrics]
    out = {}
    for sparse in (True, False):
        chosen = [type(m).from_config(m.get_config()) for m in metrics
                  if type(m).__name__.startswith("Sparse") == sparse]
        if not chosen:
            continue
        loss = "sparse_categorical_crossentropy" if sparse else "categorical_crossentropy"
        # Keras weighs only its weighted_metrics by the sample weights; ours are all weighted.
        probabilities.compile(loss=loss, **{"weighted_metrics" if sample_weight is not None
                                            else "metrics": chosen})
        labels = y if sparse else keras.utils.to_categorical(y, model.output_shape[-1])
        values = probabilities.evaluate(x, labels, sample_weight=sample_weight,
                                        batch_size=len(x), verbose=0, return_dict=True)
        out.update(values)
    return out


def flat(logs: dict, prefix: str) -> dict:
    """``{"auc": ..., "f1_score": [per class], ...}`` from ``train/auc``, ``train/f1_score/3``."""
    out: dict = {}
    for key, value in logs.items():
        if not key.startswith(prefix):
            continue
        name, _, index = key[len(prefix):].partition("/")
        if index.isdigit():
            out.setdefault(name, {})[int(index)] = value
        elif not index:
            out[name] = value
    return {k: [v[i] for i in sorted(v)] if isinstance(v, dict) else v for k, v in out.items()}


def _by_name(metrics, name):
    (metric,) = [m for m in metrics if m.name == name]
    return metric


def check_against_keras(logs, metrics, model, x, y, prefix, sample_weight=None):
    expected = keras_evaluate(model, metrics, x, y, sample_weight)
    got = flat(logs, prefix)
    # The loss too (Keras' from probabilities, clipped at 1e-7; the trainer's from logits).
    assert logs[f"{prefix}loss"] == pytest.approx(expected["loss"], rel=1e-4)
    for metric in metrics:
        want = np.asarray(expected[metric.name], np.float64)
        np.testing.assert_allclose(np.asarray(got[metric.name]), want, rtol=2e-5, atol=2e-6,
                                   err_msg=f"{prefix}{metric.name}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_epoch_metrics_equal_keras_evaluate(make_cfg, tmp_path, mode):
    r = build(make_cfg(*FROZEN, *MODES[mode]), tmp_path)
    logs = r.trainer.fit(r.step, r.data)
    data = r.data
    metrics = r.step.metric_sets["train"].metrics
    assert [m.name for m in metrics] == ["accuracy", "auc", "precision", "recall", "f1_score",
                                         "top_k_categorical_accuracy",
                                         "sparse_top_k_categorical_accuracy"]
    # Unweighted, the default accuracy is the stateless per-batch log (exact over the epoch).
    assert "accuracy" not in r.step.metric_sets["train"].used
    # 1,437 examples at batch 100: 15 steps in 4 executions, the last batch short.
    check_against_keras(logs, metrics, r.step.model, data.x_train, data.y_train, "train/")
    check_against_keras(logs, metrics, r.step.model, data.x_val, data.y_val, "val/")
    # Per-class F1 logs one value per class.
    assert len([k for k in logs if k.startswith("val/f1_score/")]) == 10


def test_metrics_are_reset_at_each_epoch_and_evaluation(make_cfg, tmp_path):
    r = build(make_cfg(*FROZEN, "trainer.epochs=3"), tmp_path)
    r.trainer.fit(r.step, r.data)
    # Over three epochs the counts are one epoch's, not three: reset when an epoch opens;
    # the validation copies hold one pass over the validation set.
    train, val = (_by_name(r.step.metric_sets[split].metrics, "sparse_top_k_categorical_accuracy")
                  for split in ("train", "val"))
    assert float(train.count.numpy()) == len(r.data.x_train) == 1437
    assert float(val.count.numpy()) == len(r.data.x_val) == 360


def test_logged_values_during_the_epoch_are_the_epoch_so_far(make_cfg, tmp_path, recorder):
    # Each execution logs the metric over the examples seen since the epoch opened: after the
    # first execution (4 batches of 100) it is Keras' value on those 400 examples.
    r = build(make_cfg(*FROZEN), tmp_path)
    seen = []

    class Logs(type(recorder)):
        def on_execution_end(self, trainer, global_step, logs):
            seen.append((global_step, dict(logs)))

    r.trainer.callbacks.append(Logs())
    r.trainer.fit(r.step, r.data)
    assert [s for s, _ in seen] == [4, 8, 12, 15]
    order = r.trainer.data_plan.train.order.numpy()[:400]  # epoch 0's first 400 examples
    metrics = r.step.metric_sets["train"].metrics
    auc = [m for m in metrics if m.name == "auc"]
    check_against_keras(seen[0][1], auc, r.step.model, r.data.x_train[order],
                        r.data.y_train[order], "train/")
    assert seen[0][1]["train/auc"] != pytest.approx(seen[-1][1]["train/auc"], abs=1e-7)


def test_a_skipped_step_leaves_the_metrics_alone(make_cfg, tmp_path):
    # A NaN feature in one training row: the reset policy skips that batch, and its
    # examples count neither in the loss's mean nor in the Keras metrics.
    r = build(make_cfg(*FROZEN, "data.shuffle=false", "tape.reset.when=[nonfinite]"), tmp_path)
    x = r.data.x_train.copy()
    x[150, 3] = np.nan  # in the second batch of 100
    r.data.x_train = x
    r.trainer._prepare(r.step, r.data)  # the sources again, over the changed array
    logs = r.trainer.fit(r.step, r.data)
    train = _by_name(r.step.metric_sets["train"].metrics, "sparse_top_k_categorical_accuracy")
    assert float(train.count.numpy()) == 1437 - 100
    # The loop's means leave the batch out as well: the epoch's accuracy is Keras' on the
    # other 1,337 examples.
    keep = np.ones(1437, bool)
    keep[100:200] = False
    check_against_keras(logs, [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
                        r.step.model, r.data.x_train[keep], r.data.y_train[keep], "train/")


@pytest.mark.slow
def test_a_run_resumed_mid_epoch_ends_with_the_same_metrics(make_cfg, tmp_path):
    # The metrics' state is part of the checkpoint: a run stopped after 8 of 15 steps and
    # resumed reports the uninterrupted run's epoch values.
    args = [*FROZEN[:4], "optimizer.learning_rate=0.05", *FROZEN[5:]]
    full = build(make_cfg(*args), tmp_path / "full")
    expected = full.trainer.fit(full.step, full.data)
    first = build(make_cfg(*args, "trainer.max_steps=8", "callbacks=default"), tmp_path / "cut")
    first.trainer.fit(first.step, first.data)
    again = build(make_cfg(*args, "callbacks=default"), tmp_path / "cut")
    logs = again.trainer.fit(again.step, again.data)
    assert again.trainer.restored_from
    for key in ("train/auc", "train/precision", "train/accuracy", "val/auc", "train/loss"):
        assert logs[key] == pytest.approx(expected[key], rel=1e-6), key


def test_metric_config_errors(make_cfg, tmp_path):
    with pytest.raises(UserError, match="metrics: 'auc' is not a metric node"):
        build(make_cfg("+experiment=dense", "metrics=[auc]"), tmp_path)
    with pytest.raises(UserError, match="two metrics are named 'auc'"):
        build(make_cfg("+experiment=dense", "metrics=[{_target_: keras.metrics.AUC}, "
                       "{_target_: keras.metrics.AUC}]"), tmp_path)
    with pytest.raises(UserError, match="from_logits=true"):
        build(make_cfg("+experiment=dense", "metrics=[{_target_: keras.metrics.AUC, "
                       "from_logits: true}]"), tmp_path)
    # A step that takes no metrics: the key is named, not silently dropped.
    with pytest.raises(UserError, match="metrics"):
        build(make_cfg("+experiment=gan", "metrics=[{_target_: keras.metrics.AUC}]"), tmp_path)


def test_a_metric_named_like_the_default_replaces_it(make_cfg, tmp_path):
    r = build(make_cfg(*FROZEN[:-1], "metrics=[{_target_: keras.metrics.CategoricalAccuracy, "
                       "name: accuracy}]"), tmp_path)
    (metric,) = r.step.metric_sets["train"].metrics
    assert isinstance(metric, keras.metrics.CategoricalAccuracy)
    logs = r.trainer.fit(r.step, r.data)
    check_against_keras(logs, [metric], r.step.model, r.data.x_val, r.data.y_val, "val/")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["compiled", "mirrored"])
def test_weighted_metrics_and_loss_equal_keras_evaluate(make_cfg, tmp_path, mode):
    # Class weights (class 3 left out, class 0 five times): the training loss and metrics are
    # Keras' with those sample weights; validation is unweighted, as in Keras.
    r = build(make_cfg(*FROZEN, "data.class_weight={0:5.0,3:0.0}", *MODES[mode]), tmp_path)
    logs = r.trainer.fit(r.step, r.data)
    data, metrics = r.data, r.step.metric_sets["train"].metrics
    w = data.w_train
    assert set(np.unique(w)) == {0.0, 1.0, 5.0}
    assert "accuracy" in r.step.metric_sets["train"].used  # its weighted Keras form
    check_against_keras(logs, metrics, r.step.model, data.x_train, data.y_train, "train/",
                        sample_weight=w)
    check_against_keras(logs, metrics, r.step.model, data.x_val, data.y_val, "val/")
    # Not the unweighted values: the weights really reached the metrics.
    plain = keras_evaluate(r.step.model, metrics, data.x_train, data.y_train)
    assert abs(logs["train/auc"] - plain["auc"]) > 1e-4


@pytest.mark.parametrize("eager", [False, True])
def test_weighted_training_equals_keras_fit(make_cfg, tmp_path, eager):
    # Sample weights in the gradients: one epoch of SGD in order equals Keras' fit with the
    # same sample weights, batch size and initial weights.
    args = ["+experiment=dense", "callbacks=none", "model.dropout=0.0", "optimizer=sgd",
            "optimizer.learning_rate=0.1", "optimizer.momentum=0.0", "data.batch_size=100",
            "data.shuffle=false", "data.class_weight=balanced", "trainer.epochs=1",
            f"trainer.run_eagerly={str(eager).lower()}"]
    r = build(make_cfg(*args), tmp_path)
    model = r.step.model
    initial = model.get_weights()
    r.trainer.fit(r.step, r.data)

    def keras_fit(sample_weight):
        twin = keras.models.clone_model(model)
        twin.set_weights(initial)
        twin.compile(optimizer=keras.optimizers.SGD(0.1),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        twin.fit(r.data.x_train, r.data.y_train, sample_weight=sample_weight, batch_size=100,
                 shuffle=False, epochs=1, verbose=0)
        return twin.get_weights()

    for ours, theirs in zip(model.get_weights(), keras_fit(r.data.w_train)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    # The weights mattered: Keras' unweighted epoch ends elsewhere.
    assert not np.allclose(model.get_weights()[0], keras_fit(None)[0], atol=1e-4)


def test_each_kind_of_classification_metric_gets_the_inputs_it_expects():
    # Accuracy compares values and MeanIoU takes class ids: they get argmax predictions;
    # OneHotMeanIoU and AUC get one-hot labels and probabilities; Sparse* integer labels.
    import tensorflow as tf

    from trainer.step.metrics import MetricSet

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 4)).astype(np.float32)
    y = rng.integers(0, 4, 64).astype(np.int32)
    metrics = MetricSet([keras.metrics.Accuracy(name="acc"),
                         keras.metrics.MeanIoU(num_classes=4, name="miou"),
                         keras.metrics.OneHotMeanIoU(num_classes=4, name="onehot_miou"),
                         keras.metrics.SparseCategoricalAccuracy(name="sparse_acc"),
                         keras.metrics.AUC(name="auc")], task="classification")
    metrics.update(tf.constant(y), tf.constant(logits))
    got = {k: float(v) for k, v in metrics.results().items()}
    predicted = logits.argmax(axis=1)
    assert got["acc"] == pytest.approx(np.mean(predicted == y))
    assert got["sparse_acc"] == pytest.approx(np.mean(predicted == y))
    iou = keras.metrics.MeanIoU(num_classes=4)
    iou.update_state(y, predicted)
    assert got["miou"] == pytest.approx(float(iou.result())) == got["onehot_miou"]
    auc = keras.metrics.AUC()
    auc.update_state(keras.utils.to_categorical(y, 4), tf.nn.softmax(logits))
    assert got["auc"] == pytest.approx(float(auc.result()))
    assert 0.1 < got["acc"] < 0.6  # chance level on random logits: not a degenerate 0 or 1


def test_weighted_data_and_a_step_that_takes_no_weights(make_cfg, tmp_path):
    r = build(make_cfg("+experiment=multitask", "callbacks=none", "data.class_weight=balanced"),
              tmp_path)
    with pytest.raises(UserError, match="the step MultitaskStep takes no per-example weights"):
        r.trainer.fit(r.step, r.data)


def test_a_lazily_built_metric_of_a_subclassed_model_is_in_the_checkpoint(tmp_path):
    # F1Score makes its variables on its first update, and a subclassed model has no
    # output shape before it is called: the trainer builds the metrics before it lists the
    # checkpoint's contents, so a restart restores them too.
    import tensorflow as tf

    from trainer import TapeStep, Trainer
    from trainer.data import Batching, Generation, synthetic

    class Linear(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    data = synthetic(task="classification", generation=Generation(n_samples=64),
                     batching=Batching(batch_size=16))
    model = Linear()
    step = TapeStep(model=model, optimizer=keras.optimizers.SGD(0.1),
                    metrics=[keras.metrics.F1Score(average="macro", name="f1")])
    trainer = Trainer(epochs=1, run_dir=str(tmp_path))
    with pytest.raises(UserError, match="model 'model' has no variables yet"):
        trainer.fit(step, data)
    model(data.x_train[:1])  # built by a call: no output_shape to build the metrics from
    logs = trainer.fit(step, data)
    assert 0.0 < logs["train/f1"] <= 1.0
    path = trainer.checkpoint.write(str(tmp_path / "ckpt"))
    names = [name for name, _ in tf.train.list_variables(path)]
    assert [n for n in names if "/metrics/f1/" in n], names


def test_autograph_converts_the_metric_update():
    """The update is traced into every step: a function AutoGraph cannot convert would run
    unconverted, with a warning on every run ("AutoGraph could not transform")."""
    import tensorflow as tf

    for fn in (trainer_metrics._update, trainer_metrics._input):
        tf.autograph.to_graph(fn)  # raises where the conversion fails
    metrics = [keras.metrics.F1Score(), keras.metrics.Accuracy(),
               keras.metrics.SparseCategoricalAccuracy()]
    update = tf.function(lambda y, p: trainer_metrics._update(metrics, "classification", y, p,
                                                              None))
    update(tf.constant([1, 0]), tf.constant([[0.2, 0.8], [0.9, 0.1]]))
    assert [float(np.mean(m.result())) for m in metrics] == pytest.approx([1.0, 1.0, 1.0])
