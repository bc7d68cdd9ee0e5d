"""``python -m trainer.predict RUN_DIR``: a trained run's predictions, as CSV or NPZ.

    python -m trainer.predict RUN_DIR --out predictions.csv            # its validation data
    python -m trainer.predict RUN_DIR --input new.npz --out preds.npz  # new inputs (array x)
    python -m trainer.predict RUN_DIR --input new.csv --out preds.csv  # numeric columns

New inputs (``--input``) are raw features: the run's own preparation (``Data.prepare``: the
digits' scaling to [0, 1], or the one a TFRecord export recorded in its ``meta.json``) is
applied to them; the run's validation data is read as training read it.
As CSV, classification writes the columns ``prediction`` (the class) and ``p_<k>`` (its
probabilities), regression ``y_<k>``; as NPZ, one row per input, classification writes the
arrays ``prediction`` (int64, shape ``(n,)``) and ``probabilities`` (float32, ``(n,
classes)``, the softmax of the logits), regression ``outputs`` (float32, ``(n, k)``).
``--checkpoint`` and ``key=value`` overrides as for evaluate.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from trainer.errors import UserError


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


def write(predictions: dict, out: str) -> None:
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


def parser():
    from trainer.inference import run_parser

    p = run_parser("python -m trainer.predict", __doc__)
    p.add_argument("--input", help="new inputs: .npz (array x) or .csv (numeric columns); "
                                   "default: the run's validation data")
    p.add_argument("--x-key", default="x", help="the array of an .npz input (default x)")
    p.add_argument("--out", default="predictions.csv", help=".csv or .npz (default "
                                                            "predictions.csv)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        from trainer.inference import load_run

        run = load_run(args.run_dir, checkpoint=args.checkpoint, overrides=args.overrides)
        if args.input:
            target = run.cfg.get("data", {}).get("target")
            x = run.data.prepare(read_inputs(args.input, x_key=args.x_key,
                                             drop=[target] if target else []))
        else:
            x = np.concatenate([b[0] for b in run.data.validation_batches()])
        write(predict(run, np.asarray(x, np.float32)), args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(x)} predictions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
