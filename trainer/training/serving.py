"""A trained model as a serving SavedModel: one signature, ``serving_default``, that takes raw
inputs, prepares them as the data set's ``prepare`` does, runs the model and returns
probabilities (classification: the softmax of the logits) or values (regression), as
``python -m trainer.predict`` computes them.

Written by ``python -m trainer.export`` (which converts it to TFLite or ONNX) and by the
``export`` callback on a new best.
"""

from __future__ import annotations

from trainer.common.atomic import atomic_directory
from trainer.common.errors import UserError

#: The signature's name, and the name of its one input.
SIGNATURE = "serving_default"
INPUT = "inputs"


def output_name(task: str) -> str:
    """The signature's one output: ``probabilities`` (classification) or ``outputs``, the
    names of ``python -m trainer.predict``'s NPZ arrays."""
    return "probabilities" if task == "classification" else "outputs"


def preparation_ops(data):
    """``data.prepare`` as a function of float32 tensors (the identity when the data set
    prepares nothing); a ``UserError`` when its preparation is Python a graph cannot hold."""
    name = getattr(data, "name", type(data).__name__)
    try:
        preparation = data.preparation
    except NotImplementedError as e:
        raise UserError(f"data {name}: {e}, which an exported model needs; return a "
                        "trainer.data.Scaling from it (docs/export.md)") from None
    if preparation is None:
        return lambda x: x
    if callable(getattr(preparation, "in_graph", None)):
        return preparation.in_graph
    what = getattr(preparation, "__qualname__", type(preparation).__qualname__)
    raise UserError(f"data {name}: its preprocess {what} is Python code an exported model "
                    "cannot hold; pass preprocess=trainer.data.Scaling(divide_by=..., "
                    "subtract=...), or give it an in_graph(x) method of TensorFlow ops")


def serving_function(model, data):
    """``(serve, spec)``: ``serve(inputs)`` -> ``{output_name: tensor}`` in float32, and the
    ``tf.TensorSpec`` of a batch of raw inputs (float32, ``(None, *data.input_shape)``)."""
    import tensorflow as tf

    prepare = preparation_ops(data)
    classify = data.task == "classification"
    key = output_name(data.task)

    def serve(inputs):
        outputs = model(prepare(inputs), training=False)
        if not tf.is_tensor(outputs):
            raise UserError(f"model {model.name}: returns {type(outputs).__name__}, not one "
                            "tensor; an exported model serves one output")
        # Mixed precision computes in float16 or bfloat16; clients get float32, as predict's.
        outputs = tf.cast(outputs, tf.float32)
        return {key: tf.nn.softmax(outputs) if classify else outputs}

    return serve, tf.TensorSpec((None, *data.input_shape), tf.float32, name=INPUT)


def write_saved_model(model, data, path) -> None:
    """Write ``model`` with ``data``'s preparation as a SavedModel directory at ``path``,
    whole or not at all (a temporary directory renamed into place, replacing an older one)."""
    import keras

    serve, spec = serving_function(model, data)

    def write(directory):
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(name=SIGNATURE, fn=serve, input_signature=[spec])
        archive.write_out(directory, verbose=False)

    atomic_directory(path, write)
