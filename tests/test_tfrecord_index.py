"""python -m trainer.export_data --index DIR: the meta.json of shards another tool wrote, read
from the shards themselves; bad shards exit 2 with one line naming the file and the fix."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from trainer.data import Batching, tfrecord
from trainer.data.tfrecord_meta import META
from trainer.export_data import index_main


def _feature(values) -> tf.train.Feature:
    if isinstance(values, bytes):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[values]))
    values = np.atleast_1d(values)
    if values.dtype.kind == "f":
        return tf.train.Feature(float_list=tf.train.FloatList(value=values))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))


def _example(**features) -> bytes:
    feature = {k: _feature(v) for k, v in features.items()}
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _shard(directory, name, records):
    with tf.io.TFRecordWriter(str(directory / name)) as w:
        for r in records:
            w.write(r)


def _other_tool(directory, *, x_key="image", y_key="label", counts=(30, 20), n_val=10, d=4,
                regression=False):
    """Train shards of ``counts`` examples and one val shard, as a plain TFRecordWriter
    writes them: int64 pixels ``x_key`` and an int64 class ``y_key`` (classes 0-4), or
    float features and two float targets."""
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, n in [*((f"train-{i:05d}-of-{len(counts):05d}.tfrecord", c)
                      for i, c in enumerate(counts)), ("val-00000-of-00001.tfrecord", n_val)]:
        if regression:
            x = rng.normal(size=(n, d)).astype(np.float32)
            y = np.stack([x.sum(1), x[:, 0]], 1)
        else:
            x, y = rng.integers(0, 256, (n, d)), rng.integers(0, 5, n)
            y[0] = 4  # the largest class is in every shard
        _shard(directory, name, [_example(**{x_key: xi, y_key: yi}) for xi, yi in zip(x, y)])
        rows[name] = (x, y)
    return rows


def _meta(directory) -> dict:
    return json.loads((directory / META).read_text())


def _index(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = index_main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_index_writes_the_meta_json_the_reader_takes(tmp_path, capsys):
    directory = tmp_path / "mine"
    rows = _other_tool(directory)
    code, out, err = _index(capsys, "--index", directory)
    assert code == 0, err
    assert f"data.path='{directory}/*.tfrecord'" in out and "preparation null" in out
    meta = _meta(directory)
    shards = meta["splits"]["train"]["shards"] + meta["splits"]["val"]["shards"]
    assert {k: meta[k] for k in ("format", "version", "name", "task", "x_key", "y_key",
                                 "feature_shape", "feature_dtype", "num_outputs",
                                 "preparation")} == {
        "format": "trainer.tfrecord", "version": 2, "name": "mine", "task": "classification",
        "x_key": "image", "y_key": "label", "feature_shape": [4], "feature_dtype": "int64",
        "num_outputs": 5, "preparation": None}
    assert [(s["file"], s["examples"], s["bytes"]) for s in shards] == [
        (name, len(x), (directory / name).stat().st_size) for name, (x, _) in rows.items()]
    assert (meta["splits"]["train"]["examples"], meta["splits"]["val"]["examples"]) == (50, 10)
    assert not [f for f in os.listdir(directory) if f.startswith(".")]  # no temporary left
    # The reader takes it: int64 pixels arrive as float32, the classes as they were written.
    data = tfrecord(path=str(directory), batching=Batching(batch_size=8, shuffle=False))
    x_val, y_val = data.arrays("val")
    assert x_val.dtype == np.float32 and data.num_outputs == 5
    np.testing.assert_array_equal(x_val, rows["val-00000-of-00001.tfrecord"][0])
    np.testing.assert_array_equal(y_val, rows["val-00000-of-00001.tfrecord"][1])
    assert data.prepare(x_val[:2]).tolist() == x_val[:2].tolist()  # no preparation recorded


def test_regression_and_nonfinite_features_are_counted(tmp_path, capsys):
    directory = tmp_path / "reg"
    _other_tool(directory, x_key="features", y_key="target", regression=True, counts=(12,))
    _shard(directory, "train-00000-of-00001.tfrecord",
           [_example(features=np.array([np.nan, 1, 2, 3], np.float32), target=[1.0, 2.0]),
            _example(features=np.ones(4, np.float32), target=[0.5, 0.5])])
    assert _index(capsys, "--index", directory)[0] == 0
    meta = _meta(directory)
    assert (meta["task"], meta["num_outputs"], meta["feature_dtype"]) == (
        "regression", 2, "float32")
    assert meta["splits"]["train"]["nonfinite_examples"] == 1
    data = tfrecord(path=str(directory), batching=Batching(batch_size=2), allow_nonfinite=True)
    assert data.task == "regression" and data.input_shape == (4,)


def test_indexing_again_keeps_what_the_records_cannot_show(tmp_path, capsys):
    directory = tmp_path / "mine"
    _other_tool(directory, x_key="a", y_key="b", d=6)
    _shard(directory, "val-00000-of-00001.tfrecord",
           [_example(a=np.arange(6), b=1, c=0.5), _example(a=np.arange(6), b=0, c=0.5)])
    # Three features: which is which must be said; then it is remembered.
    code, _, err = _index(capsys, "--index", directory)
    assert code == 2 and "cannot tell the features from the target" in err
    assert _index(capsys, "--index", directory, "--x-key", "a", "--y-key", "b")[0] == 0
    meta = _meta(directory)
    meta.update(name="pixels", feature_shape=[2, 3], num_outputs=7,
                preparation={"subtract": 1.0, "divide_by": 255.0})
    (directory / META).write_text(json.dumps(meta))
    _shard(directory, "val-00001-of-00001.tfrecord", [_example(a=np.arange(6), b=2, c=0.0)])
    assert _index(capsys, "--index", directory)[0] == 0
    again = _meta(directory)
    assert {k: again[k] for k in ("name", "feature_shape", "num_outputs", "preparation",
                                  "x_key", "y_key")} == {
        "name": "pixels", "feature_shape": [2, 3], "num_outputs": 7,
        "preparation": {"subtract": 1.0, "divide_by": 255.0}, "x_key": "a", "y_key": "b"}
    assert again["splits"]["val"]["examples"] == 3
    data = tfrecord(path=str(directory), batching=Batching(batch_size=4))
    assert data.input_shape == (2, 3)
    np.testing.assert_allclose(data.prepare(np.full((1, 6), 256.0)), np.ones((1, 2, 3)))


def _damage_record(d):
    _shard(d, "train-00001-of-00002.tfrecord", [_example(image=np.arange(4), label=1),
                                                b"\xff\xff not an example"])


def _gzip(d):
    path = d / "train-00000-of-00002.tfrecord"
    path.write_bytes(gzip.compress(path.read_bytes()))


@pytest.mark.parametrize(("damage", "culprit", "message"), [
    (lambda d: [f.unlink() for f in d.iterdir()], "",
     "no shards (files named train-*.tfrecord and val-*.tfrecord)"),
    (lambda d: (d / "test.tfrecord").write_bytes(b""), "test.tfrecord",
     "not named as a shard; rename it train-NNNNN-of-NNNNN.tfrecord"),
    (lambda d: (d / "train-00000-of-00002.tfrecord").write_bytes(b"hello, not a tfrecord"),
     "train-00000-of-00002.tfrecord", "not a readable TFRecord file (corrupted record at 0"),
    (_gzip, "train-00000-of-00002.tfrecord", "write it with tf.io.TFRecordWriter (uncompressed)"),
    (_damage_record, "train-00001-of-00002.tfrecord",
     "record 1 is not a tf.train.Example; write every record as one tf.train.Example"),
    (lambda d: _shard(d, "val-00000-of-00001.tfrecord", [_example(image=np.arange(3), label=1)]),
     "val-00000-of-00001.tfrecord",
     "record 0 has 3 int64 values under 'image' where the first record of "
     "train-00000-of-00002.tfrecord has 4 int64 values: the shards mix schemas"),
    (lambda d: _shard(d, "val-00000-of-00001.tfrecord", [_example(image=np.arange(4),
                                                                   label=np.float32(1))]),
     "val-00000-of-00001.tfrecord", "record 0 has 1 float value under 'label' where"),
    (lambda d: _shard(d, "val-00000-of-00001.tfrecord", [_example(image=np.arange(4))]),
     "val-00000-of-00001.tfrecord", "record 0 has no feature under 'label'"),
    (lambda d: _shard(d, "train-00000-of-00002.tfrecord", [_example(image=b"\x89PNG", label=1)]),
     "train-00000-of-00002.tfrecord", "the features 'image' hold 1 bytes value; write them as "
     "a float_list"),
    (lambda d: _shard(d, "train-00000-of-00002.tfrecord", [_example(image=[1, 2], label=[1, 2])]),
     "train-00000-of-00002.tfrecord", "the target 'label' holds 2 int64 values"),
    (lambda d: _shard(d, "train-00000-of-00002.tfrecord", [_example(a=[1.0], b=[2.0])]),
     "train-00000-of-00002.tfrecord", "cannot tell the features from the target among the "
     "record's features ['a', 'b']; pass --x-key NAME --y-key NAME"),
    (lambda d: _shard(d, "val-00000-of-00001.tfrecord", [_example(image=np.arange(4),
                                                                   label=-1)]),
     "val-00000-of-00001.tfrecord", "record 0's class -1 is negative"),
    (lambda d: _shard(d, "val-00000-of-00001.tfrecord", []), "",
     "no val-*.tfrecord shard holds a record; both splits are needed"),
], ids=["no-shards", "misnamed", "not-tfrecord", "gzip", "not-an-example", "mixed-length",
        "mixed-kind", "missing-key", "bytes", "multi-label", "ambiguous", "negative-class",
        "empty-split"])
def test_bad_shards_exit_2_with_one_line_naming_the_file(tmp_path, capsys, damage, culprit,
                                                         message):
    directory = tmp_path / "mine"
    _other_tool(directory, counts=(30, 20))
    damage(directory)
    code, out, err = _index(capsys, "--index", directory)
    assert code == 2 and out == ""
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("error: "), err
    assert f"{directory / culprit}".rstrip("/") in err and message in err, err
    assert not (directory / META).exists()


def test_usage_errors_are_one_line(tmp_path, capsys):
    code, _, err = _index(capsys, "--index", tmp_path / "nowhere")
    assert code == 2 and err.strip() == (f"error: --index {tmp_path / 'nowhere'}: no such "
                                         "directory; pass the directory that holds the shards")
    code, _, err = _index(capsys, "--index")
    assert code == 2 and err.count("\n") == 1 and err.startswith(
        "error: argument --index: expected one argument; usage: python -m trainer.export_data "
        "--index DIR")


def _export_cli(*args, cwd):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "trainer.export_data", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_index_command_in_a_subprocess(tmp_path):
    directory = tmp_path / "mine"
    _other_tool(directory)
    p = _export_cli("--index", str(directory), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"wrote {directory / META}: 50 train and 10 validation examples")
    assert _meta(directory)["num_outputs"] == 5
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # no run directory, no log file
    _shard(directory, "val-00000-of-00001.tfrecord", [_example(image=np.arange(3), label=1)])
    p = _export_cli("--index", str(directory), cwd=tmp_path)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and lines[-1].startswith(
        f"error: {directory / 'val-00000-of-00001.tfrecord'}: record 0 has 3 int64 values")
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in p.stderr
