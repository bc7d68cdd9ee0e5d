"""TensorBoard event files, read back with TensorBoard's reader, match the run."""

import json
import socket
import subprocess
import sys
import time
import urllib.request

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.util import tensor_util

from tests.helpers import regression_data
from tests.tb_reader import load, scalars
from trainer import TapeStep, TensorBoardCallback, Trainer
from trainer.callbacks import Callback
from trainer.callbacks.tensorboard import histogram_variables
from trainer.compile.pacing import MIN_EXECUTIONS, Pacing
from trainer.driver.run import run
from trainer.experiments.plot import ImageCallback


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


def test_hparams_metrics_are_each_epochs_train_and_val_logs(dense_run):
    """The session's metrics are the epochs' logs (training: the epoch's means, as in
    history.jsonl and metrics.json), in the session's own run, validation named first:
    the HParams dashboard shows the first five, and compares their last values."""
    run_dir, metrics = dense_run
    root = load(run_dir / "tb")
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    for key in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        assert scalars(root, f"epoch/{key}") == [
            (epoch["step"], pytest.approx(epoch[key])) for epoch in history], key
    assert scalars(root, "epoch/train/loss")[-1][1] == pytest.approx(metrics["train/loss"])
    content = root.PluginTagToContent(hp_metadata.PLUGIN_NAME)[hp_metadata.EXPERIMENT_TAG]
    infos = hp_metadata.parse_experiment_plugin_data(content).metric_infos
    names = [m.display_name for m in infos]
    assert names[:4] == ["val/accuracy", "val/loss", "train/accuracy", "train/loss"]
    assert set(names[4:]) == {"train/grad_norm", "train/learning_rate"}
    assert all(m.name.group == "" and m.name.tag == f"epoch/{m.display_name}" for m in infos)


def test_histograms_leave_out_the_dropout_random_state(dense_run):
    """The dense MLP has dropout, whose seed generators are int64 model variables: their
    ``seed_generator_state`` is not a weight and gets no histogram."""
    run_dir, _ = dense_run
    tags = {t for t in load(run_dir / "tb" / "train").Tags()["tensors"]
            if t.startswith("weights/")}
    model = keras.models.load_model(run_dir / "model.keras")
    assert sum(v.name == "seed_generator_state" for v in model.variables) == 2
    assert tags == {f"weights/mlp/{layer}/{kind}" for layer in ("dense_0", "dense_1", "head")
                    for kind in ("kernel", "bias")}


def test_histogram_variables_are_the_float_ones():
    """Float state (batch-norm statistics) keeps its histogram; random-number state
    (dropout, noise layers) and other non-float variables (an int counter) do not."""

    class Counter(keras.layers.Layer):
        def build(self, input_shape):
            self.count = self.add_weight(shape=(), dtype="int32", initializer="zeros",
                                         trainable=False, name="count")

        def call(self, x):
            return x

    model = keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(4, name="d"),
        keras.layers.BatchNormalization(name="bn"), keras.layers.Dropout(0.5, seed=1),
        keras.layers.GaussianNoise(0.1, seed=2), Counter(name="counter"),
    ], name="m")
    kept = [v.path for v in histogram_variables(model)]
    assert kept == ["m/d/kernel", "m/d/bias", "m/bn/gamma", "m/bn/beta", "m/bn/moving_mean",
                    "m/bn/moving_variance"]
    left_out = {v.name for v in model.variables if v.path not in kept}
    assert left_out == {"seed_generator_state", "count"}


def test_auto_pacing_gives_a_short_run_a_curve():
    """A run of known length is split into at least ``MIN_EXECUTIONS`` executions with
    ``steps_per_execution=auto``; a fixed count is used as is, and long runs keep the
    timed count (the cap is above it)."""
    assert Pacing("auto", planned_steps=46).steps == 2  # 2 epochs of 23: 23 executions
    assert Pacing("auto", planned_steps=10).steps == 1
    assert Pacing("auto").steps == Pacing("auto", planned_steps=10**7).steps == 16
    assert Pacing(8, planned_steps=46).steps == 8
    pace = Pacing("auto", planned_steps=10**6)  # 50,000 steps per execution at most
    for _ in range(5):
        pace.observe(pace.steps, pace.steps / 20_000.0, traced=False)
    assert pace.steps == 10_000  # 0.5 s at 20,000 steps/s
    pace.planned_steps = 46  # fit again on a shorter plan: the cap follows it
    assert pace.steps == 2
    # Up to each boundary, executions of equal sizes: an epoch of 23 steps in a run of 230
    # (at most 11 a time) runs 8, 8, 7, not 11, 11 and a point of one batch.
    pace = Pacing("auto", planned_steps=230)
    assert [pace.steps_for(left) for left in (23, 15, 7)] == [8, 8, 7]
    assert [Pacing(10).steps_for(left) for left in (23, 13, 3)] == [10, 10, 3]  # as given


def test_a_short_auto_paced_run_logs_a_training_curve(tmp_path):
    """The issue's case: 2 epochs of 23 steps logged 3 training points (16, 23, 46) with
    ``steps_per_execution=auto``; now every execution's logs, at least 20 of them."""
    data = regression_data(n=23 * 16, batch_size=16)
    step = TapeStep(model=keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)]),
                    optimizer=keras.optimizers.SGD(0.05), task="regression")
    tb = TensorBoardCallback(histogram_every_n_steps=0)
    Trainer(epochs=2, steps_per_execution="auto", callbacks=[tb], run_dir=str(tmp_path)).fit(
        step, data)
    steps = [s for s, _ in scalars(load(tmp_path / "tb" / "train"), "loss")]
    assert len(steps) >= MIN_EXECUTIONS
    assert steps == sorted(set(steps)) and 23 in steps and steps[-1] == 46


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
    # How nodes are built is not a hyperparameter (no _target_/_partial_ entries).
    assert not [k for k in start.hparams if "_target_" in k or "_partial_" in k]


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


# --- a resumed run continues the curves -------------------------------------------------------

class Logged(Callback):
    """What a run logged, by global step: train loss per execution, val loss per epoch."""

    def __init__(self):
        self.train, self.val = {}, {}

    def on_execution_end(self, trainer, global_step, logs):
        self.train[global_step] = logs["train/loss"]

    def on_epoch_end(self, trainer, epoch, logs):
        self.val[logs["step"]] = logs["val/loss"]


PER_EPOCH = 7  # regression_data(): 100 examples in batches of 16
RESUMED_AT = PER_EPOCH  # the end of the first epoch


class Shade(ImageCallback):
    """A flat grey image of the given shade (tells which run drew it)."""

    tag = "shade"

    def __init__(self, shade: int):
        super().__init__(every_n_steps=5)
        self.shade = shade

    def draw(self, trainer):
        return np.full((4, 4, 3), self.shade, np.uint8)


def _fit_linear(run_dir, *, spe, start_step=0, shade=0, hparams=None) -> Logged:
    """A linear regression fit of 3 epochs from ``start_step`` (the weights fresh, named
    alike in every process, so both runs write the same tags), with images of ``shade``
    in their own event file; what it logged."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, name="linear")],
                             name="regressor")
    step = TapeStep(model=model, optimizer=keras.optimizers.SGD(0.05), task="regression")
    logged = Logged()
    tb = TensorBoardCallback(histogram_every_n_steps=5, histogram_min_interval_seconds=0,
                             hparams=hparams)
    trainer = Trainer(epochs=3, steps_per_execution=spe, callbacks=[Shade(shade), tb, logged],
                      run_dir=run_dir)
    trainer.global_step.assign(start_step)  # what restoring a checkpoint of that step does
    trainer.fit(step, regression_data())
    return logged


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """A run interrupted after 3 epochs, resumed in the same run directory at step 7.

    The first process logged up to step 21 in executions of 2 steps (2, 4, 6, 7, 9, 11,
    13, 14, ...); the second starts from step 7 with fresh weights (so its points differ
    from the first's) and executions of 4 (11, 14, 18, 21): the first's point at 9
    falls between the resumed step and the second's first point, where TensorBoard's
    Rust data server drops nothing unless told (see ``write_restart_marker``).
    """
    run_dir = tmp_path_factory.mktemp("resumed")
    first = _fit_linear(run_dir, spe=2)
    second = _fit_linear(run_dir, spe=4, start_step=RESUMED_AT, shade=255)
    return run_dir, first, second


def test_resumed_run_replaces_the_interrupted_points(resumed_run):
    run_dir, first, second = resumed_run
    assert max(first.train) == 3 * PER_EPOCH and min(second.train) == 11
    expected = {s: v for s, v in first.train.items() if s <= RESUMED_AT} | second.train
    acc = load(run_dir / "tb" / "train")
    loss = scalars(acc, "loss")
    assert [s for s, _ in loss] == sorted(expected)  # each step once, in order
    assert [v for _, v in loss] == pytest.approx([expected[s] for s in sorted(expected)])
    assert {s for s, _ in loss}.isdisjoint({9, 13, 16, 20})  # the first run's, past step 7
    val = load(run_dir / "tb" / "val")
    expected_val = {PER_EPOCH: first.val[PER_EPOCH]} | second.val
    assert scalars(val, "loss") == [(s, pytest.approx(v)) for s, v in sorted(expected_val.items())]


def test_resumed_run_continues_the_hparams_sessions_epoch_metrics(tmp_path):
    """With an HParams session the root run holds each epoch's logs (``epoch/...``); a
    resumed run replaces the interrupted one's past the resume there too."""
    first = _fit_linear(tmp_path, spe=2, hparams={"lr": 0.05})
    second = _fit_linear(tmp_path, spe=4, start_step=RESUMED_AT, shade=255,
                         hparams={"lr": 0.05})
    expected = {PER_EPOCH: first.val[PER_EPOCH]} | second.val
    root = load(tmp_path / "tb")
    assert scalars(root, "epoch/val/loss") == [
        (s, pytest.approx(v)) for s, v in sorted(expected.items())]
    assert [s for s, _ in scalars(root, "epoch/train/loss")] == sorted(expected)


def test_resumed_run_histograms_and_texts_once_per_step(resumed_run):
    run_dir, _, _ = resumed_run
    acc = load(run_dir / "tb" / "train")
    # First run: at 0 and past each multiple of 5 (6, 11, 16, 20); the resumed one at its
    # start (7) and past 10, 15, 20 (11, 18, 21).
    for tag in ("weights/regressor/linear/kernel", "grad_norm/regressor/linear/kernel"):
        assert [e.step for e in acc.Tensors(tag)] == [0, 6, 7, 11, 18, 21], tag
    root = load(run_dir / "tb")
    assert [e.step for e in root.Tensors("variables")] == [0, RESUMED_AT]


def test_resumed_run_images_once_per_step(resumed_run):
    """Images come from ImageCallback's own event file in ``tb/train``, listed first:
    the TensorBoard callback still opens first, so its restart marker precedes them."""
    run_dir, _, _ = resumed_run
    images = load(run_dir / "tb" / "train").Tensors("shade")
    # First run: at the start, past each multiple of 5 and at the end (0, 6, 11, 16, 20,
    # 21); the resumed one at 7, 11, 18, 21.
    assert [e.step for e in images] == [0, 6, 7, 11, 18, 21]
    shades = [int(tf.io.decode_png(tensor_util.make_ndarray(e.tensor_proto)[2])[0, 0, 0])
              for e in images]
    assert shades == [0, 0, 255, 255, 255, 255]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _served_scalars(logdir, run, tag, *, load_fast: str) -> list:
    """``(step, value)`` of a scalar as a real ``tensorboard`` server returns it."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
         "127.0.0.1", "--port", str(port), f"--load_fast={load_fast}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run={run}&tag={tag}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    points = json.loads(r.read())
                if points:
                    return [(step, value) for _, step, value in points]
            except OSError:
                pass  # not up yet, or the run not loaded yet
            time.sleep(0.5)
        raise AssertionError(f"tensorboard --load_fast={load_fast} never served {run}/{tag}")
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("load_fast", ["true", "false"])
def test_real_tensorboard_shows_the_resumed_curves(resumed_run, load_fast):
    """The server's readers: ``true`` is the Rust data server (the default when it is
    installed), which ignores SessionLog START and drops points per tag instead;
    ``false`` is the Python multiplexer, which purges on START."""
    run_dir, first, second = resumed_run
    expected = {s: v for s, v in first.train.items() if s <= RESUMED_AT} | second.train
    served = _served_scalars(run_dir / "tb", "train", "loss", load_fast=load_fast)
    assert [s for s, _ in served] == sorted(expected)
    assert [v for _, v in served] == pytest.approx([expected[s] for s in sorted(expected)])
    expected_val = {PER_EPOCH: first.val[PER_EPOCH]} | second.val
    served = _served_scalars(run_dir / "tb", "val", "loss", load_fast=load_fast)
    assert served == [(s, pytest.approx(v)) for s, v in sorted(expected_val.items())]
