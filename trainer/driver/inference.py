"""A trained run's loss and metrics on a data set, and its predictions on new inputs
(``python -m trainer.evaluate`` and ``python -m trainer.predict``)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from trainer.common.errors import UserError


def read_inputs(path: str, *, x_key: str = "x", drop=()) -> np.ndarray:
    """Features from an .npz (array ``x_key``) or a CSV with a header of numeric columns
    (columns named in ``drop``, such as the target, left out)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file; check --input")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as archive:
            if x_key not in archive.files:
                raise UserError(f"{p}: no array {x_key!r} (found {sorted(archive.files)}); "
                                "set --x-key")
            return archive[x_key]
    if p.suffix == ".csv":
        with open(p, newline="") as f:
            rows = list(csv.reader(f))
        header, body = rows[0], rows[1:]
        keep = [i for i, name in enumerate(header) if name not in drop]
        try:
            return np.array([[float(r[i]) for i in keep] for r in body], dtype=np.float32)
        except (ValueError, IndexError) as e:
            raise UserError(f"{p}: not a table of numbers ({e}); check --input") from None
    raise UserError(f"{p}: --input must be an .npz or a .csv file")



def predict(run, x) -> dict:
    """``{"prediction": ..., "probabilities": ...}`` (classification) or ``{"outputs": ...}``."""
    import tensorflow as tf

    model = run.step.models["model"]
    expected = tuple(model.input_shape[1:])
    if tuple(x.shape[1:]) != expected:
        raise UserError(f"inputs have features of shape {tuple(x.shape[1:])}, the run's model "
                        f"takes {expected}; check --input (and the run's data config)")
    outputs = np.concatenate([tf.cast(model(x[i:i + 1024], training=False), tf.float32).numpy()
                              for i in range(0, len(x), 1024)]) if len(x) else np.zeros((0,))
    if run.data.task == "classification":
        probabilities = tf.nn.softmax(outputs).numpy()
        # int64 on every platform (argmax gives the platform's index type), as documented.
        return {"prediction": probabilities.argmax(axis=1).astype(np.int64),
                "probabilities": probabilities}
    return {"outputs": outputs}



def write_predictions(predictions: dict, out: str) -> None:
    """As NPZ (the arrays) or CSV (one row per input)."""
    path = Path(out)
    if path.suffix == ".npz":
        np.savez(path, **predictions)
        return
    if path.suffix != ".csv":
        raise UserError(f"{path}: --out must end in .csv or .npz")
    if "prediction" in predictions:
        header = ["prediction"] + [f"p_{k}" for k in range(predictions["probabilities"].shape[1])]
        rows = np.column_stack([predictions["prediction"], predictions["probabilities"]])
    else:
        header = [f"y_{k}" for k in range(predictions["outputs"].shape[1])]
        rows = predictions["outputs"]
    classes = "prediction" in predictions
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for row in rows:
            values = [f"{v:.6g}" for v in (row[1:] if classes else row)]
            w.writerow([int(row[0]), *values] if classes else values)


def evaluate(run, batches) -> dict:
    """``run.step.test_step`` over ``batches`` (``(x, y)`` or ``(x, y, weight)``), keys
    ``val/...``: the example-weighted means of its logs and the step's Keras metrics."""
    import tensorflow as tf

    from trainer.common.keys import WEIGHT, float_logs

    run.step.reset_metrics("val")
    test_step = tf.function(lambda batch: float_logs(run.step.test_step(batch), batch))
    sums, total = {}, 0.0
    for batch in batches:
        logs = test_step(tuple(tf.constant(part) for part in batch))
        weight = float(logs.pop(WEIGHT))
        logs.pop("__sampled__", None)
        total += weight
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + float(v) * weight
    metrics = {k: float(v) for k, v in run.step.metric_results("val").items()}
    return {f"val/{k}": v for k, v in {**{k: v / total for k, v in sums.items()},
                                         **metrics}.items()}
