"""The finetune experiment: frozen backbone, unfreezing with recompilation, parameter groups."""

import json
import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import TapeStep
from trainer.callbacks import Callback
from trainer.common.errors import UserError
from trainer.data import digits
from trainer.step.freezing import set_trainable

SHORT = [
    "+experiment=finetune",
    "model.backbone_units=[32,16]",
    "model.pretrain_epochs=1",
    "trainer.epochs=3",
    "freeze.unfreeze.0.at_epoch=2",
    "callbacks.tensorboard.histogram_every_n_steps=0",
    "callbacks.progress.mode=log",
]
#: Spies built by Hydra from the config (``+callbacks.spy``), newest last.
SPIES = []


class Spy(Callback):
    """Keeps the trainer and the model's values at the start and after every epoch."""

    def __init__(self):
        self.snapshots = []
        SPIES.append(self)

    def _take(self, trainer):
        self.snapshots.append({v.path: v.numpy().copy() for v in trainer.step.model.variables})

    def on_fit_start(self, trainer):
        self.trainer = trainer
        self._take(trainer)

    def on_epoch_end(self, trainer, epoch, logs):
        self._take(trainer)


def test_digits_classes_keeps_and_relabels():
    full = digits()
    part = digits(classes=[5, 6, 7, 8, 9])
    assert sorted(set(part.y_train.tolist())) == [0, 1, 2, 3, 4]
    assert part.num_outputs == 5
    keep = full.y_val >= 5
    np.testing.assert_array_equal(part.x_val, full.x_val[keep])  # same split, filtered
    np.testing.assert_array_equal(part.y_val, full.y_val[keep] - 5)
    assert digits(classes=[3, 1]).y_train.tolist().count(0) == (full.y_train == 3).sum()
    with pytest.raises(UserError, match=r"data\.classes"):
        digits(classes=[1, 1])
    with pytest.raises(UserError, match=r"data\.classes"):
        digits(classes=[10])


def test_classes_is_in_the_data_schema(make_cfg):
    cfg = make_cfg("data.classes=[0,1]")
    assert list(cfg.data.classes) == [0, 1]


def test_experiment_freezes_unfreezes_and_groups(make_cfg, tmp_path, caplog):
    from trainer.driver.run import run

    cfg = make_cfg(*SHORT, "+callbacks.spy._target_=tests.test_finetune.Spy")
    with caplog.at_level(logging.INFO, logger="trainer.training.trainer"):
        run(cfg, run_dir=tmp_path)
    spy = SPIES[-1]
    start, epoch1, _, epoch3 = spy.snapshots
    # (a) the whole backbone is frozen in epoch 1; its last layer trains from epoch 2 on.
    for path in start:
        if path.startswith("backbone/dense_0/"):
            np.testing.assert_array_equal(epoch3[path], start[path])
        elif path.startswith("backbone/dense_1/"):
            np.testing.assert_array_equal(epoch1[path], start[path])
            assert not np.array_equal(epoch3[path], start[path]), path
        else:
            assert not np.array_equal(epoch1[path], start[path]), path  # the new head
    assert "trainable variables changed: recompiling the step" in caplog.text
    # (b) variables that stayed frozen never got optimizer slots.
    optimizer = spy.trainer.step.optimizer
    slots = optimizer.slot_paths()
    assert not any("backbone_dense_0" in s for s in slots)
    assert any("backbone_dense_1_kernel" in s for s in slots)
    assert any("head_kernel" in s for s in slots)
    # (c) the parameter counts at the end: dense_0 frozen, dense_1 and the head trainable.
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["params/frozen"] == 64 * 32 + 32
    assert metrics["params/trainable"] == (32 * 16 + 16) + (16 * 5 + 5)
    # 5 classes (chance 0.2); three short epochs reach 0.64-0.72 over seeds 0-4.
    assert metrics["val/accuracy"] > 0.5
    # (d) the backbone group runs at lr * lr_scale, the head at lr.
    assert set(optimizer.optimizers) == {"base", "group_0"}
    assert float(optimizer.optimizers["base"].learning_rate) == pytest.approx(1e-2)
    assert float(optimizer.optimizers["group_0"].learning_rate) == pytest.approx(1e-3)


def test_group_update_is_lr_times_lr_scale_times_gradient(make_cfg, tmp_path):
    """One SGD step (momentum 0) by hand: backbone/dense_1 moves by 0.1 * lr * gradient."""
    from trainer.driver.run import build

    cfg = make_cfg(*SHORT, "optimizer=sgd", "optimizer.momentum=0.0")
    built = build(cfg, run_dir=tmp_path)
    data, step, model = built.data, built.step, built.models["model"]
    assert isinstance(step, TapeStep)
    set_trainable([model], ["backbone/*"], False)
    set_trainable([model], ["backbone/dense_1/*"], True)
    step.build()
    batch = (tf.constant(data.x_train[:32]), tf.constant(data.y_train[:32]))
    grads = {k: g.numpy() for k, g in step.gradients_by_path(batch).items()}
    assert sorted(grads) == ["backbone/dense_1/bias", "backbone/dense_1/kernel",
                             "transfer/head/bias", "transfer/head/kernel"]
    before = {v.path: v.numpy().copy() for v in model.variables}
    tf.function(step.train_step)(batch)
    for v in model.variables:
        if v.path.startswith("backbone/dense_0/"):
            np.testing.assert_array_equal(v.numpy(), before[v.path])
            continue
        lr = 1e-2 * (0.1 if v.path.startswith("backbone/") else 1.0)
        np.testing.assert_allclose(v.numpy(), before[v.path] - lr * grads[v.path],
                                   rtol=1e-5, atol=1e-7)


def test_backbone_loaded_from_a_saved_model(tmp_path):
    from trainer.experiments.finetune import transfer_model
    from trainer.models import mlp

    keras.utils.set_random_seed(0)
    source = mlp(input_shape=(64,), num_outputs=10, hidden_units=[8, 4], dropout=0.1)
    source.save(tmp_path / "model.keras")
    model = transfer_model(input_shape=(64,), num_outputs=5,
                           backbone_path=str(tmp_path / "model.keras"))
    backbone = model.get_layer("backbone")
    assert [layer.name for layer in backbone.layers] == ["dense_0", "dropout_0", "dense_1",
                                                         "dropout_1"]
    assert [v.path for v in backbone.variables][:2] == ["backbone/dense_0/kernel",
                                                        "backbone/dense_0/bias"]
    for name in ("dense_0", "dense_1"):
        for a, b in zip(backbone.get_layer(name).get_weights(),
                        source.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)
    assert model.get_layer("head").units == 5
    with pytest.raises(UserError, match="backbone_path"):
        transfer_model(input_shape=(32,), num_outputs=5,
                       backbone_path=str(tmp_path / "model.keras"))
