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

import sys

import numpy as np

from trainer.common.errors import UserError
from trainer.driver.inference import predict, read_inputs, write_predictions


def parser():
    from trainer.driver.load import run_parser

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
        from trainer.driver.load import load_run

        run = load_run(args.run_dir, checkpoint=args.checkpoint, overrides=args.overrides)
        if args.input:
            target = run.cfg.get("data", {}).get("target")
            x = run.data.prepare(read_inputs(args.input, x_key=args.x_key,
                                             drop=[target] if target else []))
        else:
            x = np.concatenate([b[0] for b in run.data.validation_batches()])
        write_predictions(predict(run, np.asarray(x, np.float32)), args.out)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(x)} predictions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
