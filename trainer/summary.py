"""``python -m trainer.summary DIR``: the runs of a sweep, one line each, best first.

    python -m trainer.summary outputs/dense/multiruns/2026-01-01_12-00-00
    python -m trainer.summary DIR --metric val/loss --mode min

What a line shows, how the objective and its direction are chosen and how ties are broken:
``trainer.driver.sweeps``. Reads files only: TensorFlow is not imported.
"""

from __future__ import annotations

import argparse
import sys

from trainer.driver.sweeps import summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.summary",
        description="The runs of a sweep (a multirun directory), one line each, best first.")
    parser.add_argument("directory", help="the sweep's directory (hydra.sweep.dir)")
    parser.add_argument("--metric", help="the objective (default: the runs' optimized_metric)")
    parser.add_argument("--mode", choices=("max", "min"),
                        help="max or min (default: the sweeper's direction, else by name)")
    args = parser.parse_args(argv)
    try:
        print(summarize(args.directory, args.metric, args.mode))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
