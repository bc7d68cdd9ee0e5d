"""TFRecord shards: the export writes any configured data set, data=tfrecord streams it back
(every example once an epoch, in a seeded order, bounded memory, exact resume), and bad
shards fail with one line naming the culprit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import Crash
from trainer.common.errors import UserError
from trainer.data import Batching, DataModule, digits, tfrecord
from trainer.data.tfrecord import META, TFRecordData, data_error_line, shard_name
from trainer.driver.run import build, run
from trainer.driver.shards import export, write_shards

QUIET = ["callbacks.progress.mode=log", "callbacks.tensorboard.histogram_every_n_steps=0"]


def _write(directory, *, n=100, n_val=30, d=3, shards=4, task="classification", seed=0):
    """Shards of ``n`` examples whose first feature is the example's id (0..n-1)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + n_val, d)).astype(np.float32)
    x[:, 0] = np.arange(n + n_val)
    y = rng.integers(0, 3, n + n_val) if task == "classification" else x[:, 1:2] * 2.0
    directory.mkdir(parents=True, exist_ok=True)
    write_shards(directory, x_train=x[:n], y_train=y[:n], x_val=x[n:], y_val=y[n:], task=task,
                 num_outputs=3 if task == "classification" else 1, shards=shards, name="ids")
    return directory


def _ids(batches) -> list[int]:
    return [int(v) for x, _ in batches for v in np.asarray(x)[:, 0]]


def _epochs(data: TFRecordData, epochs: int) -> list[list[int]]:
    it = iter(data.train_dataset())
    steps = data.steps_per_epoch()
    return [_ids(next(it) for _ in range(steps)) for _ in range(epochs)]


def _rewrite(directory, filename, records):
    """Replace a shard by ``records`` and record its new size in the metadata, as a
    hand-written shard with matching metadata would be."""
    with tf.io.TFRecordWriter(str(directory / filename)) as w:
        for r in records:
            w.write(r)
    meta = json.loads((directory / META).read_text())
    for split in meta["splits"].values():
        for entry in split["shards"]:
            if entry["file"] == filename:
                entry["bytes"] = (directory / filename).stat().st_size
    (directory / META).write_text(json.dumps(meta))


def _example(x, y) -> bytes:
    e = tf.train.Example()
    e.features.feature["x"].float_list.value.extend(list(x))
    e.features.feature["y"].int64_list.value.append(y)
    return e.SerializeToString()


def _records(path) -> list[bytes]:
    return [r.numpy() for r in tf.data.TFRecordDataset(str(path))]


@pytest.fixture
def export_cfg(make_cfg):
    """Compose ``export_data.yaml`` (the export command's root) with the dense experiment.

    Depends on ``make_cfg`` for its clean-up of Hydra's global state."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    def _compose(*overrides):
        GlobalHydra.instance().clear()
        with initialize_config_module("trainer.configs", version_base="1.3"):
            return compose("export_data", overrides=["+experiment=dense", *overrides])

    return _compose


# --- streaming -----------------------------------------------------------------------------
def test_every_epoch_visits_every_example_once_in_a_seeded_order(tmp_path):
    directory = _write(tmp_path / "d")
    data = tfrecord(path=str(directory / "*.tfrecord"), batching=Batching(batch_size=16, seed=3),
                    shuffle_buffer=20)
    assert data.steps_per_epoch() == 7 and data.steps_per_epoch("val") == 2  # 100 = 6*16 + 4
    first = next(iter(data.train_dataset()))
    assert first[0].dtype == tf.float32 and first[1].dtype == tf.int32
    epochs = _epochs(data, 3)
    for ids in epochs:
        assert sorted(ids) == list(range(100))  # each example once; the short batch kept
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled every epoch
    # The order is the seed's alone: not the global seed's, not the process's.
    tf.random.set_seed(123)
    again = tfrecord(path=str(directory), batching=Batching(batch_size=16, seed=3),
                     shuffle_buffer=20)
    assert _epochs(again, 3) == epochs
    assert _epochs(tfrecord(path=str(directory), batching=Batching(batch_size=16, seed=4)),
                   1)[0] != epochs[0]
    # Validation: the export's order, every time.
    val = _ids(data.validation_batches())
    val_batches = iter(data.val_dataset())
    assert val == list(range(100, 130)) == _ids(next(val_batches) for _ in range(2))
    assert _ids(next(val_batches) for _ in range(2)) == val  # endless, one pass after another
    assert _ids([data.probe_batch()]) == epochs[0][:16]


def test_without_shuffle_the_order_is_the_export_order_every_epoch(tmp_path):
    data = tfrecord(path=str(_write(tmp_path / "d", shards=1)),
                    batching=Batching(batch_size=32, shuffle=False))
    a, b = _epochs(data, 2)
    assert a == b and sorted(a) == list(range(100))


def test_regression_shards_and_in_memory_true(tmp_path):
    directory = _write(tmp_path / "d", task="regression")
    data = tfrecord(path=str(directory), batching=Batching(batch_size=8))
    assert data.task == "regression" and data.num_outputs == 1 and data.input_shape == (3,)
    x, y = next(iter(data.val_dataset()))
    np.testing.assert_allclose(y.numpy(), x.numpy()[:, 1:2] * 2.0, rtol=1e-6)
    held = tfrecord(path=str(directory), batching=Batching(batch_size=8, in_memory=True))
    assert isinstance(held, DataModule) and held.holds_in_memory()
    assert sorted(held.x_train[:, 0].tolist()) == list(range(100))


@pytest.mark.slow
def test_export_then_training_from_shards_matches_in_memory(make_cfg, export_cfg,
                                                               tmp_path):
    out = tmp_path / "shards"
    meta = export(export_cfg(f"out={out}", "shards=4"))
    assert meta["splits"]["train"]["examples"] == 1437 and meta["num_outputs"] == 10
    assert sorted(os.listdir(out)) == [META] + [shard_name(s, i, 4) for s in ("train", "val")
                                               for i in range(4)]
    # 10 epochs: after 3 the accuracy still depends on the order of the examples by up to
    # 0.03 (seeds 0-3, either path); by 8 both paths settle within 0.01 of each other.
    common = ["+experiment=dense", "trainer.epochs=10", *QUIET]
    memory = run(make_cfg(*common), run_dir=tmp_path / "memory")
    streamed = run(make_cfg(*common, "data=tfrecord", f"data.path={out}/*.tfrecord"),
                   run_dir=tmp_path / "streamed")
    assert streamed["step"] == memory["step"] == 230  # 1437 examples, batch 64: 23 a epoch
    assert abs(streamed["val/accuracy"] - memory["val/accuracy"]) <= 0.01
    assert streamed["val/accuracy"] > 0.95


@pytest.mark.slow
def test_a_run_resumed_from_shards_ends_bit_identical(make_cfg, tmp_path):
    directory = _write(tmp_path / "d", n=200, d=6)
    cfg = make_cfg("data=tfrecord", f"data.path={directory}/*.tfrecord", "data.batch_size=16",
                   "data.shuffle_buffer=50", "model.hidden_units=[8]", "model.dropout=0.2",
                   "trainer.epochs=3", "trainer.steps_per_execution=1",
                   "callbacks.checkpoint.every_n_steps=5", "callbacks.checkpoint.every_seconds=0",
                   "callbacks.checkpoint.min_interval_seconds=0", *QUIET)
    straight = build(cfg, tmp_path / "straight")
    straight.trainer.fit(straight.step, straight.data)
    crashed = build(cfg, tmp_path / "resumed")
    crashed.trainer.callbacks.append(Crash(at_step=17))  # 13 steps an epoch: mid epoch 2
    with pytest.raises(RuntimeError, match="crash at step"):
        crashed.trainer.fit(crashed.step, crashed.data)
    resumed = build(cfg, tmp_path / "resumed")
    resumed.trainer.fit(resumed.step, resumed.data)
    assert resumed.trainer.restored_from.endswith("ckpt-15")
    assert resumed.trainer.current_step == straight.trainer.current_step == 39
    weights = [[v.numpy() for v in r.models["model"].weights] for r in (straight, resumed)]
    assert all(np.array_equal(a, b) for a, b in zip(*weights))
    assert resumed.trainer.history == straight.trainer.history


# --- errors --------------------------------------------------------------------------------
def _meta(directory) -> dict:
    return json.loads((directory / META).read_text())


def _edit_meta(directory, change):
    meta = _meta(directory)
    change(meta)
    (directory / META).write_text(json.dumps(meta))


def _replace_first(d, name, record):
    _rewrite(d, name, [record, *_records(d / name)[1:]])


def _bad_first_shape(d):
    _replace_first(d, "train-00000-of-00004.tfrecord", _example([1.0, 2.0], 0))


def _nan_first(d):
    _replace_first(d, "train-00001-of-00004.tfrecord", _example([np.nan, 1.0, 2.0], 0))


@pytest.mark.parametrize(("damage", "kwargs", "message"), [
    (None, {"path": "{d}/nothing-*.tfrecord"}, r"nothing-\*\.tfrecord' matches no files"),
    (None, {"path": ""}, r"data\.path is not set"),
    (lambda d: (d / META).unlink(), {},
     r"meta\.json is missing: .*export_data.*; if another tool did, write it with python -m "
     r"trainer\.export_data --index /"),
    (lambda d: (d / META).write_text("{not json"), {}, r"meta\.json: not valid JSON"),
    (lambda d: _edit_meta(d, lambda m: m.update(feature_shape=[0])), {},
     r"meta\.json: feature_shape \[0\] is not a list of positive integers"),
    (lambda d: _edit_meta(d, lambda m: m.update(task="ranking")), {}, r"task 'ranking'"),
    (lambda d: (d / "train-00002-of-00004.tfrecord").open("ab").write(b"xx"), {},
     r"train-00002-of-00004\.tfrecord has \d+ bytes, meta\.json says \d+"),
    (lambda d: (d / "val-00001-of-00004.tfrecord").unlink(), {},
     r"val-00001-of-00004\.tfrecord is missing \(listed in .*meta\.json\)"),
    (lambda d: (d / "extra.tfrecord").write_bytes(b""), {},
     r"extra\.tfrecord is not a shard listed in"),
    (None, {"path": "{d}/train-*.tfrecord"}, r"matches no val examples"),
    (_bad_first_shape, {},
     r"train-00000-of-00004\.tfrecord: the first record has 2 float32 values of 'x', "
     r"meta\.json says shape \[3\]"),
    (_nan_first, {}, r"train-00001-of-00004\.tfrecord: the first record's features hold NaN"),
    (lambda d: _edit_meta(d, lambda m: m["splits"]["val"].update(nonfinite_examples=2)), {},
     r"2 val examples hold NaN or infinity \(meta\.json\); .*data\.allow_nonfinite=true"),
    (None, {"task": "regression"}, r"data\.task=regression but .*classification targets"),
    (None, {"batching": Batching(batch_size=101)},
     r"batch_size=101 is larger than the 100 training examples"),
    (None, {"shuffle_buffer": 0}, r"shuffle_buffer=0 must be at least 1"),
], ids=["no-match", "no-path", "no-meta", "corrupt-meta", "bad-shape-meta", "bad-task-meta",
        "size", "missing-shard", "unlisted", "no-val", "first-record-shape", "first-record-nan",
        "nonfinite-meta", "task", "batch-size", "buffer"])
def test_bad_shards_fail_with_one_line_naming_the_culprit(tmp_path, damage, kwargs, message):
    directory = _write(tmp_path / "d")
    if damage is not None:
        damage(directory)
    kwargs = {"path": str(directory / "*.tfrecord"), **kwargs}
    kwargs["path"] = kwargs["path"].format(d=directory)
    with pytest.raises(UserError, match=message) as e:
        tfrecord(**kwargs)
    assert "\n" not in str(e.value)


def test_allow_nonfinite_accepts_nan_features(tmp_path):
    directory = _write(tmp_path / "d")
    _nan_first(directory)
    data = tfrecord(path=str(directory), batching=Batching(batch_size=100, shuffle=False),
                    allow_nonfinite=True)
    x, _ = next(iter(data.train_dataset()))
    assert np.isnan(x.numpy()).any()


@pytest.mark.parametrize(("record", "message"), [
    ([1.0, 2.0, 3.0, 4.0], r"features are not of shape \[3\] \(3 values\) as meta\.json says"),
    ([5.0, np.inf, 1.0], r"features hold NaN or infinity; .*data\.allow_nonfinite=true"),
], ids=["shape", "nonfinite"])
def test_a_bad_record_inside_a_shard_stops_training_naming_the_data(tmp_path, record, message):
    # The first record is sound and the size matches meta.json, so only reading finds it.
    directory = _write(tmp_path / "d")
    name = "train-00003-of-00004.tfrecord"
    records = _records(directory / name)
    _rewrite(directory, name, [records[0], _example(record, 1), *records[2:]])
    data = tfrecord(path=str(directory), batching=Batching(batch_size=10))
    with pytest.raises(tf.errors.InvalidArgumentError, match=message) as e:
        _epochs(data, 1)
    assert str(directory) in str(e.value)
    # What `python -m trainer` prints: the check's own line, naming the shards.
    line = data_error_line(e.value)
    assert line.startswith(f"{directory} (train shards): ") and "\n" not in line
    assert re.search(message, line)


def test_a_shard_with_fewer_records_than_its_metadata_stops_the_pass(tmp_path):
    directory = _write(tmp_path / "d")
    name = "val-00002-of-00004.tfrecord"
    _rewrite(directory, name, _records(directory / name)[1:])
    data = tfrecord(path=str(directory), batching=Batching(batch_size=10))
    with pytest.raises(tf.errors.FailedPreconditionError, match="expected to contain 30"):
        data.validation_batches()


# --- the export command --------------------------------------------------------------------
def test_export_is_atomic_and_overwrites_only_an_export(export_cfg, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def half_written(directory, **kwargs):
        (directory / "train-00000-of-00002.tfrecord").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("trainer.driver.shards.write_shards", half_written)
    with pytest.raises(OSError, match="disk full"):
        export(export_cfg(f"out={out}", "shards=2"))
    assert os.listdir(tmp_path) == []  # neither out nor a temporary directory is left
    monkeypatch.undo()

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for overwrite, match in [("false", r"is not empty; .*overwrite=true"),
                             ("true", r"no meta\.json: not an earlier export")]:
        with pytest.raises(UserError, match=match):
            export(export_cfg(f"out={tmp_path / 'mine'}",
                                   f"overwrite={overwrite}"))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match=r"shards=0 must be at least 1"):
        export(export_cfg(f"out={out}", "shards=0"))


def _export_cli(*args, cwd):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "trainer.export_data", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_export_command_in_a_subprocess(tmp_path):
    out = tmp_path / "shards"
    p = _export_cli("data=synthetic", "data.task=classification", f"out={out}", "shards=4",
                    cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"data.path='{out}/*.tfrecord'" in p.stdout
    meta = _meta(out)
    assert meta["task"] == "classification" and meta["feature_shape"] == [8]
    assert [s["examples"] for s in meta["splits"]["train"]["shards"]] == [96] * 4  # 384 rows
    assert sorted(os.listdir(tmp_path)) == ["shards"]  # no run directory, no log file
    data = tfrecord(path=str(out / "*.tfrecord"), batching=Batching(batch_size=32))
    assert data.steps_per_epoch() == 12 and data.steps_per_epoch("val") == 4
    # A second export into it is refused; with overwrite=true it replaces the shards.
    p = _export_cli("data=synthetic", f"out={out}", cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"error: out={out} is not empty; choose another directory or pass overwrite=true "
        "to replace it"]
    p = _export_cli("data=synthetic", f"out={out}", "shards=2", "overwrite=true", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert _meta(out)["task"] == "regression" and len(list(out.glob("train-*"))) == 2
    p = _export_cli("data=csv", f"out={tmp_path / 'x'}", cwd=tmp_path)
    assert p.returncode == 2 and "data.path" in p.stderr and len(p.stderr.splitlines()) == 1


# --- memory --------------------------------------------------------------------------------
#: The data set is over 3x this; a whole epoch of training from it grows the peak RSS by less.
BUDGET_MB = 40

_TRAIN_ONE_EPOCH = textwrap.dedent("""
    import json, resource, sys
    import keras
    from trainer import Callback, TapeStep, Trainer
    from trainer.data import Batching, tfrecord
    from trainer.models import mlp

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    class Peak(Callback):
        def on_execution_end(self, trainer, step, logs):
            self.first = getattr(self, "first", None) or peak_mb()

    before = peak_mb()
    data = tfrecord(path=sys.argv[1], batching=Batching(batch_size=256), shuffle_buffer=1024)
    model = mlp(input_shape=data.input_shape, num_outputs=data.num_outputs, hidden_units=[16])
    step = TapeStep(model=model, optimizer=keras.optimizers.Adam(1e-3), task=data.task)
    peak = Peak()
    trainer = Trainer(epochs=1, steps_per_execution=8, callbacks=[peak], run_dir=sys.argv[2])
    logs = trainer.fit(step, data)
    print(json.dumps({"before": before, "first": peak.first, "end": peak_mb(),
                      "step": logs["step"]}))
""")


@pytest.mark.slow
def test_training_from_shards_larger_than_the_budget_keeps_memory_bounded(tmp_path):
    n, d = 48_000, 784  # 48,000 records of 3.2 kB: 147 MB of shards
    directory = tmp_path / "big"
    directory.mkdir()
    rng = np.random.default_rng(0)
    x = rng.random((n, d), dtype=np.float32)
    y = rng.integers(0, 10, n)
    write_shards(directory, x_train=x, y_train=y, x_val=x[:512], y_val=y[:512],
                 task="classification", num_outputs=10, shards=8)
    del x
    size_mb = sum(f.stat().st_size for f in directory.glob("*.tfrecord")) / 2**20
    assert size_mb > 3 * BUDGET_MB
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    p = subprocess.run([sys.executable, "-c", _TRAIN_ONE_EPOCH, str(directory), str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    mb = json.loads(p.stdout.strip().splitlines()[-1])
    assert mb["step"] == 188  # the whole epoch: 48,000 / 256, the last batch short
    # Streaming the epoch, once the pipeline runs (its shuffle buffer full, the loop traced):
    assert mb["end"] - mb["first"] < BUDGET_MB, (mb, size_mb)
    # All of it, from before the data is built, the loop's tracing included (about 60 MB
    # here), stays well under the data's size: with data.in_memory=true the same run grows
    # by five times the data (767 MB: the records, the arrays, the tensors).
    assert mb["end"] - mb["before"] < 0.6 * size_mb, (mb, size_mb)


def test_digits_round_trip_keeps_the_arrays(tmp_path):
    d = digits(batching=Batching(batch_size=64))
    write_shards(tmp_path, x_train=d.x_train, y_train=d.y_train, x_val=d.x_val, y_val=d.y_val,
                 task=d.task, num_outputs=d.num_outputs, shards=3, name=d.name)
    data = tfrecord(path=str(tmp_path / "*.tfrecord"), batching=Batching(batch_size=64))
    x_val, y_val = data.arrays("val")
    np.testing.assert_array_equal(x_val, d.x_val)
    np.testing.assert_array_equal(y_val, d.y_val)
    x, y = data.arrays("train")
    order = np.lexsort(x.T)
    expected = np.lexsort(d.x_train.T)
    np.testing.assert_array_equal(x[order], d.x_train[expected])
    np.testing.assert_array_equal(y[order], d.y_train[expected])


# --- meta.json's errors name the fix -------------------------------------------------------
@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m["splits"]["train"].update(shards=[{"file": 3}]),
     "meta.json: splits.train.shards is not a list of {file, examples, bytes}; the metadata "
     "does not describe the shards: re-export them with python -m trainer.export_data, or for "
     "shards another tool wrote, index them with python -m trainer.export_data --index DIR"),
    (lambda m: m.update(version=1),
     "meta.json: version 1 does not record the features' preparation (version 2 does); "),
    (lambda m: m.pop("preparation"),
     "meta.json: preparation is missing (null if the features need none); "),
    (lambda m: m.update(preparation={"divide_by": 0}),
     "meta.json: preparation divide_by is 0; "),
    (lambda m: m.update(preparation={"scale": 2}),
     "meta.json: preparation {'scale': 2} is neither null nor {\"subtract\": NUMBER, "
     "\"divide_by\": NUMBER}; "),
    (lambda m: m.update(feature_dtype="uint8"),
     "meta.json: feature_dtype 'uint8' is not one of ('float32', 'int64'); "),
], ids=["shards", "version-1", "no-preparation", "divide-by-zero", "bad-preparation", "dtype"])
def test_bad_metadata_names_the_key_and_both_fixes(tmp_path, change, message):
    directory = _write(tmp_path / "d")
    _edit_meta(directory, change)
    with pytest.raises(UserError) as e:
        tfrecord(path=str(directory))
    text = str(e.value)
    assert text.startswith(f"{directory / META}: ")
    assert message.replace("DIR", str(directory)) in text
    assert text.endswith(f"--index {directory}") and "}}" not in text and "\n" not in text


# --- raw or prepared -----------------------------------------------------------------------
def test_predict_on_a_run_trained_from_exported_digits_prepares_raw_inputs(make_cfg, export_cfg,
                                                                          tmp_path):
    """The shards hold the digits prepared (x / 16) and meta.json says so; predict --input
    takes raw pixels (0-16) and prepares them as data=digits does."""
    from omegaconf import OmegaConf

    from trainer.driver.load import load_run
    from trainer.predict import main as predict_main

    out = tmp_path / "shards"
    meta = export(export_cfg(f"out={out}", "shards=2"))
    assert meta["preparation"] == {"subtract": 0.0, "divide_by": 16.0}
    run_dir = tmp_path / "run"
    cfg = make_cfg("+experiment=dense", "data=tfrecord", f"data.path={out}/*.tfrecord",
                   "trainer.max_steps=20", "callbacks=none")
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # what Hydra saves
    run(cfg, run_dir=run_dir)
    prepared = digits(batching=Batching(batch_size=64)).x_val  # what data=digits trains on
    np.savez(tmp_path / "raw.npz", x=prepared * 16.0)
    assert predict_main([str(run_dir), "--input", str(tmp_path / "raw.npz"),
                         "--out", str(tmp_path / "p.npz")]) == 0
    with np.load(tmp_path / "p.npz") as f:
        probabilities = f["probabilities"]
    model = load_run(str(run_dir)).step.models["model"]
    expected = tf.nn.softmax(model.predict(prepared, verbose=0)).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert (probabilities.argmax(1) == digits(batching=Batching(batch_size=64)).y_val).mean() > 0.8


def test_the_preparation_survives_reading_into_memory_and_exporting_again(export_cfg,
                                                                          tmp_path):
    first = tmp_path / "first"
    export(export_cfg(f"out={first}", "shards=2"))
    raw = digits(batching=Batching(batch_size=64)).x_val[:3] * 16.0
    for in_memory in (False, True):
        data = tfrecord(path=str(first), batching=Batching(batch_size=64, in_memory=in_memory))
        np.testing.assert_array_equal(data.prepare(raw),
                                      digits(batching=Batching(batch_size=64)).x_val[:3])
    again = export(export_cfg(f"out={tmp_path / 'again'}", "data=tfrecord",
                              f"data.path={first}", "data.in_memory=true"))
    assert again["preparation"] == {"subtract": 0.0, "divide_by": 16.0}
    # Shards with no preparation recorded take new inputs as they come.
    plain = _write(tmp_path / "plain")
    assert _meta(plain)["preparation"] is None
    assert tfrecord(path=str(plain)).prepare([[1.0, 2.0, 3.0]]).tolist() == [[1.0, 2.0, 3.0]]


def test_an_export_refuses_a_preparation_meta_json_cannot_hold(tmp_path):
    from trainer.data import Scaling
    from trainer.driver.shards import _preparation

    x, y = np.ones((8, 2)), np.arange(8) % 2
    data = DataModule(train=(x, y), val=(x, y), batching=Batching(batch_size=4), name="mine",
                      preprocess=lambda v: v / 255.0)
    with pytest.raises(UserError, match=r"^data mine: its preprocess '.*<lambda>' is a function "
                       r"that meta\.json cannot record; pass preprocess=trainer\.data\.Scaling"):
        _preparation(data)
    data = DataModule(train=(x, y), val=(x, y), batching=Batching(batch_size=4),
                      preprocess=Scaling(divide_by=255.0, subtract=1.0))
    assert _preparation(data) == {"subtract": 1.0, "divide_by": 255.0}
    np.testing.assert_allclose(data.prepare([[256.0, 1.0]]), [[1.0, 0.0]])


def test_digits_as_images_prepare_flat_raw_rows():
    d = digits(batching=Batching(batch_size=64), images=True)
    raw = d.x_val.reshape(len(d.x_val), 64) * 16.0  # a CSV's rows of raw pixels
    np.testing.assert_array_equal(d.prepare(raw), d.x_val)
    assert d.preprocess.to_json() == {"subtract": 0.0, "divide_by": 16.0}
