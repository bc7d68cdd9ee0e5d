"""``python -m trainer.export RUN_DIR``: a trained run exported for serving.

    python -m trainer.export RUN_DIR --format saved_model --out served/
    python -m trainer.export RUN_DIR --format tflite --out model.tflite [--quantize dynamic]
    python -m trainer.export RUN_DIR --format onnx --out model.onnx --checkpoint best

The model takes raw inputs (the data set's own preparation is part of it, as ``predict``
applies it) through one signature, ``serving_default``, with one input ``inputs``, and returns
``probabilities`` (classification) or ``outputs`` (regression). TFLite needs
``pip install 'tape-trainer[tflite]'``, ONNX ``pip install 'tape-trainer[onnx]'``.
``--quantize dynamic`` stores int8 weights (TFLite and ONNX). The exported model is loaded back
in its own runtime and compared with ``python -m trainer.predict`` on the validation data;
the command prints the comparison. ``--checkpoint`` and ``key=value`` overrides as for
evaluate. See docs/export.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys

from trainer.common.errors import UserError, one_line_usage_errors


def parser():
    from trainer.driver.load import run_parser

    p = run_parser("python -m trainer.export", __doc__)
    p.add_argument("--format", required=True, dest="fmt",
                   help="saved_model (a directory), tflite or onnx (a file)")
    p.add_argument("--out", required=True, help="where to write the exported model")
    p.add_argument("--quantize", help="dynamic: int8 weights (tflite and onnx only)")

    one_line_usage_errors(p, "python -m trainer.export RUN_DIR --format saved_model|tflite|onnx "
                             "--out PATH")
    return p


def describe(check) -> str:
    """The comparison with predict, in one line."""
    if check is None:
        return "not compared with predict: the data set's preparation cannot be undone"
    return (f"on {check.examples} validation examples: max |exported - predict| "
            f"{check.max_difference:.2g}, {check.metric} {check.exported:.4f} (predict: "
            f"{check.predicted:.4f})")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        from trainer.driver.model_export import check_options, export_run

        check_options(args.fmt, args.quantize)  # before TensorFlow starts
        check = export_run(args.run_dir, fmt=args.fmt, out=args.out, checkpoint=args.checkpoint,
                           quantize=args.quantize, overrides=args.overrides)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    quantized = f", {args.quantize}-range quantized" if args.quantize else ""
    print(f"wrote {args.out} ({args.fmt}{quantized}); {describe(check)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
