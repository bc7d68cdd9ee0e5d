"""The data sets' constructors stay small: the shared options are objects (``Batching``,
``Split``, ``Columns``, ``Keys``, ``Generation``), every data class reads its batching from
the shared base ``Data``, and a data config's flat keys still reach those objects."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from omegaconf import OmegaConf

import trainer.data
from trainer.common.errors import UserError
from trainer.data import (
    Batching,
    Columns,
    Data,
    DataModule,
    Generation,
    ImageFolderData,
    Keys,
    Split,
)
from trainer.data.tfrecord import TFRecordData
from trainer.driver.run import instantiate_data
from trainer.driver.validation import validate

#: At most this many parameters for any data constructor or builder.
MOST = 8
CLASSES = [DataModule, ImageFolderData, TFRecordData]
BUILDERS = [getattr(trainer.data, name) for name in trainer.data.__all__
            if name[0].islower() and inspect.isfunction(getattr(trainer.data, name))]


@pytest.mark.parametrize("function", [*(c.__init__ for c in CLASSES), *BUILDERS],
                         ids=lambda f: f.__qualname__)
def test_no_data_constructor_takes_more_than_eight_parameters(function):
    parameters = [p for p in inspect.signature(function).parameters if p != "self"]
    assert len(parameters) <= MOST, f"{function.__qualname__} takes {len(parameters)}"


def test_the_builders_are_all_checked():
    names = {f.__name__ for f in BUILDERS}
    assert names == {"csv_file", "digits", "images", "npz", "synthetic", "tfrecord"}


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_data_class_reads_its_batching_from_the_shared_base(cls):
    assert issubclass(cls, Data)
    assert "batching" in inspect.signature(cls).parameters
    for name in ("batch_size", "seed", "shuffle", "in_memory"):
        assert inspect.getattr_static(cls, name) is inspect.getattr_static(Data, name), name


def test_batching_attributes_read_and_replace_the_batching():
    x = np.arange(20, dtype="float32").reshape(10, 2)
    data = DataModule(train=(x, np.arange(10) % 2), val=(x[:4], np.arange(4) % 2),
                      batching=Batching(batch_size=3, seed=5, in_memory=False))
    assert (data.batch_size, data.seed, data.shuffle, data.in_memory) == (3, 5, True, False)
    data.shuffle = False
    assert data.batching == Batching(batch_size=3, seed=5, shuffle=False, in_memory=False)
    with pytest.raises(UserError, match=r"data\.batch_size=0 must be at least 1"):
        data.batch_size = 0


def _csv(tmp_path, rows=30):
    path = tmp_path / "t.csv"
    path.write_text("a,b,label\n" + "\n".join(f"{i},{i * 2},{i % 3}" for i in range(rows)) + "\n")
    return path


def test_flat_config_keys_reach_the_option_objects(make_cfg, tmp_path):
    cfg = make_cfg("data=csv", f"data.path={_csv(tmp_path)}", "data.target=label",
                   "data.features=[a]", "data.batch_size=7", "data.val_fraction=0.3",
                   "data.split_seed=4", "seed=9", "data.shuffle=false", "data.in_memory=false")
    validate(cfg)
    data = instantiate_data(cfg.data)
    assert data.batching == Batching(batch_size=7, seed=9, shuffle=False, in_memory=False)
    assert data.batch_size == 7 and data.input_shape == (1,)
    assert (len(data.x_train), len(data.x_val)) == (21, 9)
    again = instantiate_data(make_cfg("data=csv", f"data.path={_csv(tmp_path)}",
                                      "data.target=label", "data.batch_size=7",
                                      "data.val_fraction=0.3", "data.split_seed=5").data)
    assert not np.array_equal(np.sort(again.x_val[:, 0]), np.sort(data.x_val[:, 0]))

    x = np.arange(40, dtype="float32").reshape(20, 2)
    np.savez(tmp_path / "a.npz", feats=x, labels=np.arange(20) % 2, sw=np.ones(20))
    data = instantiate_data(make_cfg("data=npz", f"data.path={tmp_path / 'a.npz'}",
                                     "data.x_key=feats", "data.y_key=labels", "data.w_key=sw",
                                     "data.batch_size=4", "data.val_fraction=0.25").data)
    assert data.weighted and data.batch_size == 4 and len(data.x_val) == 5

    data = instantiate_data(make_cfg("data=synthetic", "data.n_samples=40",
                                     "data.n_features=3", "data.batch_size=5").data)
    assert data.input_shape == (3,) and len(data.x_train) + len(data.x_val) == 40
    assert data.batch_size == 5 and instantiate_data(make_cfg().data).batch_size == 32


def flat_data(*, n: int = 12, batch_size: int = 32, seed: int = 0, val_fraction: float = 0.5):
    """A data target of flat arguments, as a user may write one."""
    x = np.arange(2 * n, dtype="float32").reshape(n, 2)
    cut = int(n * (1 - val_fraction))
    return DataModule(train=(x[:cut], np.arange(cut) % 2), val=(x[cut:], np.arange(n - cut) % 2),
                      batching=Batching(batch_size=batch_size, seed=seed))


def test_a_target_of_flat_arguments_gets_them_flat(make_cfg):
    node = {"_target_": f"{__name__}.flat_data", "batch_size": 3, "val_fraction": 0.25}
    data = instantiate_data(OmegaConf.create(node))
    assert data.batch_size == 3 and len(data.x_val) == 3
    with pytest.raises(UserError, match=r"flat_data: .*unexpected keyword argument 'shuffle'"):
        instantiate_data(OmegaConf.create({**node, "shuffle": False}))
    # The shipped PINN experiment's data target takes batch_size, seed and shuffle flat.
    data = instantiate_data(make_cfg("+experiment=pinn", "data.batch_size=16", "seed=3").data)
    assert data.batching == Batching(batch_size=16, seed=3)


def test_an_unknown_data_key_still_fails_naming_it(make_cfg):
    with pytest.raises(UserError, match=r"config key data\.batch_sise does not exist \(did you "
                       r"mean data\.batch_size\?\)"):
        validate(make_cfg("+data.batch_sise=3"))


@pytest.mark.parametrize(("build", "message"), [
    (lambda: Batching(batch_size=0), r"^data\.batch_size=0 must be at least 1$"),
    (lambda: Batching(in_memory="yes"), r"^data\.in_memory='yes' must be auto, true or false$"),
    (lambda: Split(val_fraction=1.0),
     r"^data\.val_fraction=1\.0 must lie strictly between 0 and 1$"),
    (lambda: Split(val_fraction=0), r"^data\.val_fraction=0 must lie strictly between 0 and 1$"),
    (lambda: Columns(target=""), r"^data\.target='' must name the label column$"),
    (lambda: Columns(target="y", features=["a", ""]), r"^data\.features=\['a', ''\] must list"),
    (lambda: Columns(target="y", weight=""), r"^data\.weight='' must name the column of sample"),
    (lambda: Keys(x_key=""), r"^data\.x_key='' must name the array of features$"),
    (lambda: Keys(y_key=None), r"^data\.y_key=None must name the array of targets$"),
    (lambda: Keys(w_key=""), r"^data\.w_key='' must name the array of sample weights"),
    (lambda: Generation(n_samples=1),
     r"^data\.n_samples must be at least 2 and data\.n_features at least 1$"),
], ids=["batch_size", "in_memory", "val_fraction-1", "val_fraction-0", "target", "features",
        "weight", "x_key", "y_key", "w_key", "n_samples"])
def test_each_option_names_its_bad_value(build, message):
    with pytest.raises(UserError, match=message):
        build()


def test_a_bad_option_value_in_a_config_is_the_same_one_line_error(make_cfg):
    with pytest.raises(UserError, match=r"^data\.val_fraction=1\.5 must lie strictly between"):
        instantiate_data(make_cfg("data.val_fraction=1.5").data)
    with pytest.raises(UserError, match=r"^data\.in_memory='maybe' must be auto, true or false"):
        instantiate_data(make_cfg("data.in_memory=maybe").data)
