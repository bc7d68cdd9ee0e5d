"""Per-example weights in the data layer: class weights (balanced or a mapping) and sample
weights (an npz array, a CSV column) reach every batch as ``(x, y, w)``, aligned with their
rows; bad weights fail with one line naming the culprit."""

import numpy as np
import pytest
import tensorflow as tf
from omegaconf import OmegaConf
from sklearn.utils.class_weight import compute_class_weight

import trainer.data.base
from trainer.common.errors import UserError
from trainer.data import (
    Batching,
    Columns,
    DataModule,
    Keys,
    Split,
    csv_file,
    digits,
    npz,
    synthetic,
)
from trainer.data.sources import IteratorSource, TensorSource
from trainer.driver.run import build, instantiate_data


def _module(n=30, n_val=7, *, w=None, w_val=None, class_weight=None, in_memory="auto"):
    """Feature 0 of row i is i (so a batch's rows can be identified); labels 0, 1, 2 in
    unequal numbers; ``w``/``w_val`` as functions of the row id."""
    ids = np.arange(n + n_val, dtype=np.float32)
    x = np.stack([ids, -ids], axis=1)
    y = np.minimum(ids.astype(int) % 5, 2)  # classes 0, 1 once in 5 each; 2 three times in 5
    return DataModule(
        train=(x[:n], y[:n], None if w is None else w(ids[:n])),
        val=(x[n:], y[n:], None if w_val is None else w_val(ids[n:])),
        class_weight=class_weight, batching=Batching(batch_size=4, seed=3, in_memory=in_memory))


def _check_rows(batch, data, expected_w):
    """A training batch is a triple whose weights are those of its rows."""
    assert len(batch) == 3
    x, y, w = (np.asarray(t) for t in batch)
    assert w.dtype == np.float32 and w.shape == (len(x),)
    rows = x[:, 0].astype(int)
    np.testing.assert_array_equal(y, data.y_train[rows])
    np.testing.assert_allclose(w, expected_w(rows), rtol=1e-6)
    return rows


# --- class weights -----------------------------------------------------------------------
def test_balanced_weights_are_sklearns_on_the_training_split():
    data = _module(class_weight="balanced")
    labels = data.y_train
    sk = compute_class_weight("balanced", classes=np.unique(labels), y=labels)
    assert not np.allclose(sk, 1.0)  # the labels are unequal: the weights differ
    np.testing.assert_allclose(data.w_train, sk[labels], rtol=1e-6)
    np.testing.assert_array_equal(data.w_val, np.ones(len(data.x_val)))  # training only


def test_balanced_weights_count_the_classes_the_training_split_holds():
    # Class 2 is only in the validation set: sklearn's n_classes is 2, the classes present.
    x = np.zeros((12, 1))
    data = DataModule(train=(x[:9], [0] * 7 + [1] * 2), val=(x[9:], [2, 1, 0]),
                      batching=Batching(batch_size=2), class_weight="balanced")
    assert data.num_classes == 3
    sk = compute_class_weight("balanced", classes=np.array([0, 1]), y=data.y_train)
    np.testing.assert_allclose(data.w_train, sk[data.y_train], rtol=1e-6)


def test_balanced_digits_count_the_class_subset_after_relabelling():
    data = digits(classes=[7, 2, 9], class_weight="balanced")
    labels = data.y_train
    assert set(np.unique(labels)) == {0, 1, 2}
    sk = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=labels)
    np.testing.assert_allclose(data.w_train, sk[labels], rtol=1e-6)
    assert data.weighted and np.all(data.w_val == 1.0)


def test_a_mapping_with_string_keys_weighs_listed_classes_and_unlisted_ones_one():
    # As YAML writes {"0": 2.5, "2": 0.5}: an OmegaConf node with string keys.
    mapping = OmegaConf.create({"0": 2.5, "2": 0.5})
    data = _module(class_weight=mapping)
    np.testing.assert_allclose(data.w_train, np.array([2.5, 1.0, 0.5])[data.y_train])
    assert (data.y_train == 1).any()  # the unlisted class is there, weighing 1
    np.testing.assert_array_equal(data.w_val, np.ones(len(data.x_val)))


def test_class_and_sample_weights_multiply():
    data = _module(w=lambda i: i + 1, class_weight={1: 4.0})
    rows = data.x_train[:, 0]
    expected = (rows + 1) * np.where(data.y_train == 1, 4.0, 1.0)
    np.testing.assert_allclose(data.w_train, expected)


# --- batches -----------------------------------------------------------------------------
@pytest.mark.parametrize("in_memory", [True, False])
def test_training_batches_carry_the_weights_of_their_rows(in_memory):
    # 30 rows in batches of 4: seven full batches and a short one of 2.
    data = _module(w=lambda i: i + 1, class_weight={2: 0.25}, in_memory=in_memory)
    def expected(rows):
        return (rows + 1) * np.where(data.y_train[rows] == 2, 0.25, 1.0)
    source = data.train_source()
    seen = []
    if in_memory:
        assert isinstance(source, TensorSource)
        for epoch in range(2):
            source.start_epoch(epoch)
            rows = [_check_rows(source.next(), data, expected) for _ in range(7)]
            rows.append(_check_rows(source.next_any(), data, expected))
            seen.append(np.concatenate(rows))
    else:
        assert isinstance(source, IteratorSource)
        for _ in range(2):
            seen.append(np.concatenate(
                [_check_rows(source.next(), data, expected) for _ in range(8)]))
    for rows in seen:
        assert sorted(rows) == list(range(30))  # an epoch: every row once
    assert not np.array_equal(seen[0], np.arange(30))  # shuffled, so alignment is tested
    assert not np.array_equal(seen[0], seen[1])
    _check_rows(data.probe_batch(), data, expected)


@pytest.mark.parametrize("in_memory", [True, False])
def test_weighting_leaves_the_order_of_the_examples_alone(in_memory):
    plain, weighted = (_module(in_memory=in_memory, class_weight=c) for c in (None, "balanced"))
    assert not plain.weighted and plain.w_train is None and plain.w_val is None
    a, b = plain.train_source(), weighted.train_source()
    if in_memory:
        a.start_epoch(1)
        b.start_epoch(1)
    for _ in range(9):
        pa, pb = a.next_any() if in_memory else a.next(), b.next_any() if in_memory else b.next()
        assert len(pa) == 2 and len(pb) == 3
        np.testing.assert_array_equal(pa[0], pb[0])
        np.testing.assert_array_equal(pa[1], pb[1])
    assert len(plain.probe_batch()) == 2 and len(plain.validation_batches()[0]) == 2


@pytest.mark.parametrize("in_memory", [True, False])
def test_validation_batches_carry_the_validation_sample_weights(in_memory):
    data = _module(w=lambda i: i + 1, w_val=lambda i: 100 + i, class_weight="balanced",
                   in_memory=in_memory)
    def check(batches):
        rows = []
        for x, y, w in batches:
            r = np.asarray(x)[:, 0]
            np.testing.assert_array_equal(np.asarray(y), data.y_val[r.astype(int) - 30])
            np.testing.assert_array_equal(np.asarray(w), 100 + r)  # no class weight
            rows.extend(r)
        assert rows == list(range(30, 37))  # in order, once

    check(data.validation_batches())
    source = data.val_source()
    steps = data.steps_per_epoch("val")
    if in_memory:
        source.start_epoch(0)
    check([source.next_any() if in_memory else source.next() for _ in range(steps)])
    val = iter(data.val_dataset())
    check([next(val) for _ in range(steps)])


def test_class_weight_alone_gives_validation_batches_of_ones():
    data = _module(class_weight={0: 3.0})
    for x, _y, w in data.validation_batches():
        assert w.dtype == np.float32 and np.all(w == 1.0) and len(w) == len(x)


def test_in_memory_size_counts_the_weights(monkeypatch):
    plain = _module(in_memory="auto")
    size = sum(a.nbytes for a in (plain.x_train, plain.y_train, plain.x_val, plain.y_val))
    monkeypatch.setattr(trainer.data.base, "IN_MEMORY_MAX_BYTES", size)
    assert plain.holds_in_memory()
    assert not _module(in_memory="auto", class_weight="balanced").holds_in_memory()


# --- files -------------------------------------------------------------------------------
def _arrays(n=40):
    x = np.stack([np.arange(n), np.arange(n) * 0.5], axis=1).astype("float32")
    return x, np.arange(n) % 2, np.arange(n, dtype="float32") + 1  # w = row id + 1


def test_npz_weights_are_split_with_their_rows(tmp_path):
    x, y, w = _arrays()
    np.savez(tmp_path / "a.npz", x=x, y=y, sw=w)
    data = npz(path=str(tmp_path / "a.npz"), keys=Keys(w_key="sw"), split=Split(val_fraction=0.25),
               batching=Batching(batch_size=4))
    assert len(data.x_val) == 10 and data.weighted
    np.testing.assert_array_equal(data.w_train, data.x_train[:, 0] + 1)
    np.testing.assert_array_equal(data.w_val, data.x_val[:, 0] + 1)
    # The same rows as without weights.
    plain = npz(path=str(tmp_path / "a.npz"), split=Split(val_fraction=0.25),
                batching=Batching(batch_size=4))
    np.testing.assert_array_equal(plain.x_val, data.x_val)


def test_npz_validation_weights_from_w_key_val_or_ones(tmp_path):
    x, y, w = _arrays()
    np.savez(tmp_path / "a.npz", x=x[:30], y=y[:30], sw=w[:30], x_val=x[30:], y_val=y[30:],
             sw_val=w[30:] * 10)
    data = npz(path=str(tmp_path / "a.npz"), keys=Keys(w_key="sw"), batching=Batching(batch_size=4))
    np.testing.assert_array_equal(data.w_train, w[:30])
    np.testing.assert_array_equal(data.w_val, w[30:] * 10)
    np.savez(tmp_path / "b.npz", x=x[:30], y=y[:30], sw=w[:30], x_val=x[30:], y_val=y[30:])
    data = npz(path=str(tmp_path / "b.npz"), keys=Keys(w_key="sw"), batching=Batching(batch_size=4))
    np.testing.assert_array_equal(data.w_val, np.ones(10))


def _csv(tmp_path, text, name="t.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_csv_weight_column_is_a_weight_not_a_feature(tmp_path):
    rows = "\n".join(f"{i},{i * 2},{i + 1},{i % 3}" for i in range(30))
    path = _csv(tmp_path, "a,b,wt,label\n" + rows + "\n")
    data = csv_file(path=path, columns=Columns("label", weight="wt"),
                    batching=Batching(batch_size=4), class_weight={1: 2})
    assert data.input_shape == (2,)  # a and b only
    np.testing.assert_array_equal(data.x_train[:, 1], 2 * data.x_train[:, 0])
    expected = (data.x_train[:, 0] + 1) * np.where(data.y_train == 1, 2.0, 1.0)
    np.testing.assert_array_equal(data.w_train, expected)
    np.testing.assert_array_equal(data.w_val, data.x_val[:, 0] + 1)
    plain = csv_file(path=path, columns=Columns("label"), batching=Batching(batch_size=4))
    assert plain.input_shape == (3,) and not plain.weighted
    np.testing.assert_array_equal(plain.x_val[:, 0], data.x_val[:, 0])  # the same split


# --- errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build_data", "message"),
    [
        (lambda: digits(class_weight={12: 1.0}),
         r"data\.class_weight: class 12 is not a class of digits \(classes 0-9\)"),
        (lambda: digits(classes=[4, 5], class_weight={"3": 1.0}),
         r"class 3 is not a class of digits \(classes 0-1\)"),
        (lambda: digits(class_weight={"cat": 1.0}), r"key 'cat' is not a class id"),
        (lambda: digits(class_weight={1: -2.0}), r"class 1 has weight -2\.0; .*numbers >= 0"),
        (lambda: digits(class_weight=dict.fromkeys(range(10), 0.0)),
         r"every training example weight 0"),
        (lambda: digits(class_weight={1: float("nan")}), r"class 1 has weight nan"),
        (lambda: digits(class_weight={1: "2"}), r"class 1 has weight '2'"),
        (lambda: digits(class_weight={1: True}), r"class 1 has weight True"),
        (lambda: digits(class_weight={1: 2.0, "1": 3.0}), r"class 1 is given twice"),
        (lambda: digits(class_weight="balance"), r"class_weight='balance' is not 'balanced'"),
        (lambda: digits(class_weight=[1.0, 2.0]), r"class_weight=\[1\.0, 2\.0\] is not"),
        (lambda: synthetic(class_weight="balanced"),
         r"class_weight is set but synthetic regression is a regression task; class weights"),
        (lambda: _module(w=lambda i: np.zeros_like(i)),
         r"^data \(train set\): every sample weight is 0"),
        (lambda: _module(w=lambda i: i[:-1]), r"\(train set\): sample weights of shape \(29,\)"),
        (lambda: _module(w_val=lambda i: i - 32),
         r"\(validation set\): row 0 has sample weight -2\.0; .*finite and >= 0"),
    ],
)
def test_bad_class_or_sample_weights_fail_naming_the_culprit(build_data, message):
    with pytest.raises(UserError, match=message) as e:
        build_data()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("arrays", "kwargs", "message"),
    [
        ({}, {"w_key": "wt"}, r"no array 'wt' \(found \['sw', 'x', 'y'\]\); set data\.w_key"),
        ({"sw": np.r_[1.0, 1.0, -1.0, np.ones(37)]}, {},
         r"array 'sw': row 2 has sample weight -1\.0; .*>= 0"),
        ({"sw": np.r_[1.0, np.inf, np.ones(38)]}, {}, r"array 'sw': row 1 has sample weight inf"),
        ({"sw": np.zeros(40)}, {}, r"array 'sw': every sample weight is 0"),
        ({"sw": np.ones(39)}, {}, r"array 'sw': sample weights of shape \(39,\), expected \(40,\)"),
        ({"sw_val": np.ones(3)}, {}, r"array 'sw_val' weighs a validation set the archive lacks"),
    ],
)
def test_npz_weight_errors_name_the_file_and_row(tmp_path, arrays, kwargs, message):
    x, y, w = _arrays()
    path = str(tmp_path / "a.npz")
    np.savez(path, **{"x": x, "y": y, "sw": w, **arrays})
    with pytest.raises(UserError, match=message) as e:
        npz(path=path, keys=Keys(**{"w_key": "sw", **kwargs}), batching=Batching(batch_size=4))
    assert "\n" not in str(e.value) and path in str(e.value)


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("a,y\n1,0\n", {}, r"no weight column 'wt' \(columns: \['a', 'y'\]\); fix data\.weight"),
        ("a,wt,y\n1,1,0\n2,-1,1\n", {}, r"line 3, column 'wt' is '-1'; sample weights must"),
        ("a,wt,y\n1,1,0\n2,nan,1\n", {"allow_nonfinite": True},
         r"line 3, column 'wt' is 'nan'; clean the data$"),
        ("a,wt,y\n1,1,0\n2,x,1\n", {}, r"line 3, column 'wt': 'x' is not a number"),
        ("a,wt,y\n1,0,0\n2,0,1\n", {}, r"column 'wt': every sample weight is 0"),
        ("a,wt,y\n1,1,0\n2,1,1\n", {"features": ["a", "wt"]},
         r"weight column 'wt' is also in data\.features"),
        ("a,wt,y\n1,1,0\n2,1,1\n", {"weight": "y"}, r"data\.weight='y' is the target column"),
    ],
)
def test_csv_weight_errors_name_the_file_and_line(tmp_path, text, kwargs, message):
    path = _csv(tmp_path, text)
    with pytest.raises(UserError, match=message) as e:
        allow_nonfinite = kwargs.pop("allow_nonfinite", False)
        csv_file(path=path, columns=Columns(**{"target": "y", "weight": "wt", **kwargs}),
                 allow_nonfinite=allow_nonfinite)
    assert "\n" not in str(e.value) and path in str(e.value)


# --- configs -----------------------------------------------------------------------------
def test_class_weight_composes_and_builds_weighted_data(make_cfg, tmp_path):
    r = build(make_cfg("data.class_weight=balanced"), run_dir=tmp_path)
    assert r.data.weighted and len(r.data.probe_batch()) == 3
    # A mapping on the command line, and the file options' keys.
    data = instantiate_data(make_cfg("data.class_weight={0:2.0,9:0.5}").data)
    np.testing.assert_array_equal(np.unique(data.w_train), [0.5, 1.0, 2.0])
    x, y, w = _arrays()
    np.savez(tmp_path / "a.npz", x=x, y=y, sw=w)
    data = instantiate_data(make_cfg("data=npz", f"data.path={tmp_path / 'a.npz'}",
                                     "data.w_key=sw").data)
    assert data.weighted and sorted(np.r_[data.w_train, data.w_val]) == list(w)
    rows = "\n".join(f"{i},{i + 1},{i % 2}" for i in range(20))
    path = _csv(tmp_path, "a,wt,label\n" + rows + "\n")
    data = instantiate_data(make_cfg("data=csv", f"data.path={path}", "data.target=label",
                                     "data.weight=wt", "data.batch_size=4").data)
    assert data.weighted and data.input_shape == (1,)
    assert not instantiate_data(make_cfg().data).weighted


def test_weighted_data_is_not_exported_without_its_weights(make_cfg, tmp_path):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from trainer.driver.shards import export

    # make_cfg (unused) clears Hydra's global state after the test.
    GlobalHydra.instance().clear()
    with initialize_config_module("trainer.configs", version_base="1.3"):
        cfg = compose("export_data", overrides=["+experiment=dense", f"out={tmp_path / 'o'}",
                                                "data.class_weight=balanced"])
    with pytest.raises(UserError, match="TFRecord shards hold no per-example weights"):
        export(cfg)
    assert not (tmp_path / "o").exists()


def test_weights_are_float32_tensors_in_a_traced_step():
    # The compiled loop calls next() inside a tf.function: the triple's w keeps its dtype.
    data = _module(class_weight="balanced", in_memory=True)
    source = data.train_source()
    source.start_epoch(0)
    x, y, w = tf.function(source.next)()
    assert w.dtype == tf.float32 and w.shape == (4,)
    np.testing.assert_array_equal(w.numpy(), data.w_train[x.numpy()[:, 0].astype(int)])
    np.testing.assert_array_equal(y.numpy(), data.y_train[x.numpy()[:, 0].astype(int)])
