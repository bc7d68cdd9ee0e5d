"""Every shipped config composes and builds; bad overrides fail naming the key."""

import json
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from tests.conftest import FAST
from trainer.errors import UserError
from trainer.run import _optimizer, build, run, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _options(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.fixture
def data_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    rows = ["a,b,c,d,label"] + [",".join(f"{v:.4f}" for v in r) + f",{t}" for r, t in zip(x, y)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    return {"npz": [f"data.path={tmp_path / 'd.npz'}"],
            "csv": [f"data.path={tmp_path / 'd.csv'}", "data.target=label"]}


@pytest.mark.parametrize("option", _options("data"))
def test_every_data_config_builds(make_cfg, data_files, option):
    cfg = make_cfg(f"data={option}", *data_files.get(option, []))
    validate(cfg)
    data = build(cfg.data)
    assert len(data.x_train) > len(data.x_val) > 0
    model = build(cfg.model)(input_shape=data.input_shape, num_outputs=data.num_outputs)
    assert model.output_shape[-1] == data.num_outputs


@pytest.mark.parametrize("group", ["model", "optimizer", "step", "trainer", "callbacks"])
def test_every_option_of_the_other_groups_builds(make_cfg, group):
    for option in _options(group):
        cfg = make_cfg(f"{group}={option}")
        validate(cfg)
        node = cfg[group]
        if group == "callbacks":
            built = [build(c) for c in node.values()]
            assert all(hasattr(c, "on_epoch_end") for c in built)
        elif group == "optimizer":
            assert hasattr(_optimizer(node), "apply_gradients")
        else:
            assert callable(build(node)) or hasattr(build(node), "apply_gradients")


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_runs_a_few_steps(make_cfg, tmp_path, experiment):
    cfg = make_cfg(f"+experiment={experiment}", "trainer.epochs=1", "trainer.max_steps=3",
                   "callbacks.progress.mode=log", "callbacks.tensorboard.histogram_every_n_steps=0")
    metrics = run(cfg, run_dir=tmp_path)
    assert metrics["step"] == 3
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 3


def test_debug_config_shrinks_the_run(make_cfg, tmp_path):
    cfg = make_cfg("+experiment=dense", "debug=fast")
    assert cfg.trainer.max_steps == 10
    assert run(cfg, run_dir=tmp_path)["step"] == 10


def test_overrides_reach_the_objects(make_cfg):
    cfg = make_cfg("optimizer.learning_rate=3e-3", "data.batch_size=64", "trainer.epochs=3",
                   "seed=7", "model.hidden_units=[16]")
    assert _optimizer(cfg.optimizer).learning_rate.numpy() == pytest.approx(3e-3)
    data = build(cfg.data)
    assert data.batch_size == 64 and data.seed == 7
    assert build(cfg.trainer)().epochs == 3
    model = build(cfg.model)(input_shape=(64,), num_outputs=10)
    assert [layer.units for layer in model.layers] == [16, 10]


def test_unknown_key_fails_naming_it(make_cfg):
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg("trainer.epoch=3")
    assert "trainer.epoch" in str(e.value) and "epoch" in str(e.value.__cause__)


def test_wrong_type_fails_naming_the_key(make_cfg):
    with pytest.raises(ConfigCompositionException) as e:
        make_cfg("trainer.epochs=many")
    cause = e.value.__cause__
    assert isinstance(cause, ValidationError) and cause.full_key == "trainer.epochs"


def test_missing_mandatory_value_fails_before_building(make_cfg):
    cfg = make_cfg("data=csv")
    with pytest.raises(UserError, match=r"data\.path"):
        validate(cfg)


def test_user_target_is_built(make_cfg):
    cfg = make_cfg("model._target_=tests.test_config.tiny_model", "model.hidden_units=[5]")
    model = build(cfg.model)(input_shape=(8,), num_outputs=1)
    assert model.name == "tiny" and model.layers[0].units == 5


def tiny_model(*, input_shape, num_outputs, hidden_units, **unused):
    import keras

    layers = [keras.Input(input_shape), keras.layers.Dense(hidden_units[0]),
              keras.layers.Dense(num_outputs)]
    return keras.Sequential(layers, name="tiny")


def test_fast_overrides_compose(make_cfg):
    cfg = make_cfg(*FAST)
    assert cfg.trainer.epochs == 2


def test_tape_settings_reach_the_step(make_cfg, tmp_path):
    cfg = make_cfg("+experiment=dense", "tape.reset.when=[nonfinite,spike]",
                   "tape.unconnected_gradients=zero", "trainer.max_steps=5", "callbacks=none")
    metrics = run(cfg, run_dir=tmp_path)
    assert metrics["train/tape/resets"] == 0 and metrics["step"] == 5


def test_bad_reset_setting_is_a_user_error(make_cfg, tmp_path):
    cfg = make_cfg("+experiment=dense", "tape.reset.when=[threshold]")
    with pytest.raises(UserError, match=r"tape\.reset\.threshold is null"):
        run(cfg, run_dir=tmp_path)
