"""Indexing shards another tool wrote: read them, infer what they hold, write their meta.json.

``python -m trainer.export_data --index DIR`` calls ``index_shards``. Every record of
every shard is read once (tf.data checks each record's checksums) and parsed as a
``tf.train.Example``; the first one fixes the schema and every other must match it.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer.common.errors import UserError
from trainer.data.preparation import Scaling
from trainer.data.tfrecord_meta import DTYPES, FORMAT, META, SPLITS, VERSION, write_meta

#: Names taken for the target when a record holds two features and neither is ``y``.
TARGET_NAMES = ("y", "label", "labels", "target", "targets", "class")
KEYS_FIX = "pass --x-key NAME --y-key NAME"
REWRITE = "write every record as one tf.train.Example of the same features"


@dataclass(frozen=True)
class Schema:
    """What the first record holds: the keys, list kinds and lengths every record repeats."""

    first: Path
    x_key: str
    y_key: str
    x_kind: str
    x_size: int
    y_kind: str
    y_size: int

    @property
    def task(self) -> str:
        return "classification" if self.y_kind == "int64_list" else "regression"

    def describe(self, key: str) -> str:
        kind, size = ((self.x_kind, self.x_size) if key == self.x_key
                      else (self.y_kind, self.y_size))
        return _values(kind, size)


def _values(kind: str | None, size: int) -> str:
    name = {"float_list": "float", "int64_list": "int64", "bytes_list": "bytes"}.get(kind)
    return "no values" if name is None else f"{size} {name} value{'s' * (size != 1)}"


def shard_files(directory: Path) -> dict[str, list[str]]:
    """The shards' file names in ``directory`` by split (``train-*.tfrecord``,
    ``val-*.tfrecord``), sorted. A file that looks meant as a shard but is named otherwise
    is an error: ``data.path=DIR`` would not read it."""
    found: dict[str, list[str]] = {split: [] for split in SPLITS}
    for name in sorted(os.listdir(directory)):
        if name.startswith(".") or not (directory / name).is_file():
            continue
        split = name.split("-", 1)[0]
        if split in SPLITS and "-" in name and name.endswith(".tfrecord"):
            found[split].append(name)
        elif split in SPLITS or ".tfrecord" in name:
            raise UserError(f"{directory / name}: not named as a shard; rename it "
                            "train-NNNNN-of-NNNNN.tfrecord or val-NNNNN-of-NNNNN.tfrecord (the "
                            "prefix before the first - names the split) or move it out")
    if not found["train"] and not found["val"]:
        raise UserError(f"{directory}: no shards (files named train-*.tfrecord and "
                        "val-*.tfrecord); pass --index the directory that holds them")
    return found


def _records(path: Path):
    """The serialized records of the shard ``path``, in order."""
    import tensorflow as tf

    try:
        for batch in tf.data.TFRecordDataset(str(path)).batch(1024):
            yield from batch.numpy()
    except tf.errors.OpError as e:
        reason = (e.message or str(e)).strip().splitlines()[0]
        reason = re.sub(r"\{\{[^}]*\}\}\s*|\s*\[Op:.*$", "", reason)  # TensorFlow's decorations
        raise UserError(f"{path}: not a readable TFRecord file ({reason}); write it with "
                        "tf.io.TFRecordWriter (uncompressed) or move it out") from None


def _features(path: Path, index: int, record: bytes):
    from google.protobuf.message import DecodeError
    from tensorflow.core.example.example_pb2 import Example

    try:
        return Example.FromString(record).features.feature
    except DecodeError:
        raise UserError(f"{path}: record {index} is not a tf.train.Example; {REWRITE} "
                        "(tf.train.Example(...).SerializeToString())") from None


def _schema(path: Path, feature, x_key: str | None, y_key: str | None) -> Schema:
    """The schema of the first record, ``feature``: the keys given, else inferred."""
    names = sorted(feature)
    if x_key and x_key == y_key:
        raise UserError(f"--x-key and --y-key both name {x_key!r}; name the features and the "
                        "target")
    for key in (x_key, y_key):
        if key and key not in feature:
            raise UserError(f"{path}: the first record has no feature {key!r} (it has "
                            f"{names}); {KEYS_FIX}")
    if not (x_key and y_key):
        if x_key or y_key:
            others = [k for k in names if k not in (x_key, y_key)]
            pair = (x_key, others[0]) if x_key else (others[0], y_key)
            x_key, y_key = pair if len(others) == 1 else (None, None)
        elif "x" in feature and "y" in feature:
            x_key, y_key = "x", "y"
        elif len(names) == 2:
            targets = [k for k in names if k.lower() in TARGET_NAMES]
            if len(targets) == 1:
                y_key = targets[0]
                x_key = next(k for k in names if k != y_key)
        if not (x_key and y_key):
            raise UserError(f"{path}: cannot tell the features from the target among the "
                            f"record's features {names}; {KEYS_FIX}")
    x, y = feature[x_key], feature[y_key]
    x_kind, y_kind = x.WhichOneof("kind"), y.WhichOneof("kind")
    x_size = len(getattr(x, x_kind).value) if x_kind else 0
    y_size = len(getattr(y, y_kind).value) if y_kind else 0
    if x_kind not in DTYPES.values() or not x_size:
        raise UserError(f"{path}: the features {x_key!r} hold {_values(x_kind, x_size)}; "
                        "write them as a float_list (or int64_list) of the values, flattened "
                        "row-major (encoded images must be decoded first)")
    if y_kind not in DTYPES.values() or not y_size or (y_kind == "int64_list" and y_size > 1):
        raise UserError(f"{path}: the target {y_key!r} holds {_values(y_kind, y_size)}; write "
                        "a class as one int64 value (int64_list), regression targets as a "
                        "float_list")
    return Schema(path, x_key, y_key, x_kind, x_size, y_kind, y_size)


def _check(schema: Schema, path: Path, index: int, feature):
    """``(features, target)`` of one record, as lists; an error if it breaks the schema."""
    pairs = []
    for key, kind, size in ((schema.x_key, schema.x_kind, schema.x_size),
                            (schema.y_key, schema.y_kind, schema.y_size)):
        found = feature.get(key)
        found_kind = found.WhichOneof("kind") if found is not None else None
        values = getattr(found, found_kind).value if found_kind else ()
        if found_kind != kind or len(values) != size:
            has = "no feature" if found is None else _values(found_kind, len(values))
            raise UserError(f"{path}: record {index} has {has} under {key!r} where the first "
                            f"record of {schema.first.name} has {schema.describe(key)}: the "
                            f"shards mix schemas; {REWRITE}")
        pairs.append(values)
    return pairs


def _previous(directory: Path) -> dict:
    """The ``meta.json`` already in ``directory`` if it is a JSON object, else ``{}``: its
    name, feature shape, keys, classes and preparation (which the records cannot show) are
    kept when they still fit."""
    import json

    try:
        old = json.loads((directory / META).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return old if isinstance(old, dict) else {}


def _kept(old: dict, key: str, fits) -> bool:
    try:
        return key in old and bool(fits(old[key]))
    except (TypeError, ValueError):
        return False


def index_shards(directory, *, x_key: str | None = None, y_key: str | None = None) -> dict:
    """Read every shard in ``directory``, write its ``meta.json`` (atomically) and return it.

    Infers the feature and target keys (``x``/``y``, or the two features of which one is
    named like a target; or pass them), the features' length and dtype (float32 from a
    float_list, int64 from an int64_list), the task (an int64 target: classification, with
    the largest class id + 1 classes; a float target: regression), and counts each shard's
    examples and bytes and each split's examples with NaN or infinity. The preparation is
    recorded as null (none known). An existing ``meta.json``'s ``name``, ``feature_shape``
    (if it holds as many values), ``preparation``, keys and larger ``num_outputs`` are kept.
    """
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise UserError(f"--index {directory}: no such directory; pass the directory that "
                        "holds the shards")
    files = shard_files(directory)
    old = _previous(directory)
    remembered = (old.get("x_key"), old.get("y_key"))
    schema, largest = None, -1
    splits = {}
    for split in SPLITS:
        entries, nonfinite = [], 0
        for name in files[split]:
            path, count = directory / name, 0
            for index, record in enumerate(_records(path)):
                feature = _features(path, index, record)
                if schema is None:
                    keys = (x_key, y_key)
                    if not any(keys) and all(isinstance(k, str) and k in feature
                                             for k in remembered):
                        keys = remembered
                    schema = _schema(path, feature, *keys)
                x, y = _check(schema, path, index, feature)
                if schema.x_kind == "float_list":
                    nonfinite += not np.isfinite(np.asarray(x, np.float32)).all()
                if schema.task == "classification":
                    if y[0] < 0:
                        raise UserError(f"{path}: record {index}'s class {y[0]} is negative; "
                                        "classes are 0, 1, ... (int64)")
                    largest = max(largest, y[0])
                elif not np.isfinite(np.asarray(y, np.float32)).all():
                    raise UserError(f"{path}: record {index}'s targets hold NaN or infinity; "
                                    "clean the data and write the shard again")
                count += 1
            entries.append({"file": name, "examples": count, "bytes": path.stat().st_size})
        splits[split] = {"examples": sum(e["examples"] for e in entries),
                         "nonfinite_examples": int(nonfinite), "shards": entries}
    for split in SPLITS:
        if not splits[split]["examples"]:
            raise UserError(f"{directory}: no {split}-*.tfrecord shard holds a record; both "
                            f"splits are needed: write the {split} examples as "
                            f"{split}-00000-of-00001.tfrecord")
    task = schema.task
    num_outputs = largest + 1 if task == "classification" else schema.y_size
    if task == "classification" and old.get("task") == task and _kept(
            old, "num_outputs", lambda n: isinstance(n, int) and n > num_outputs):
        num_outputs = old["num_outputs"]
    shape = [schema.x_size]
    if _kept(old, "feature_shape", lambda s: isinstance(s, list) and all(
            isinstance(d, int) and d > 0 for d in s) and math.prod(s) == schema.x_size):
        shape = old["feature_shape"]
    preparation = old["preparation"] if _kept(
        old, "preparation", lambda p: p is not None and Scaling.from_json(p)) else None
    meta = {"format": FORMAT, "version": VERSION,
            "name": old["name"] if isinstance(old.get("name"), str) else directory.name,
            "task": task, "x_key": schema.x_key, "y_key": schema.y_key,
            "feature_shape": shape,
            "feature_dtype": next(d for d, k in DTYPES.items() if k == schema.x_kind),
            "num_outputs": int(num_outputs), "preparation": preparation, "splits": splits}
    write_meta(directory, meta)
    return meta
