"""``python -m trainer.evaluate RUN_DIR``: a trained run's loss and metrics on its validation data.

    python -m trainer.evaluate outputs/dense/runs/2026-11-28_12-00-00
    python -m trainer.evaluate RUN_DIR --checkpoint best data.path=other.npz --out eval.json

The run is rebuilt from its own config (``trainer.driver.load.load_run``); ``key=value``
overrides change it (another ``data.path``). Prints the metrics as JSON (the ``val/*``
values training logged for the same weights and data) and writes them to ``--out``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from trainer.common.errors import UserError
from trainer.driver.inference import evaluate


def parser():
    from trainer.driver.load import run_parser

    p = run_parser("python -m trainer.evaluate", __doc__)
    p.add_argument("--out", help="also write the metrics to this JSON file")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        from trainer.driver.load import load_run

        run = load_run(args.run_dir, checkpoint=args.checkpoint, overrides=args.overrides)
        metrics = evaluate(run, run.data.validation_batches())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(metrics, indent=2, sort_keys=True)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
