"""TensorBoard event files, read back with TensorBoard's reader, match the run."""

import json

import keras
import numpy as np
import pytest
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.util import tensor_util

from tests.tb_reader import load, scalars
from trainer.run import run


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("trainer.configs", version_base="1.3"):
        cfg = compose("config", overrides=[
            "+experiment=dense", "trainer.epochs=2", "trainer.steps_per_execution=10",
            "callbacks.tensorboard.histogram_every_n_steps=20", "callbacks.progress.mode=log",
            "callbacks.tensorboard.histogram_min_interval_seconds=0",
        ])
    GlobalHydra.instance().clear()
    run_dir = tmp_path_factory.mktemp("dense")
    metrics = run(cfg, run_dir=run_dir)
    return run_dir, metrics


def test_train_scalars_per_execution(dense_run):
    run_dir, _ = dense_run
    acc = load(run_dir / "tb" / "train")
    tags = set(acc.Tags()["tensors"])
    for tag in ("loss", "accuracy", "grad_norm", "learning_rate", "time/steps_per_second"):
        assert tag in tags, tag
    # 23 steps per epoch in executions of 10, 10, 3.
    assert [s for s, _ in scalars(acc, "loss")] == [10, 20, 23, 33, 43, 46]
    assert all(v == pytest.approx(1e-3) for _, v in scalars(acc, "learning_rate"))
    assert all(v > 0 for _, v in scalars(acc, "time/steps_per_second"))
    losses = [v for _, v in scalars(acc, "loss")]
    assert losses[-1] < losses[0]


def test_val_scalars_per_epoch_match_metrics_json(dense_run):
    run_dir, metrics = dense_run
    acc = load(run_dir / "tb" / "val")
    assert scalars(acc, "accuracy")[-1] == (46, pytest.approx(metrics["val/accuracy"]))
    assert [s for s, _ in scalars(acc, "loss")] == [23, 46]
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["val/loss"] == pytest.approx(scalars(acc, "loss")[-1][1])


def test_histograms_of_weights_and_gradients(dense_run):
    run_dir, _ = dense_run
    acc = load(run_dir / "tb" / "train")
    tags = set(acc.Tags()["tensors"])
    kernel = "mlp/dense_0/kernel"
    assert {f"weights/{kernel}", f"gradients/{kernel}", f"grad_norm/{kernel}"} <= tags
    # At start, then at the first execution boundary past each multiple of 20.
    assert [e.step for e in acc.Tensors(f"weights/{kernel}")] == [0, 20, 43]
    hist = tensor_util.make_ndarray(acc.Tensors(f"gradients/{kernel}")[0].tensor_proto)
    assert hist.shape[1] == 3 and hist[:, 2].sum() == 64 * 256  # every kernel entry counted
    assert all(v > 0 for _, v in scalars(acc, f"grad_norm/{kernel}"))


def test_config_text_and_hparams(dense_run):
    run_dir, _ = dense_run
    acc = load(run_dir / "tb")
    text = tensor_util.make_ndarray(acc.Tensors("config")[0].tensor_proto).item().decode()
    assert "learning_rate: 0.001" in text and "hidden_units" in text
    data = acc.PluginTagToContent(hp_metadata.PLUGIN_NAME)
    start = hp_metadata.parse_session_start_info_plugin_data(
        data[hp_metadata.SESSION_START_INFO_TAG])
    assert start.hparams["optimizer.learning_rate"].number_value == pytest.approx(1e-3)
    assert start.hparams["model.hidden_units"].string_value == "[256, 128]"
    assert start.hparams["data._target_"].string_value == "trainer.data.digits"


def test_outputs_of_a_run(dense_run):
    run_dir, metrics = dense_run
    import keras

    for key in ("step", "epoch", "train/loss", "val/loss", "val/accuracy", "time/train_seconds"):
        assert key in metrics
    model = keras.models.load_model(run_dir / "model.keras")
    assert model.output_shape == (None, 10)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "checkpoint" in ckpts and any(n.startswith("ckpt-46") for n in ckpts)
    assert np.isfinite(metrics["val/loss"])


def test_gradient_histograms_do_not_change_the_run(make_cfg, tmp_path):
    """Inspecting gradients (histograms on the fixed probe batch) must not change training:
    with dropout, whose seed generator would show any extra random draw, a run writing
    histograms after every step ends with bit-identical weights to a run writing none."""
    weights = {}
    for every in (1, 0):
        cfg = make_cfg(
            "data=synthetic", "data.task=classification", "model.hidden_units=[16]",
            "model.dropout=0.5", "trainer.epochs=2", "trainer.steps_per_execution=1",
            f"callbacks.tensorboard.histogram_every_n_steps={every}",
            "callbacks.tensorboard.histogram_min_interval_seconds=0",
            "callbacks.progress.mode=log",
        )
        run(cfg, run_dir=tmp_path / str(every))
        weights[every] = keras.models.load_model(tmp_path / str(every) / "model.keras").weights
    probed = load(tmp_path / "1" / "tb" / "train").Tensors("gradients/mlp/dense_0/kernel")
    assert len(probed) > 10  # the gradients really were inspected, after every step
    assert len(weights[1]) == len(weights[0])
    for a, b in zip(weights[1], weights[0]):
        assert np.array_equal(a.numpy(), b.numpy()), a.path
