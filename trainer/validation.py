"""Config validation before anything heavy starts: missing values, unknown keys, bad rates."""

from __future__ import annotations

import dataclasses
import difflib
import math

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.config import Config, OptimizerConfig, SgdConfig, StepConfig
from trainer.errors import UserError


def validate(cfg: DictConfig) -> dict:
    """Resolve every value and fail on unknown keys, missing values and impossible
    values, before anything heavy starts; return the resolved config as containers."""
    _check_known_keys(cfg)
    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise UserError(f"config key {key}: {str(e).splitlines()[0]}; set it on the command "
                        f"line, e.g. {key}=...") from None
    _check_rates(container)
    if container.get("precision", "float32") not in PRECISIONS:
        raise UserError(f"precision={container['precision']!r} must be one of "
                        f"{', '.join(PRECISIONS)}")
    return container


#: The Keras dtype policies a run may use (``precision=``).
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


# Root keys that are not the run's: compose(return_hydra_config=True) keeps Hydra's own node.
_ROOT_EXTRAS = {"hydra"}
# Schemas whose targets take keys they do not list (a Keras optimizer's beta_1, epsilon).
_OPEN_SCHEMAS = (OptimizerConfig, SgdConfig)
# Keys a node may set beyond its schema: a step's config may bind an argument the driver
# would otherwise offer it (step.task=regression), see step_kwargs.
_EXTRA_KEYS = {StepConfig: {"model", "optimizer", "task", "regularizers",
                            "unconnected_gradients", "reset"}}


def _check_known_keys(node: DictConfig, prefix: str = "", root=None) -> None:
    """Fail on a key its node's schema does not declare, wherever that key would be
    silently ignored or would crash the node's target.

    Hydra rejects an unknown key it is asked to override, but ``+key=value`` adds a
    key anywhere (Hydra's own error for ``trainer.epoch=3`` suggests
    ``+trainer.epoch=3``). A node the driver reads itself (the root, ``freeze``,
    ``tape``) would ignore it: ``+resmue=true`` would train from scratch without a
    word. A node whose ``_target_`` is still its schema's would pass it on, and the
    target would fail with a traceback once TensorFlow has started. A node with
    another ``_target_`` (``+step.beta=0.2`` for a custom step) or an open schema
    passes its keys on to a target that may take them; ``callbacks`` and
    ``regularizer`` take new entries.
    """
    root = node if root is None else root
    schema = Config if not prefix else OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema) and _closed(node, schema):
        fields = {f.name for f in dataclasses.fields(schema)}
        allowed = fields | _EXTRA_KEYS.get(schema, set()) | (set() if prefix else _ROOT_EXTRAS)
        for key in node:
            if key not in allowed:
                raise UserError(_unknown_key_message(root, f"{prefix}{key}", sorted(fields)))
    for key, child in node.items_ex(resolve=False):
        if isinstance(child, DictConfig) and f"{prefix}{key}" != "hydra":
            _check_known_keys(child, f"{prefix}{key}.", root)


def _closed(node: DictConfig, schema) -> bool:
    """Whether ``node`` takes only its schema's keys (see ``_check_known_keys``)."""
    if "_target_" not in node:
        return True
    default = next((f.default for f in dataclasses.fields(schema) if f.name == "_target_"), None)
    return node.get("_target_") == default and not issubclass(schema, _OPEN_SCHEMAS)


def _unknown_key_message(root: DictConfig, key: str, siblings: list[str]) -> str:
    """One line naming ``key``, the nearest existing key, and the override to fix."""
    by_leaf: dict[str, list[str]] = {}
    for path in _key_paths(OmegaConf.to_container(root, resolve=False)):
        if path != key and not path.startswith((f"{key}.", "hydra.")):
            by_leaf.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    where = key.rsplit(".", 1)[0] if "." in key else "the root"
    hint = (f"did you mean {min(by_leaf[close[0]], key=len)}?" if close
            else f"{where} takes {', '.join(k for k in siblings if not k.startswith('_'))}")
    override = _override_adding(key)
    fix = f"fix or remove the override {override}" if override else "fix or remove it"
    if not close and "." in key and OmegaConf.select(root, f"{where}._target_") is not None:
        fix += f", or point {where}._target_ at your own callable that takes {leaf}"
    return f"config key {key} does not exist ({hint}); {fix}"


def _key_paths(container, prefix: str = "") -> list[str]:
    """Every dotted key of a config container, nested ones included."""
    paths = []
    if isinstance(container, dict):
        for key, value in container.items():
            paths.append(f"{prefix}{key}")
            paths.extend(_key_paths(value, f"{prefix}{key}."))
    return paths


def _override_adding(key: str) -> str | None:
    """The command-line override that added ``key`` (``+resmue=true``), if one did."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    for override in HydraConfig.get().overrides.task:
        name = override.lstrip("+~").split("=", 1)[0]
        if name == key or name.startswith(f"{key}."):
            return override
    return None


_RATE_KEYS = ("learning_rate", "initial_learning_rate", "lr_scale")


def _check_rates(container, prefix: str = "") -> None:
    """Fail on a negative or non-finite learning rate anywhere in the config.

    Keras takes ``learning_rate=-1`` without a word and climbs the loss; the driver
    knows every optimizer node (``optimizer``, a GAN's ``optimizer.critic``, a
    schedule's ``initial_learning_rate``, a group's ``lr_scale``), so it checks them.
    """
    items = (container.items() if isinstance(container, dict)
             else enumerate(container) if isinstance(container, list) else ())
    for key, value in items:
        path = f"{prefix}{key}"
        if (key in _RATE_KEYS and isinstance(value, int | float) and not isinstance(value, bool)
                and not (math.isfinite(value) and value >= 0)):
            example = "0.1" if key == "lr_scale" else "1e-3"
            why = "a negative rate climbs the loss" if value < 0 else "it is not a number"
            raise UserError(f"{path}={value} must be a finite number >= 0 ({why}); set e.g. "
                            f"{path}={example}")
        _check_rates(value, f"{path}.")
