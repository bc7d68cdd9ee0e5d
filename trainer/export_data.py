"""``python -m trainer.export_data``: write any configured data set into TFRecord shards,
or index shards another tool wrote.

    python -m trainer.export_data +experiment=dense out=DIR shards=8
    python -m trainer.export_data --index DIR [--x-key NAME --y-key NAME]
    python -m trainer data=tfrecord data.path='DIR/*.tfrecord' ...

The config is the training run's (``configs/export_data.yaml`` composes ``config.yaml``
and adds ``out``, ``shards`` and ``overwrite``); ``trainer.driver.shards`` writes the
shards and their ``meta.json``, never half a directory. ``--index DIR`` reads the shards
in ``DIR`` and writes their ``meta.json`` (``trainer.data.tfrecord_index``); no config is
composed.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse
import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from trainer.common.errors import UserError, one_line_usage_errors
from trainer.data.tfrecord_meta import META
from trainer.driver.schemas import register_configs
from trainer.driver.shards import export

register_configs()


def export_or_exit(cfg: DictConfig) -> None:
    """Export, and print where; a user error exits 2 with one line on stderr."""
    try:
        meta = export(cfg)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    splits = meta["splits"]
    out = Path(cfg.out).expanduser().resolve()
    print(f"wrote {splits['train']['examples']} train and {splits['val']['examples']} "
          f"validation examples of {meta['name']} in {len(splits['train']['shards'])} + "
          f"{len(splits['val']['shards'])} shards to {out}; train on them with "
          f"data=tfrecord data.path='{out}/*.tfrecord'")


def index_main(argv) -> int:
    """``--index DIR``: write ``DIR/meta.json`` for the shards there; a user error exits 2
    with one line on stderr."""
    from trainer.data.tfrecord_index import index_shards

    p = argparse.ArgumentParser(prog="python -m trainer.export_data --index",
                                description="Write meta.json for TFRecord shards another "
                                "tool wrote (train-*.tfrecord and val-*.tfrecord in DIR).")
    p.add_argument("--index", metavar="DIR", required=True, help="the shards' directory")
    p.add_argument("--x-key", help="the features' name in each tf.train.Example (default: "
                                   "inferred)")
    p.add_argument("--y-key", help="the target's name (default: inferred)")

    one_line_usage_errors(p, "python -m trainer.export_data --index DIR [--x-key NAME --y-key "
                             "NAME]")
    args = p.parse_args(argv)
    try:
        meta = index_shards(args.index, x_key=args.x_key, y_key=args.y_key)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    splits, directory = meta["splits"], Path(args.index).expanduser().resolve()
    outputs = (f"{meta['num_outputs']} classes" if meta["task"] == "classification"
               else f"{meta['num_outputs']} targets")
    print(f"wrote {directory / META}: {splits['train']['examples']} train and "
          f"{splits['val']['examples']} validation examples in "
          f"{len(splits['train']['shards'])} + {len(splits['val']['shards'])} shards; "
          f"{meta['task']} ({outputs}) of {meta['x_key']!r} "
          f"{meta['feature_shape']} {meta['feature_dtype']} -> {meta['y_key']!r}; preparation "
          f"{json.dumps(meta['preparation'])}; train on them with data=tfrecord "
          f"data.path='{directory}/*.tfrecord'")
    return 0


@hydra.main(version_base="1.3", config_path="pkg://trainer.configs", config_name="export_data")
def main(cfg):
    """Write the configured data set into ``cfg.out`` as TFRecord shards."""
    export_or_exit(cfg)


if __name__ == "__main__":
    if any(a == "--index" or a.startswith("--index=") for a in sys.argv[1:]):
        sys.exit(index_main(sys.argv[1:]))
    main()
