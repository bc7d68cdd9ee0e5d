"""Every shipped config composes and builds; bad overrides fail naming the key; every
default is written once (the schema), and the schemas agree with their targets' signatures."""

import dataclasses
import inspect
import json
import typing
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from hydra.errors import ConfigCompositionException
from hydra.utils import get_object
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ValidationError

from tests.conftest import FAST
from trainer.common.errors import UserError
from trainer.driver.run import build, instantiate_node, option_keys, run, validate
from trainer.driver.schemas import SCHEMAS
from trainer.driver.shards import write_shards

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
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shards(shards, x_train=x[:30], y_train=y[:30], x_val=x[30:], y_val=y[30:],
                 task="classification", num_outputs=2, shards=2)
    images = tmp_path / "images"
    for label in ("a", "b"):
        (images / label).mkdir(parents=True)
        for i in range(5):
            (images / label / f"{i}.png").write_bytes(
                tf.io.encode_png(np.full((4, 4, 1), 40 * i, np.uint8)).numpy())
    return {"images": [f"data.path={images}", "data.batch_size=4"],
            "npz": [f"data.path={tmp_path / 'd.npz'}"],
            "csv": [f"data.path={tmp_path / 'd.csv'}", "data.target=label"],
            "tfrecord": [f"data.path={shards}", "data.batch_size=8"]}


@pytest.mark.parametrize("option", _options("data"))
def test_every_data_config_builds(make_cfg, data_files, tmp_path, option):
    r = build(make_cfg(f"data={option}", *data_files.get(option, [])), run_dir=tmp_path)
    # Streamed data holds no arrays: count batches.
    assert r.data.steps_per_epoch("train") >= r.data.steps_per_epoch("val") > 0
    assert r.models["model"].output_shape[-1] == r.data.num_outputs


@pytest.mark.parametrize("group", ["model", "optimizer", "step", "trainer", "callbacks",
                                   "schedule"])
def test_every_option_of_the_other_groups_builds(make_cfg, tmp_path, group):
    for option in _options(group):
        cfg = make_cfg(f"{group}={option}")
        validate(cfg)
        node = cfg[group]
        if group == "callbacks":
            built = [instantiate_node(c) for c in node.values()]
            assert all(hasattr(c, "on_epoch_end") for c in built)
        elif group == "optimizer":
            optimizer = build(cfg, run_dir=tmp_path).step.optimizers["optimizer"]
            assert hasattr(optimizer, "apply_gradients")
        else:
            assert callable(instantiate_node(node))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_runs_a_few_steps(make_cfg, tmp_path, experiment):
    # Three epochs: a full-batch experiment (edge_of_stability) has one step per epoch.
    cfg = make_cfg(f"+experiment={experiment}", "trainer.epochs=3", "trainer.max_steps=3",
                   "callbacks.progress.mode=log", "callbacks.tensorboard.histogram_every_n_steps=0")
    metrics = run(cfg, run_dir=tmp_path)
    assert metrics["step"] == 3
    assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 3


def test_debug_config_shrinks_the_run(make_cfg, tmp_path):
    cfg = make_cfg("+experiment=dense", "debug=fast")
    assert cfg.trainer.max_steps == 10
    assert run(cfg, run_dir=tmp_path)["step"] == 10


def test_overrides_reach_the_objects(make_cfg, tmp_path):
    r = build(make_cfg("optimizer.learning_rate=3e-3", "data.batch_size=64", "trainer.epochs=3",
                       "seed=7", "model.hidden_units=[16]"), run_dir=tmp_path)
    assert float(r.step.optimizers["optimizer"].learning_rate) == pytest.approx(3e-3)
    assert r.data.batch_size == 64 and r.data.seed == 7
    assert r.trainer.epochs == 3
    assert [layer.units for layer in r.models["model"].layers] == [16, 10]
    assert r.cfg["optimizer"]["learning_rate"] == 3e-3 and r.trainer.run_dir == str(tmp_path)


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


def test_user_target_is_built(make_cfg, tmp_path):
    cfg = make_cfg("model._target_=tests.test_config.tiny_model", "model.hidden_units=[5]")
    model = build(cfg, run_dir=tmp_path).models["model"]
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


# --- each default is written once ----------------------------------------------------------
# The schemas in trainer/driver/schemas.py hold the defaults; the YAML files hold only what differs
# from them, and the schemas' targets default to the same values.

# Where a schema deliberately differs from a third-party target's default.
DELIBERATE = {
    ("keras.optimizers.SGD", "momentum"): "optimizer=sgd is SGD with momentum 0.9",
    ("trainer.Trainer", "ema"): "a node; the Trainer's None reads as its defaults (no average)",
    ("trainer.Trainer", "swa"): "a node; the Trainer's None reads as its defaults (no average)",
    ("trainer.Trainer", "recovery"): "a Recovery node, off; recovery=None is off as well",
}
#: Keys the driver reads itself: optimizer.groups (it wraps the optimizer in groups), and the
#: trainer node's resume, deterministic and checkpoint_dir (how to start, not how to train).
DRIVER_KEYS = {"groups", "resume", "deterministic", "checkpoint_dir"}


def _schemas_with_targets() -> dict:
    """Every dataclass reachable from ``SCHEMAS`` (nested ones too) that has a ``_target_``."""
    found, todo = {}, list(SCHEMAS.values())
    while todo:
        schema = todo.pop()
        for f in dataclasses.fields(schema):
            todo += [t for t in (f.type, *typing.get_args(f.type))
                     if dataclasses.is_dataclass(t) and t.__name__ not in found]
        if "_target_" in {f.name for f in dataclasses.fields(schema)}:
            found[schema.__name__] = schema
    return found


def _field_default(f):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _plain(value):
    """Tuples and lists are the same default (a signature's immutable ``(128, 64)``)."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _same(a, b) -> bool:
    """Equal as config values: 10 == 10.0, but True != 1."""
    a, b = _plain(a), _plain(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _parameters(target) -> dict:
    """The keys a target takes, as parameters: its own, and the fields of the option
    objects the driver gathers a data config's flat keys into (their defaults those of
    the parameter's default object, else the option class's)."""
    params = dict(inspect.signature(target).parameters)
    for key, (name, option) in option_keys(target).items():
        default = params[name].default
        field = next(f for f in dataclasses.fields(option) if f.name == key)
        value = (getattr(default, key) if default is not inspect.Parameter.empty
                 else field.default if field.default is not dataclasses.MISSING
                 else inspect.Parameter.empty)
        params[key] = inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=value)
    return params


@pytest.mark.parametrize("schema", sorted(_schemas_with_targets().items()), ids=lambda s: s[0])
def test_schema_defaults_equal_the_targets_signature_defaults(schema):
    """A default lives in the schema; the target's own default must not say otherwise."""
    _, schema = schema
    target = schema._target_
    params = _parameters(get_object(target))
    wrong = []
    for f in dataclasses.fields(schema):
        default, param = _field_default(f), params.get(f.name)
        if f.name.startswith("_") or param is None or param.default is inspect.Parameter.empty:
            continue
        if default is dataclasses.MISSING or default == MISSING or (
                isinstance(default, str) and default.startswith("${")):
            continue
        if not _same(default, param.default) and (target, f.name) not in DELIBERATE:
            wrong.append(f"{f.name}: schema {default!r}, signature {param.default!r}")
    assert not wrong, f"{schema.__name__} vs {target}: " + "; ".join(wrong)


@pytest.mark.parametrize("schema", sorted(_schemas_with_targets().items()), ids=lambda s: s[0])
def test_every_schema_key_is_a_parameter_of_its_target(schema):
    _, schema = schema
    params = _parameters(get_object(schema._target_))
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    extra = {f.name for f in dataclasses.fields(schema)} - set(params) - DRIVER_KEYS
    assert not {k for k in extra if not k.startswith("_")}, f"{schema._target_} takes no {extra}"


def _schema_node(name: str, group: str | None):
    """The defaults of the schema a defaults-list entry names, and where they go."""
    if name.startswith("/schema/"):
        path, _, key = name[1:].partition("@")
        group, _, option = path.rpartition("/")
        return key, SCHEMAS.get((group, option))
    return None, SCHEMAS.get((group, name))


def _baseline(path: Path) -> dict:
    """What ``path``'s own values land on: its schemas' defaults and the options it extends."""
    group = path.parent.relative_to(CONFIGS).as_posix()
    group = None if group == "." else group
    base: dict = {}
    for entry in OmegaConf.load(path).get("defaults") or []:
        if not isinstance(entry, str) or entry == "_self_":
            continue
        if (path.parent / f"{entry}.yaml").exists():  # another option of the same group
            sibling = OmegaConf.to_container(OmegaConf.load(path.parent / f"{entry}.yaml"))
            sibling.pop("defaults", None)
            base = _merge(base, _merge(_baseline(path.parent / f"{entry}.yaml"), sibling))
            continue
        key, schema = _schema_node(entry, group)
        if schema is not None:
            node = OmegaConf.to_container(OmegaConf.structured(schema))
            base = _merge(base, {key: node} if key else node)
    return base


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _repeated(values: dict, base: dict, prefix: str = "") -> list[str]:
    """Keys of ``values`` that set what ``base`` already holds."""
    out = []
    for key, value in values.items():
        if key == "defaults" or key not in base:
            continue
        if isinstance(value, dict) and isinstance(base[key], dict):
            out += _repeated(value, base[key], f"{prefix}{key}.")
        elif _same(value, base[key]):
            out.append(f"{prefix}{key}: {value!r}")
    return out


GROUP_FILES = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml")
                     if p.parent.name not in ("experiment", "debug"))


@pytest.mark.parametrize("name", GROUP_FILES)
def test_no_config_file_repeats_a_schema_default(name):
    path = CONFIGS / name
    values = OmegaConf.to_container(OmegaConf.load(path))
    repeated = _repeated(values, _baseline(path))
    assert not repeated, f"configs/{name} repeats defaults of its schema: {repeated}"


@pytest.mark.parametrize("name", [f"experiment/{o}" for o in _options("experiment")]
                         + [f"debug/{o}" for o in _options("debug")])
def test_global_config_files_set_only_what_they_change(make_cfg, name):
    """An experiment's values differ from the config its group choices compose without it."""
    values = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))
    choices = []
    for entry in values.get("defaults") or []:
        if isinstance(entry, dict):
            for key, option in entry.items():
                group = key.removeprefix("override").strip().lstrip("/")
                choices.append(f"~{group}" if option is None else f"{group}={option}")
    base = OmegaConf.to_container(make_cfg(*choices))
    repeated = _repeated(values, base)
    assert not repeated, f"configs/{name}.yaml sets what it would get anyway: {repeated}"
