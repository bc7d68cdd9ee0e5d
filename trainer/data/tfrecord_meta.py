"""meta.json, the description of a directory of TFRecord shards: its schema, read and
checked field by field, and written atomically.

The README's "Streaming sharded data" section documents every key with an example.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from trainer.common.atomic import atomic_write
from trainer.common.errors import UserError
from trainer.data.base import TASKS
from trainer.data.preparation import Scaling

META = "meta.json"
FORMAT = "trainer.tfrecord"
#: 2 added ``preparation`` (and the optional ``x_key``, ``y_key``, ``feature_dtype``).
VERSION = 2
SPLITS = ("train", "val")
#: How each feature dtype is stored in a ``tf.train.Example``.
DTYPES = {"float32": "float_list", "int64": "int64_list"}
#: The optional keys and their defaults.
DEFAULTS = {"x_key": "x", "y_key": "y", "feature_dtype": "float32"}


def fix(directory) -> str:
    """The fix for shards that disagree with their ``meta.json``: write both again."""
    return (f"re-export them with python -m trainer.export_data, or for shards another tool "
            f"wrote, index them with python -m trainer.export_data --index {directory}")


def shard_name(split: str, index: int, count: int) -> str:
    """The file name of shard ``index`` of ``count`` of ``split``."""
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def split_of(filename: str) -> str | None:
    """The split a shard's file name belongs to (``"train"``, ``"val"``), or None."""
    prefix = os.path.basename(filename).split("-", 1)[0]
    return prefix if prefix in SPLITS else None


def _meta_error(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what}; the metadata does not describe the shards: "
                     f"{fix(path.parent)}")


def read_meta(directory: Path) -> dict:
    """``directory/meta.json``, checked field by field (a ``UserError`` names the bad one),
    with the optional keys filled in."""
    path = Path(directory) / META
    if not path.is_file():
        raise UserError(f"{path} is missing: the shards need the metadata that describes "
                        "them; if python -m trainer.export_data wrote them, export again (out="
                        f"{directory}); if another tool did, write it with python -m "
                        f"trainer.export_data --index {directory}")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _meta_error(path, f"not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _meta_error(path, f"format is not {FORMAT!r}")
    if meta.get("version") == 1:
        raise _meta_error(path, "version 1 does not record the features' preparation (version "
                          f"{VERSION} does)")
    if meta.get("version") != VERSION:
        raise _meta_error(path, f"version {meta.get('version')!r} is not {VERSION}")
    meta = {**DEFAULTS, **meta}
    if meta.get("task") not in TASKS:
        raise _meta_error(path, f"task {meta.get('task')!r} is not one of {TASKS}")
    shape = meta.get("feature_shape")
    if not (isinstance(shape, list) and shape and all(_positive(d) for d in shape)):
        raise _meta_error(path, f"feature_shape {shape!r} is not a list of positive integers")
    if meta["feature_dtype"] not in DTYPES:
        raise _meta_error(path, f"feature_dtype {meta['feature_dtype']!r} is not one of "
                          f"{tuple(DTYPES)}")
    keys = (meta["x_key"], meta["y_key"])
    if not all(isinstance(k, str) and k for k in keys) or keys[0] == keys[1]:
        raise _meta_error(path, f"x_key and y_key {list(keys)} are not two different names")
    if not _positive(meta.get("num_outputs")):
        raise _meta_error(path, f"num_outputs {meta.get('num_outputs')!r} is not a positive "
                          "integer")
    if "preparation" not in meta:
        raise _meta_error(path, "preparation is missing (null if the features need none)")
    try:
        Scaling.from_json(meta["preparation"])
    except ValueError as e:
        raise _meta_error(path, f"preparation {e}") from None
    splits = meta.get("splits")
    for split in SPLITS:
        entry = splits.get(split) if isinstance(splits, dict) else None
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not all(_shard_entry(s) for s in shards):
            raise _meta_error(path, f"splits.{split}.shards is not a list of {{file, "
                              "examples, bytes}")
        if not isinstance(entry.get("nonfinite_examples", 0), int):
            raise _meta_error(path, f"splits.{split}.nonfinite_examples is not an integer")
    return meta


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _shard_entry(entry) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("file"), str)
            and isinstance(entry.get("examples"), int) and entry["examples"] >= 0
            and isinstance(entry.get("bytes"), int))


def write_meta(directory: Path, meta: dict) -> None:
    """Write ``directory/meta.json`` atomically: a reader sees the old file or the new one,
    never half of one."""
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(Path(directory) / META, lambda tmp: Path(tmp).write_text(text))
