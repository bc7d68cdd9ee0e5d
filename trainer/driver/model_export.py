"""A finished run exported for serving (``python -m trainer.export``): a SavedModel, a TFLite
file (the LiteRT converter) or an ONNX file (tf2onnx), then loaded back in its own runtime
and compared with ``python -m trainer.predict`` on the run's validation data.

Every format is converted from the one SavedModel ``trainer.training.serving`` writes, so all
three take raw inputs and hold the data set's preparation. ``quantize="dynamic"`` stores the
weights as int8 (TFLite: dynamic-range quantization; ONNX: onnxruntime's ``quantize_dynamic``).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.common.errors import UserError

FORMATS = ("saved_model", "tflite", "onnx")
QUANTIZATIONS = ("dynamic",)

#: The modules each format's conversion and runtime import, and the extra that installs them.
_NEEDS = {"tflite": (("ai_edge_litert",), "tflite"),
          "onnx": (("tf2onnx", "onnxruntime"), "onnx")}

#: Examples per call of an exported model, as predict's batches.
CHUNK = 1024


@dataclass(frozen=True)
class Check:
    """The exported model against ``predict`` on ``examples`` validation examples: the largest
    difference of their outputs, and the metric (``accuracy``, or ``mse`` for regression) of
    each against the validation targets."""

    examples: int
    max_difference: float
    metric: str
    exported: float
    predicted: float


def check_options(fmt: str, quantize: str | None) -> None:
    """One line naming the option and its fix when ``fmt`` or ``quantize`` is not supported,
    or the format's extra is not installed."""
    import importlib.util

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: not one of {', '.join(FORMATS)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UserError(f"--quantize {quantize}: not one of {', '.join(QUANTIZATIONS)}")
    if quantize and fmt == "saved_model":
        raise UserError("--quantize applies to --format tflite and onnx; a SavedModel keeps "
                        "float32 weights (drop --quantize)")
    modules, extra = _NEEDS.get(fmt, ((), None))
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise UserError(f"--format {fmt} needs {module}: pip install "
                            f"'tape-trainer[{extra}]'")


def export_run(run_dir: str, *, fmt: str, out: str, checkpoint: str | None = None,
               quantize: str | None = None, overrides=()) -> Check | None:
    """Export the run in ``run_dir`` (its ``model.keras``, or ``checkpoint``: ``latest``,
    ``best`` or a path, as ``python -m trainer.evaluate`` loads it) to ``out`` as ``fmt``,
    then compare it with ``predict``; the ``Check`` (None when the data set's preparation
    cannot be undone to give raw validation inputs)."""
    from trainer.common.atomic import atomic_write
    from trainer.driver.load import load_run
    from trainer.training.serving import write_saved_model

    check_options(fmt, quantize)
    run = load_run(run_dir, checkpoint=checkpoint, overrides=overrides)
    if "model" not in run.step.models:
        raise UserError(f"{run_dir}: the run has no model named 'model' (its models: "
                        f"{sorted(run.step.models)}); export serves a supervised run's model")
    model, path = run.step.models["model"], Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "saved_model":
        write_saved_model(model, run.data, path)
    else:
        with tempfile.TemporaryDirectory(prefix="trainer-export-") as scratch:
            saved = Path(scratch) / "saved_model"
            write_saved_model(model, run.data, saved)
            convert = _tflite if fmt == "tflite" else _onnx
            atomic_write(path, lambda tmp: convert(saved, tmp, quantize))
    return check(run, fmt, str(path))


def _tflite(saved: Path, out: str, quantize: str | None) -> None:
    import tensorflow as tf

    from trainer.training.serving import SIGNATURE

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=[SIGNATURE])
    if quantize == "dynamic":
        # No representative data set: weights in int8, activations quantized on the fly.
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    Path(out).write_bytes(converter.convert())


def _onnx(saved: Path, out: str, quantize: str | None) -> None:
    import tensorflow as tf
    import tf2onnx

    from trainer.training.serving import INPUT, SIGNATURE

    # Held while converting: the signature reads the loaded object's variables.
    loaded = tf.saved_model.load(str(saved))
    signature = loaded.signatures[SIGNATURE]
    spec = signature.structured_input_signature[1][INPUT]
    # Keyword call: a concrete signature function takes its input by name only.
    function = tf.function(lambda inputs: loaded.signatures[SIGNATURE](**{INPUT: inputs}))
    if not quantize:
        tf2onnx.convert.from_function(function, input_signature=[spec], output_path=out)
        return
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="trainer-onnx-") as scratch:
        float_path = str(Path(scratch) / "float.onnx")
        tf2onnx.convert.from_function(function, input_signature=[spec], output_path=float_path)
        # Its advice to pre-process the model first goes to the root logger: not for a user.
        logging.disable(logging.WARNING)
        try:
            quantize_dynamic(float_path, out, weight_type=QuantType.QInt8)
        finally:
            logging.disable(logging.NOTSET)


def runner(fmt: str, path: str):
    """A function ``raw inputs -> outputs`` (NumPy) running the exported model at ``path`` in
    its own runtime: ``tf.saved_model.load``, the LiteRT interpreter, onnxruntime."""
    from trainer.training.serving import INPUT, SIGNATURE

    if fmt == "saved_model":
        import tensorflow as tf

        loaded = tf.saved_model.load(path)  # held by the closure: its variables
        return lambda x: next(iter(loaded.signatures[SIGNATURE](**{INPUT: tf.constant(x)})
                                   .values())).numpy()
    if fmt == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        run = Interpreter(model_path=path).get_signature_runner(SIGNATURE)
        return lambda x: next(iter(run(**{INPUT: x}).values()))
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {INPUT: x})[0]


def raw_validation(data):
    """The validation features as raw inputs (the preparation undone), and the targets; None
    when the preparation has no ``undo``."""
    preparation = data.preparation
    if preparation is not None and not callable(getattr(preparation, "undo", None)):
        return None
    batches = data.validation_batches()
    x = np.concatenate([b[0] for b in batches]).astype(np.float32)
    y = np.concatenate([b[1] for b in batches])
    return (x if preparation is None else preparation.undo(x)), x, y


def check(run, fmt: str, path: str) -> Check | None:
    """The model at ``path`` in its runtime against ``predict`` on the validation data."""
    from trainer.driver.inference import predict

    validation = raw_validation(run.data)
    if validation is None:
        return None
    raw, prepared, y = validation
    serve = runner(fmt, path)
    exported = np.concatenate([serve(raw[i:i + CHUNK]) for i in range(0, len(raw), CHUNK)])
    predicted = predict(run, prepared)
    if run.data.task == "classification":
        labels = y.reshape(len(y), -1)[:, 0]
        reference = predicted["probabilities"]
        scores = [float((p.argmax(axis=1) == labels).mean()) for p in (exported, reference)]
        metric = "accuracy"
    else:
        reference = predicted["outputs"]
        scores = [float(np.mean((p - y.reshape(p.shape)) ** 2)) for p in (exported, reference)]
        metric = "mse"
    return Check(examples=len(raw), max_difference=float(np.abs(exported - reference).max()),
                 metric=metric, exported=scores[0], predicted=scores[1])
