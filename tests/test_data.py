"""Data sets build as documented, and bad data fails with one line naming the culprit."""

import numpy as np
import pytest

from trainer.common.errors import UserError
from trainer.data import (
    Batching,
    Columns,
    DataModule,
    Generation,
    Split,
    csv_file,
    digits,
    npz,
    synthetic,
)


def test_digits_split_is_fixed_and_independent_of_the_seed():
    a, b = digits(batching=Batching(seed=0)), digits(batching=Batching(seed=5))
    assert a.x_train.shape == (1437, 64) and a.x_val.shape == (360, 64)
    np.testing.assert_array_equal(a.x_val, b.x_val)
    assert a.num_classes == 10 and a.x_train.min() >= 0.0 and a.x_train.max() <= 1.0


def test_shuffle_differs_per_epoch_and_repeats_with_the_seed():
    def first_epochs(seed):
        data = synthetic(task="classification", generation=Generation(n_samples=64),
                         batching=Batching(batch_size=48, seed=seed))
        ds = data.train_dataset().unbatch().map(lambda x, y: x[0])
        values = np.array([float(v) for v in ds.take(2 * len(data.x_train))])
        return values.reshape(2, -1)

    e = first_epochs(1)
    assert not np.array_equal(e[0], e[1])  # reshuffled each epoch
    np.testing.assert_array_equal(np.sort(e[0]), np.sort(e[1]))  # same examples
    np.testing.assert_array_equal(e, first_epochs(1))  # same seed, same order
    assert not np.array_equal(e, first_epochs(2))


def test_synthetic_regression_and_classification():
    r = synthetic(task="regression", generation=Generation(n_samples=40),
                  batching=Batching(batch_size=8))
    c = synthetic(task="classification", generation=Generation(n_samples=40, n_classes=4),
                  batching=Batching(batch_size=8))
    assert r.task == "regression" and r.num_outputs == 1 and r.y_train.dtype == np.float32
    assert c.num_outputs == 4 and c.y_train.dtype == np.int32


def test_npz_with_and_without_a_validation_set(tmp_path):
    x = np.arange(40, dtype="float32").reshape(20, 2)
    y = np.arange(20) % 2
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.savez(tmp_path / "b.npz", x=x, y=y, x_val=x[:3], y_val=y[:3])
    assert len(npz(path=str(tmp_path / "a.npz"), split=Split(val_fraction=0.25),
                   batching=Batching(batch_size=4)).x_val) == 5
    assert len(npz(path=str(tmp_path / "b.npz"), batching=Batching(batch_size=4)).x_val) == 3


def _csv(tmp_path, text):
    path = tmp_path / "t.csv"
    path.write_text(text)
    return str(path)


def test_csv_reads_features_and_target(tmp_path):
    rows = "\n".join(f"{i},{i * 2},{i % 3}" for i in range(30))
    data = csv_file(path=_csv(tmp_path, "a,b,label\n" + rows + "\n"), columns=Columns("label"),
                    batching=Batching(batch_size=8))
    assert data.input_shape == (2,) and data.num_classes == 3
    assert len(data.x_train) + len(data.x_val) == 30


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        (None, {}, r"no such file; check data\.path"),
        ("a,b\n1,2\n", {"target": "y"}, r"no column 'y'"),
        ("a,y\n1,0\nx1,1\n", {"target": "y"}, r"line 3, column 'a': 'x1' is not a number"),
        ("a,y\n", {"target": "y"}, "no data rows"),
        ("", {"target": "y"}, "file is empty"),
        ("a,y\n1,0\n2\n", {"target": "y"}, "line 3 has 1 fields"),
        ("a,y\n1,0.5\n2,1\n3,0\n4,1\n5,1\n", {"target": "y"}, "data.task=regression"),
        ("a,y\n1,0\nnan,1\n3,0\n4,1\n5,1\n", {"target": "y"}, "allow_nonfinite=true"),
        ("a,y\n1,0\n2,1\n3,0\n4,1\n5,1\n", {"target": "y", "batch_size": 64},
         r"batch_size=64 is larger than the 4 training examples"),
    ],
)
def test_csv_errors_name_the_culprit(tmp_path, text, kwargs, message):
    path = str(tmp_path / "missing.csv") if text is None else _csv(tmp_path, text)
    kwargs = {"target": "y", **kwargs}
    batching = Batching(batch_size=kwargs.pop("batch_size", 32))
    with pytest.raises(UserError, match=message) as e:
        csv_file(path=path, columns=Columns(**kwargs), batching=batching)
    assert "\n" not in str(e.value)
    assert path in str(e.value)


def test_npz_missing_array_lists_what_is_there(tmp_path):
    np.savez(tmp_path / "a.npz", features=np.zeros((4, 2)), y=np.zeros(4))
    with pytest.raises(UserError, match=r"no array 'x' \(found \['features', 'y'\]\)"):
        npz(path=str(tmp_path / "a.npz"))


def test_npz_half_a_validation_set_is_named(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((4, 2)), y=np.zeros(4), x_val=np.zeros((2, 2)))
    with pytest.raises(UserError, match=r"array 'x_val' without 'y_val'"):
        npz(path=str(tmp_path / "a.npz"))


def test_nonfinite_features_are_accepted_on_request():
    x = np.ones((10, 2), "float32")
    x[3, 1] = np.inf
    kw = dict(train=(x, np.zeros(10)), val=(x[:2] * 0, np.zeros(2)),
              batching=Batching(batch_size=2))
    with pytest.raises(UserError, match="row 3"):
        DataModule(**kw)
    assert DataModule(**kw, allow_nonfinite=True).x_train[3, 1] == np.inf


def test_empty_set_is_rejected():
    with pytest.raises(UserError, match="train set is empty"):
        DataModule(train=(np.zeros((0, 2)), np.zeros(0)), val=(np.zeros((1, 2)), np.zeros(1)))
