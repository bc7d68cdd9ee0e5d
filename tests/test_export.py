"""python -m trainer.export: each format loaded in its own runtime (tf.saved_model.load, the
LiteRT interpreter, onnxruntime) serves what predict computes on the validation set, from raw
inputs; dynamic-range quantization's cost; the export callback on a new best only."""

from __future__ import annotations

import contextlib
import types
from pathlib import Path

import numpy as np
import pytest

from trainer.common.errors import UserError
from trainer.driver.run import build, run
from trainer.export import main as export_main

SIGNATURE, INPUT = "serving_default", "inputs"
#: Exported outputs against predict's, by format (TFLite's kernels round differently).
TOLERANCE = {"saved_model": 1e-5, "tflite": 1e-3, "onnx": 1e-5}
SUFFIX = {"saved_model": "", "tflite": ".tflite", "onnx": ".onnx"}
MIRRORED = ["distribute=mirrored", "distribute.cpu_replicas=2"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A short dense run on the digits with checkpoints, written as python -m trainer writes
    it, and its validation data: raw pixels (0-16), predict's probabilities, the labels."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from trainer.driver.inference import predict
    from trainer.driver.load import load_run

    run_dir = tmp_path_factory.mktemp("run")
    GlobalHydra.instance().clear()
    with initialize_config_module("trainer.configs", version_base="1.3"):
        cfg = compose("config", overrides=[
            "+experiment=dense", "trainer.epochs=2", "trainer.max_steps=12",
            "~callbacks.tensorboard", "~callbacks.profile", "~callbacks.health"])
    GlobalHydra.instance().clear()
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    run(cfg, run_dir=run_dir)
    loaded = load_run(str(run_dir))
    prepared = np.concatenate([b[0] for b in loaded.data.validation_batches()])
    labels = np.concatenate([b[1] for b in loaded.data.validation_batches()])
    raw = prepared * 16.0
    # Raw digits are whole numbers of 0-16: what a client sends, not the model's [0, 1].
    assert np.array_equal(raw, np.round(raw)) and raw.max() == 16.0
    return types.SimpleNamespace(dir=run_dir, raw=raw, labels=labels,
                                 probabilities=predict(loaded, prepared)["probabilities"])


def serve(fmt: str, path: str, raw: np.ndarray) -> np.ndarray:
    """The exported model at ``path`` on ``raw``, in its own runtime, checking the signature
    on the way: one input, ``inputs``, and one output, ``probabilities``."""
    if fmt == "saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(path)
        signature = loaded.signatures[SIGNATURE]
        assert list(loaded.signatures) == [SIGNATURE]
        assert list(signature.structured_input_signature[1]) == [INPUT]
        assert list(signature.structured_outputs) == ["probabilities"]
        return signature(inputs=tf.constant(raw))["probabilities"].numpy()
    if fmt == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=path)
        assert interpreter.get_signature_list() == {
            SIGNATURE: {"inputs": [INPUT], "outputs": ["probabilities"]}}
        return interpreter.get_signature_runner(SIGNATURE)(inputs=raw)["probabilities"]
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT]
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    return session.run(None, {INPUT: raw})[0]


def _export(finished, tmp_path, fmt, *args, name="m"):
    out = str(tmp_path / f"{name}{SUFFIX[fmt]}")
    assert export_main([str(finished.dir), "--format", fmt, "--out", out, *args]) == 0
    return out


@pytest.mark.parametrize("fmt", ["saved_model", "tflite", "onnx"])
def test_each_format_serves_predicts_probabilities_from_raw_inputs(finished, tmp_path, fmt,
                                                                   capsys):
    out = _export(finished, tmp_path, fmt)
    served = serve(fmt, out, finished.raw)
    np.testing.assert_allclose(served, finished.probabilities, atol=TOLERANCE[fmt], rtol=0)
    # The command's own comparison, printed, agrees.
    line = capsys.readouterr().out
    assert f"wrote {out} ({fmt}); on 360 validation examples" in line
    accuracy = (finished.probabilities.argmax(1) == finished.labels).mean()
    assert f"accuracy {accuracy:.4f} (predict: {accuracy:.4f})" in line


def test_the_docs_serving_example_serves_the_probabilities(finished, tmp_path, monkeypatch):
    from tests.test_readme import _block

    monkeypatch.chdir(tmp_path)
    _export(finished, tmp_path, "saved_model", name="served/dense")
    scope = {"raw_pixels": finished.raw}
    exec(compile(_block('tf.saved_model.load("served/dense")'), "<docs/export.md>", "exec"),
         scope)
    np.testing.assert_allclose(scope["probabilities"].numpy(), finished.probabilities,
                               atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_dynamic_quantization_shrinks_the_model_and_costs_little_accuracy(finished, tmp_path,
                                                                          fmt):
    import os

    full = _export(finished, tmp_path, fmt, name="full")
    quantized = _export(finished, tmp_path, fmt, "--quantize", "dynamic", name="int8")
    # int8 weights: a quarter of the float32 ones' bytes, plus the graph.
    assert os.path.getsize(quantized) < 0.4 * os.path.getsize(full)
    served = serve(fmt, quantized, finished.raw)
    difference = np.abs(served - finished.probabilities).max()
    assert 1e-4 < difference < 0.05  # quantized (not the float model), yet close
    drop = ((finished.probabilities.argmax(1) == finished.labels).mean()
            - (served.argmax(1) == finished.labels).mean())
    print(f"{fmt} dynamic-range quantization: accuracy drop {drop:.4f}, max |diff| "
          f"{difference:.2g}")
    assert abs(drop) <= 0.01
    assert (served.argmax(1) == finished.probabilities.argmax(1)).mean() >= 0.98


def test_a_checkpoint_exports_its_own_weights(finished, tmp_path):
    import tensorflow as tf

    # The last checkpoint holds the final weights (those of model.keras).
    out = _export(finished, tmp_path, "saved_model", "--checkpoint", "latest")
    np.testing.assert_allclose(serve("saved_model", out, finished.raw),
                               finished.probabilities, atol=1e-5, rtol=0)
    # An earlier checkpoint, by path: other weights, other outputs.
    ckpt = tf.train.Checkpoint(models={"model": _model_like(finished)})
    first = ckpt.save(str(tmp_path / "early" / "ckpt"))
    other = _export(finished, tmp_path, "saved_model", "--checkpoint", first, name="early")
    assert np.abs(serve("saved_model", other, finished.raw) - finished.probabilities).max() > 0.01


def _model_like(finished):
    """A model of the run's architecture with other weights: every one 0.01."""
    from trainer.driver.load import load_run

    model = load_run(str(finished.dir)).step.models["model"]
    for v in model.trainable_weights:
        v.assign(np.full(v.shape, 0.01, np.float32))
    return model


@pytest.mark.parametrize(("args", "expected"), [
    (["--format", "pdf"], "error: --format pdf: not one of saved_model, tflite, onnx"),
    (["--format", "saved_model", "--quantize", "dynamic"],
     "error: --quantize applies to --format tflite and onnx"),
    (["--format", "tflite", "--quantize", "float16"],
     "error: --quantize float16: not one of dynamic"),
    (["--format", "tflite", "--checkpoint", "best"], "/checkpoints/best: no checkpoint;"),
    (["--format", "onnx", "--checkpoint", "nowhere/ckpt-3"],
     "error: nowhere/ckpt-3: not a checkpoint"),
    (["--out", "m"], "error: the following arguments are required: --format; usage: "),
])
def test_bad_input_is_one_line(finished, tmp_path, capsys, args, expected):
    argv = [str(finished.dir), *args] + ([] if "--out" in args else ["--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit) if "usage" in expected else contextlib.nullcontext():
        assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "m").exists()


def test_a_missing_run_or_extra_is_one_line(tmp_path, capsys, monkeypatch):
    assert export_main([str(tmp_path / "nope"), "--format", "onnx", "--out", "m.onnx"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {tmp_path / 'nope'}: no such run directory; pass the directory a training run "
        "wrote (hydra.run.dir)")
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ai_edge_litert" else find_spec(name, *a))
    assert export_main([str(tmp_path), "--format", "tflite", "--out", "m.tflite"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --format tflite needs ai_edge_litert: pip install 'tape-trainer[tflite]'")


@pytest.mark.slow
def test_the_command_in_a_subprocess(finished, tmp_path):
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}

    def export(*args):
        return subprocess.run([sys.executable, "-m", "trainer.export", str(finished.dir),
                               *args], env=env, capture_output=True, text=True, timeout=300)

    start = time.perf_counter()
    bad = export("--format", "onnx", "--quantize", "dynamic", "--out", str(tmp_path / "m"),
                 "--checkpoint", "latest", "--format", "saved_model")
    # Refused before TensorFlow starts: one line, nothing else on stderr.
    assert bad.returncode == 2 and time.perf_counter() - start < 20
    assert bad.stderr == ("error: --quantize applies to --format tflite and onnx; a SavedModel "
                          "keeps float32 weights (drop --quantize)\n")
    out = tmp_path / "m.tflite"
    good = export("--format", "tflite", "--out", str(out), "--quantize", "dynamic")
    assert good.returncode == 0, good.stderr[-2000:]
    assert good.stdout.startswith(f"wrote {out} (tflite, dynamic-range quantized); on 360 "
                                  "validation examples: max |exported - predict| ")
    np.testing.assert_allclose(serve("tflite", str(out), finished.raw), finished.probabilities,
                               atol=0.05, rtol=0)


# --- the preparation in the graph ------------------------------------------------------------
def test_a_scaling_in_the_graph_is_prepare_and_undo_inverts_it():
    import tensorflow as tf

    from trainer.data import Scaling
    from trainer.data.images import ImageFolderData

    x = np.random.default_rng(0).uniform(-50, 300, size=(7, 5)).astype(np.float32)
    for scaling in (Scaling(divide_by=16), Scaling(divide_by=3.5, subtract=-2.25),
                    ImageFolderData.preparation.fget(None)):
        np.testing.assert_array_equal(scaling.in_graph(tf.constant(x)).numpy(), scaling(x))
        np.testing.assert_allclose(scaling.undo(scaling(x)), x, rtol=1e-6)
    np.testing.assert_array_equal(ImageFolderData.prepare(None, x), x / np.float32(255))


def test_a_preparation_without_graph_ops_is_refused_and_one_with_them_is_used():
    import tensorflow as tf

    from trainer.data import DataModule
    from trainer.training.serving import preparation_ops

    x = np.random.default_rng(0).normal(size=(40, 3)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)

    def halve(v):
        return np.asarray(v, np.float32) / 2

    data = DataModule(train=(x, y), val=(x, y), preprocess=halve, name="mine")
    with pytest.raises(UserError, match=r"data mine: its preprocess .*halve is Python code .*"
                                        r"Scaling\(divide_by=\.\.\., subtract=\.\.\.\)"):
        preparation_ops(data)

    class Halve:
        def __call__(self, v):
            return halve(v)

        def in_graph(self, v):
            return v / 2

    data = DataModule(train=(x, y), val=(x, y), preprocess=Halve())
    assert preparation_ops(data)(tf.constant([[4.0]])).numpy() == [[2.0]]
    assert preparation_ops(DataModule(train=(x, y), val=(x, y)))(x) is x


# --- the export callback -----------------------------------------------------------------------
def test_the_callback_exports_on_a_new_best_only(tmp_path):
    import tensorflow as tf

    from tests.helpers import linear_model, regression_data
    from trainer.callbacks import ExportCallback
    from trainer.data import Scaling

    data = regression_data(preprocess=Scaling(divide_by=4.0, subtract=1.0))
    model = linear_model()
    trainer = types.SimpleNamespace(models={"model": model}, data=data, averages=None,
                                    is_chief=True, run_dir=str(tmp_path))
    cb = ExportCallback(monitor="val/loss", mode="min")
    cb.on_fit_start(trainer)
    kernel = model.get_layer("linear").kernel
    # val/loss by epoch: 0.5 (best), 0.7, 0.4 (best), 0.4 (not better), 0.45.
    for epoch, loss in enumerate([0.5, 0.7, 0.4, 0.4, 0.45]):
        kernel.assign(np.full(kernel.shape, float(epoch + 1), np.float32))
        # Each epoch's validation, as the trainer reports it (before on_epoch_end).
        cb.on_validation_end(trainer, epoch + 1, {"val/loss": loss, "epoch": epoch + 1})
    assert cb.exported == [1, 3] and cb.best == 0.4
    # The directory holds epoch 3's weights, and prepares raw inputs itself.
    kernel.assign(np.full(kernel.shape, 3.0, np.float32))
    raw = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32) * 4 + 1
    expected = model(data.prepare(raw)).numpy()
    loaded = tf.saved_model.load(str(tmp_path / "export" / "saved_model"))
    served = loaded.signatures[SIGNATURE](inputs=tf.constant(raw))["outputs"].numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)
    assert not list((tmp_path / "export").glob(".*"))  # no temporary directory left
    with pytest.raises(UserError, match=r"callbacks.export.monitor='val/acc' is not logged"):
        ExportCallback(monitor="val/acc").on_validation_end(trainer, 1, {"val/loss": 1.0})


@pytest.mark.parametrize(("monitor", "overrides"), [
    ("val/accuracy", []),
    pytest.param("val/accuracy", ["trainer.run_eagerly=true"], marks=pytest.mark.slow),
    pytest.param("val/accuracy", [*MIRRORED, "trainer.accumulate_steps=2"],
                 marks=pytest.mark.slow),
    # The average's evaluation: the export holds the averaged weights.
    pytest.param("val_ema/accuracy", ["trainer.ema.decay=0.8"], marks=pytest.mark.slow)],
    ids=["compiled", "eager", "mirrored-accumulated", "ema"])
def test_the_callback_in_a_run_serves_the_best_epochs_model(make_cfg, tmp_path, monitor,
                                                            overrides):
    import tensorflow as tf

    cfg = make_cfg("+experiment=dense", "trainer.epochs=3", "trainer.max_steps=24",
                   "data.batch_size=32", "callbacks=none", "+callbacks/export=default",
                   f"callbacks.export.monitor={monitor}", "callbacks.export.mode=max",
                   *overrides)
    r = build(cfg, tmp_path)
    r.trainer.fit(r.step, r.data)
    from trainer.callbacks import ExportCallback

    (cb,) = [c for c in r.trainer.callbacks if isinstance(c, ExportCallback)]
    accuracies = [h[monitor] for h in r.trainer.history]
    assert cb.exported == [i + 1 for i, a in enumerate(accuracies) if a > max(accuracies[:i],
                                                                             default=-1)]
    best = cb.exported[-1]
    assert cb.best == max(accuracies)
    loaded = tf.saved_model.load(str(tmp_path / "export" / "saved_model"))
    x = np.concatenate([b[0] for b in r.data.validation_batches()])
    y = np.concatenate([b[1] for b in r.data.validation_batches()])
    served = loaded.signatures[SIGNATURE](inputs=tf.constant(x * 16))["probabilities"].numpy()
    assert (served.argmax(1) == y).mean() == pytest.approx(cb.best, abs=1e-6)
    if best == len(accuracies):  # the last epoch was the best: the final weights
        final = tf.nn.softmax(r.step.models["model"](x)).numpy()
        np.testing.assert_allclose(served, final, atol=1e-5, rtol=0)


def test_an_atomic_directory_keeps_the_old_one_when_a_write_fails(tmp_path):
    from trainer.common.atomic import atomic_directory

    target = tmp_path / "d"
    atomic_directory(target, lambda d: Path(d, "a").write_text("1"))
    assert (target / "a").read_text() == "1"

    def broken(d):
        Path(d, "a").write_text("2")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_directory(target, broken)
    assert (target / "a").read_text() == "1"
    atomic_directory(target, lambda d: Path(d, "b").write_text("3"))
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # nothing left behind
