"""Sharded TFRecord data: shards streamed through tf.data, described by their meta.json.

A directory of shards (``python -m trainer.export_data out=DIR`` writes one; shards another
tool wrote get theirs from ``python -m trainer.export_data --index DIR``) holds
``train-00000-of-00008.tfrecord``... and ``val-00000-of-00002.tfrecord``... (the
prefix before the first ``-`` names the split) and ``meta.json`` (``tfrecord_meta``): the
feature shape, the task, the width of the model's output, the preparation the features
already had, and the examples of each split and shard. Each record is a
``tf.train.Example`` with ``x`` (a float or int64 list: the features, flattened row-major)
and ``y`` (an int64 list of one class, or a float list of the regression targets); the
metadata may name other keys. Nothing here loads a whole split: batches stream from disk
through a bounded shuffle buffer.
"""

from __future__ import annotations

import glob
import math
import os
import re
import struct
from pathlib import Path

import numpy as np

from trainer.common.errors import UserError
from trainer.data.base import Data
from trainer.data.options import Batching
from trainer.data.preparation import Scaling, reshape_rows
from trainer.data.tfrecord_meta import (  # noqa: F401 (FORMAT, VERSION, shard_name: re-exported)
    DTYPES,
    FORMAT,
    META,
    SPLITS,
    VERSION,
    fix,
    read_meta,
    shard_name,
    split_of,
)

#: Shards read at once (the interleave's cycle length). A constant, not AUTOTUNE: the
#: order of the examples depends on it, and must not depend on the machine.
READERS = 8


# --- finding and checking the shards -------------------------------------------------------
def find_shards(path: str | None) -> tuple[Path, dict, dict[str, list[dict]]]:
    """The directory, its metadata, and the metadata's entries of the shards ``path``
    matches, by split (in file-name order). ``path`` is a glob or a directory."""
    if not path or path == "???":
        raise UserError("data.path is not set; pass data.path='DIR/*.tfrecord' (the shards "
                        "python -m trainer.export_data out=DIR wrote)")
    pattern = os.path.expanduser(path)
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "*.tfrecord")
    matched = sorted(f for f in glob.glob(pattern) if os.path.isfile(f))
    if not matched:
        raise UserError(f"data.path={path!r} matches no files; point it at exported shards, "
                        "e.g. data.path='DIR/*.tfrecord' (python -m trainer.export_data out=DIR)")
    directories = {os.path.dirname(os.path.abspath(f)) for f in matched}
    if len(directories) > 1:
        raise UserError(f"data.path={path!r} matches shards in {len(directories)} directories; "
                        "point it at the shards of one export")
    directory = Path(directories.pop())
    meta = read_meta(directory)
    listed = {s["file"]: (split, s) for split in SPLITS for s in meta["splits"][split]["shards"]}
    for split in SPLITS:
        for entry in meta["splits"][split]["shards"]:
            if not (directory / entry["file"]).is_file():
                raise UserError(f"{directory / entry['file']} is missing (listed in "
                                f"{directory / META}); restore it or {fix(directory)}")
    chosen: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for f in matched:
        name = os.path.basename(f)
        if name not in listed:
            raise UserError(f"{f} is not a shard listed in {directory / META}; remove it, "
                            f"narrow data.path, or {fix(directory)}")
        split, entry = listed[name]
        size = os.path.getsize(f)
        if size != entry["bytes"]:
            raise UserError(f"{f} has {size} bytes, {META} says {entry['bytes']}: the shard "
                            f"changed after the export (truncated or rewritten); "
                            f"{fix(directory)}")
        chosen[split].append(entry)
    for split in SPLITS:
        if not sum(e["examples"] for e in chosen[split]):
            raise UserError(f"data.path={path!r} matches no {split} examples (no {split}-*."
                            "tfrecord shard with records); match both the train- and the val- "
                            "shards, e.g. data.path='DIR/*.tfrecord'")
    return directory, meta, chosen


def first_record(path: Path) -> bytes | None:
    """The first record of a TFRecord file (None if it has none), read without TensorFlow.

    A record is its length (8 bytes, little-endian), a checksum of it (4), the data and
    a checksum of the data (4); tf.data checks the checksums when it reads the shard.
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if not head:
            return None
        if len(head) < 12:
            raise UserError(f"{path}: not a TFRecord file (it ends inside the first record's "
                            f"header); {fix(path.parent)}")
        (length,) = struct.unpack("<Q", head[:8])
        data = f.read(length) if length <= os.path.getsize(path) else b""
        if len(data) != length:
            raise UserError(f"{path}: not a TFRecord file (its first record claims {length} "
                            f"bytes, more than the file holds); {fix(path.parent)}")
        return data


def check_first_record(path: Path, meta: dict, *, allow_nonfinite: bool) -> None:
    """The shard's first record has the features and target ``meta`` describes."""
    from google.protobuf.message import DecodeError
    from tensorflow.core.example.example_pb2 import Example

    data = first_record(path)
    if data is None:
        return
    try:
        feature = Example.FromString(data).features.feature
    except DecodeError:
        raise UserError(f"{path}: the first record is not a tf.train.Example; "
                        f"{fix(path.parent)}") from None
    size = math.prod(meta["feature_shape"])
    x_key, y_key, kind = meta["x_key"], meta["y_key"], DTYPES[meta["feature_dtype"]]
    x = list(getattr(feature[x_key], kind).value) if x_key in feature else []
    if len(x) != size:
        raise UserError(f"{path}: the first record has {len(x)} {meta['feature_dtype']} values "
                        f"of {x_key!r}, {META} says shape {meta['feature_shape']} ({size}): the "
                        f"shards and the metadata disagree; {fix(path.parent)}")
    y = feature.get(y_key)
    width = 1 if meta["task"] == "classification" else meta["num_outputs"]
    values = (y.int64_list.value if meta["task"] == "classification" else y.float_list.value
              ) if y is not None else []
    if len(values) != width:
        raise UserError(f"{path}: the first record has {len(values)} target values of "
                        f"{y_key!r}, {META} says {width} ({meta['task']}); {fix(path.parent)}")
    if not allow_nonfinite and not np.isfinite(np.asarray(x, np.float32)).all():
        raise UserError(f"{path}: the first record's features hold NaN or infinity; clean the "
                        "data and re-export it, or set data.allow_nonfinite=true")


# --- the data set --------------------------------------------------------------------------
def _all_finite(tensor, message: str):
    """``tensor``, after an in-graph check that it holds no NaN or infinity (the check fails
    with ``message``). ``tf.debugging.check_numerics`` does the same element by element: on
    a batch of 256 x 784 floats it took 0.4 ms of CPU, more than parsing the batch, while
    this vectorized reduction takes under a tenth of that."""
    import tensorflow as tf

    finite = tf.debugging.Assert(tf.reduce_all(tf.math.is_finite(tensor)), [message])
    with tf.control_dependencies([finite]):
        return tf.identity(tensor)


class TFRecordData(Data):
    """Training and validation shards streamed through tf.data (see ``tfrecord``).

    Each epoch reads every training shard once: the shard order is drawn from
    ``(seed, epoch)``, ``READERS`` shards are read at once and interleaved record by
    record, the records pass a shuffle buffer of ``shuffle_buffer`` examples (seeded
    by ``(seed, epoch)`` too) and are batched by ``batch_size`` within the epoch (the
    last batch may be short), then parsed and checked a batch at a time. The
    validation shards are read in file order. Memory holds the shuffle buffer, a few
    batches in flight and a read buffer per open shard, whatever the data's size.

    Args:
        directory: the export's directory; ``meta``: its metadata.
        shards: the metadata's entries of the shards to read, by split.
        batching, allow_nonfinite: as ``DataModule``'s (``batching.in_memory`` is the
            builder's: ``tfrecord``).
        shuffle_buffer: examples in the shuffle buffer (memory: that many records;
            the buffer is also saved in every checkpoint).
    """

    def __init__(self, *, directory: Path, meta: dict, shards: dict,
                 batching: Batching = Batching(), shuffle_buffer: int = 10_000,
                 allow_nonfinite: bool = False):
        super().__init__(batching=batching)
        self.directory, self.meta, self.name = Path(directory), meta, str(directory)
        self.task = meta["task"]
        self.files = {s: [str(self.directory / e["file"]) for e in shards[s]] for s in SPLITS}
        self.num_examples = {s: sum(e["examples"] for e in shards[s]) for s in SPLITS}
        self.shuffle_buffer = int(shuffle_buffer)
        self.allow_nonfinite = bool(allow_nonfinite)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example's features (``meta.json``'s ``feature_shape``)."""
        return tuple(self.meta["feature_shape"])

    @property
    def num_outputs(self) -> int:
        """Width of the model's output layer (``meta.json``'s ``num_outputs``)."""
        return int(self.meta["num_outputs"])

    def steps_per_epoch(self, split: str = "train") -> int:
        """Batches in one pass over a split (the last one may be short)."""
        return -(-self.num_examples["train" if split == "train" else "val"] // self.batch_size)

    @property
    def preparation(self) -> Scaling | None:
        """What was done to the raw features before they were written (``meta.json``'s
        ``preparation``; None: nothing). The shards hold prepared features: training,
        evaluation and prediction on them read them as they are."""
        return Scaling.from_json(self.meta["preparation"])

    def prepare(self, x):
        """New raw features prepared as the shards' features were (``preparation``; as
        given when None), as float32, flat rows reshaped to ``feature_shape``: what
        ``python -m trainer.predict --input`` feeds the model."""
        x = reshape_rows(x, self.input_shape)
        return x if self.preparation is None else self.preparation(x)

    # --- pipelines ---------------------------------------------------------------------------
    def _decode(self, split: str):
        """``records -> (x, y)`` for a batch of serialized examples, with in-graph checks
        whose failures name the data and the fix (a shard written by hand, or changed
        after the export in a way its size does not show)."""
        import tensorflow as tf

        shape, task, outputs = self.input_shape, self.task, self.num_outputs
        size, where = math.prod(shape), f"{self.directory} ({split} shards)"
        width = 1 if task == "classification" else outputs
        x_key, y_key = self.meta["x_key"], self.meta["y_key"]
        spec = {x_key: tf.io.RaggedFeature(tf.as_dtype(self.meta["feature_dtype"])),
                y_key: tf.io.RaggedFeature(tf.int64 if task == "classification" else tf.float32)}

        def decode(records):
            parsed = tf.io.parse_example(records, spec)
            x, y = parsed[x_key], parsed[y_key]
            checks = [
                tf.debugging.assert_equal(
                    x.row_lengths(), tf.constant(size, x.row_splits.dtype),
                    message=f"{where}: a record's features are not of shape {list(shape)} "
                    f"({size} values) as {META} says; {fix(self.directory)}"),
                tf.debugging.assert_equal(
                    y.row_lengths(), tf.constant(width, y.row_splits.dtype),
                    message=f"{where}: a record does not have {width} target value(s) as "
                    f"{META} says; {fix(self.directory)}"),
            ]
            with tf.control_dependencies(checks):
                # int64 features (another tool's pixels) become float32, as the in-memory
                # data sets' features do.
                x = tf.reshape(tf.cast(x.flat_values, tf.float32), [-1, *shape])
                y = y.flat_values
            if not self.allow_nonfinite:
                x = _all_finite(x, f"{where}: features hold NaN or infinity; clean the data and "
                                "re-export it, or set data.allow_nonfinite=true")
            if task == "classification":
                in_range = tf.debugging.Assert(
                    tf.reduce_all((y >= 0) & (y < outputs)),
                    [f"{where}: a class label is outside 0..{outputs - 1} (num_outputs in "
                     f"{META}); {fix(self.directory)}"])
                with tf.control_dependencies([in_range]):
                    return x, tf.cast(y, tf.int32)
            y = _all_finite(tf.reshape(y, [-1, outputs]), f"{where}: targets hold NaN or "
                            "infinity; clean the data and re-export it")
            return x, y

        return decode

    def _finish(self, batches, split: str):
        import tensorflow as tf

        ds = batches.map(self._decode(split), num_parallel_calls=tf.data.AUTOTUNE,
                         deterministic=True)
        options = tf.data.Options()
        options.deterministic = True
        # Every worker of a multi-worker run reads the global batch (its replicas take
        # their rows of it), so a strategy must not split the shards between workers.
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF)
        # The checks are stateful ops to tf.data (they may fail), which it refuses to
        # checkpoint by default; they hold no state, so there is none to lose.
        options.experimental_external_state_policy = (
            tf.data.experimental.ExternalStatePolicy.IGNORE)
        return ds.prefetch(tf.data.AUTOTUNE).with_options(options)

    def train_dataset(self):
        """Endless tf.data pipeline of training batches, reshuffled each epoch from the seed.

        Epochs are separate passes (``flat_map`` over an epoch counter), so a batch never
        mixes two epochs and each epoch visits every training example once.
        """
        import tensorflow as tf

        files = tf.constant(self.files["train"])
        count = len(self.files["train"])
        seed, shuffle, buffer, size = self.seed, self.shuffle, self.shuffle_buffer, self.batch_size

        def epoch(e):
            order = files
            key = tf.stack([tf.constant(seed, tf.int64), e])
            if shuffle:
                order = tf.gather(files, tf.random.experimental.stateless_shuffle(
                    tf.range(count), key))
            # Sequential: the order a deterministic parallel interleave gives too, at half its
            # CPU per record (no reader threads handing records over); reading is a small
            # share of a batch's cost, so the parallel map below keeps ahead of the step.
            records = tf.data.Dataset.from_tensor_slices(order).interleave(
                tf.data.TFRecordDataset, cycle_length=min(count, READERS), block_length=1)
            records = records.apply(self._counted("train"))
            if shuffle:
                # A shuffle's seeds are (graph seed, op seed), and this function's graph seed
                # comes from the global seed (tf.random.set_seed) when it is traced. Fixing
                # the graph seed (non-zero: TensorFlow compares it with 0 in Python) and
                # drawing the op seed from (seed, epoch) makes the order a function of
                # data.seed and the epoch alone.
                tf.compat.v1.set_random_seed(1)
                op_seed = tf.random.stateless_uniform([], key, 0, 2**31 - 1, tf.int64)
                records = records.shuffle(buffer, seed=op_seed)
            return records.batch(size)

        return self._finish(tf.data.Dataset.counter().flat_map(epoch), "train")

    def val_dataset(self):
        """Endless tf.data pipeline of validation batches, in a fixed order."""
        return self._finish(self._pass("val").repeat(), "val")

    def _pass(self, split: str):
        """One pass over ``split``, shard after shard: the order the export wrote."""
        import tensorflow as tf

        records = tf.data.TFRecordDataset(self.files[split]).apply(self._counted(split))
        return records.batch(self.batch_size)

    def _counted(self, split: str):
        """Fails a pass over ``split`` whose records are not as many as ``meta.json`` says:
        the trainer's epochs are counted in its steps, and must stay aligned with the data's."""
        import tensorflow as tf

        return tf.data.experimental.assert_cardinality(self.num_examples[split])

    def train_source(self):
        """An ``IteratorSource`` over ``train_dataset()``: the checkpoint holds its position,
        its shuffle buffer and the shards' read offsets."""
        from trainer.data.sources import IteratorSource

        return IteratorSource(self.train_dataset())

    def val_source(self):
        """An ``IteratorSource`` over ``val_dataset()``."""
        from trainer.data.sources import IteratorSource

        return IteratorSource(self.val_dataset())

    def probe_batch(self):
        """The first training batch of epoch 0 (a tensor pair)."""
        return next(iter(self.train_dataset().take(1)))

    def validation_batches(self) -> list:
        """The validation set once, as ``(x, y)`` numpy batches in file order.

        This holds the validation split in memory: callbacks that ask for it (plots,
        final metrics) need it whole.
        """
        ds = self._finish(self._pass("val"), "val")
        return [(x.numpy(), y.numpy()) for x, y in ds]

    def arrays(self, split: str):
        """A whole split as ``(x, y)`` numpy arrays, in file order (memory: the split)."""
        pairs = self.validation_batches() if split == "val" else [
            (x.numpy(), y.numpy()) for x, y in self._finish(self._pass("train"), "train")]
        return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def tfrecord(
    *,
    path: str,
    batching: Batching = Batching(),
    shuffle_buffer: int = 10_000,
    allow_nonfinite: bool = False,
    task: str | None = None,
):
    """TFRecord shards written by ``python -m trainer.export_data`` (or by another tool and
    indexed by ``python -m trainer.export_data --index DIR``), streamed from disk.

    ``path`` is a glob (``DIR/*.tfrecord``) or the shards' directory; the matched
    files named ``train-*`` are the training set, ``val-*`` the validation set, and
    ``DIR/meta.json`` describes them. The features are read as the shards hold them:
    already prepared (``prepare`` applies the recorded preparation to new raw inputs).
    ``task`` (default: the metadata's) must agree with the metadata. ``batching``: see
    ``trainer.data.Batching``; streams with its ``in_memory`` ``auto`` or ``false``;
    ``true`` reads both splits into a ``DataModule`` (the fused in-memory loop, for small
    data, with the same preparation for new inputs).

    Checked here, before training: the metadata, that every listed shard exists with
    the size it had when written, and each shard's first record. While streaming, every
    batch is checked against the metadata and for NaN or infinity (a failure stops the
    run with a message naming the directory).
    """
    from trainer.data.base import DataModule

    if shuffle_buffer < 1:
        raise UserError(f"data.shuffle_buffer={shuffle_buffer} must be at least 1")
    directory, meta, shards = find_shards(path)
    if task is not None and task != meta["task"]:
        raise UserError(f"data.task={task} but {directory / META} says the shards hold "
                        f"{meta['task']} targets; drop data.task or re-export with the task set")
    for split in SPLITS:
        bad = meta["splits"][split].get("nonfinite_examples", 0)
        if bad and not allow_nonfinite:
            raise UserError(f"{directory}: {bad} {split} examples hold NaN or infinity "
                            f"({META}); clean the data and re-export it, or set "
                            "data.allow_nonfinite=true")
    for split in SPLITS:
        for entry in shards[split]:
            check_first_record(directory / entry["file"], meta, allow_nonfinite=allow_nonfinite)
    data = TFRecordData(directory=directory, meta=meta, shards=shards, batching=batching,
                        shuffle_buffer=shuffle_buffer, allow_nonfinite=allow_nonfinite)
    batching.check_fits(data.num_examples["train"], str(directory))
    if batching.in_memory is True:
        return DataModule(train=data.arrays("train"), val=data.arrays("val"), task=data.task,
                          batching=batching, allow_nonfinite=allow_nonfinite, name=data.name,
                          # The arrays are prepared already; new inputs get the same.
                          preprocess=data.preparation)
    return data


# TensorFlow quotes an assertion's message in brackets: "[DIR (train shards): ...] [Condition".
_IN_GRAPH_ERROR = re.compile(r"([^\s\[\]]+ \((?:train|val) shards\): .*?)(?:\] \[|\]?$)", re.M)


def data_error_line(error: Exception) -> str | None:
    """The one-line message of a check this pipeline failed while streaming (a bad record
    met mid-training), from the TensorFlow error that carries it; else None."""
    found = _IN_GRAPH_ERROR.search(getattr(error, "message", None) or str(error))
    return found.group(1).replace("\\'", "'").strip() if found else None
