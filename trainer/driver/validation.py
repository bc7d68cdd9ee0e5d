"""Config validation before anything heavy starts: missing values, unknown keys, bad rates,
targets that cannot be imported."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
import math
import os
import sys
import types

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.common.errors import UserError
from trainer.driver.schemas import Config, OptimizerConfig, SgdConfig, StepConfig


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
    _check_targets(container)
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
    if isinstance(container, dict):
        _check_clipping(container, prefix)
    for key, value in items:
        path = f"{prefix}{key}"
        if (key in _RATE_KEYS and isinstance(value, int | float) and not isinstance(value, bool)
                and not (math.isfinite(value) and value >= 0)):
            example = "0.1" if key == "lr_scale" else "1e-3"
            why = "a negative rate climbs the loss" if value < 0 else "it is not a number"
            raise UserError(f"{path}={value} must be a finite number >= 0 ({why}); set e.g. "
                            f"{path}={example}")
        _check_rates(value, f"{path}.")


#: A Keras optimizer's clip arguments (trainer.step.clipping.KINDS; not imported: no TF here).
CLIP_KINDS = ("clipnorm", "global_clipnorm", "clipvalue")


def _check_clipping(node: dict, prefix: str) -> None:
    """At most one clip setting per optimizer node, and a positive one (Keras takes
    ``clipnorm=0`` as no clipping, and refuses two in a ValueError of several lines)."""
    given = [k for k in CLIP_KINDS if node.get(k) is not None]
    if len(given) > 1:
        keys = " and ".join(f"{prefix}{k}" for k in given)
        raise UserError(f"{keys} are both set; an optimizer clips one way: keep one, e.g. "
                        f"~{prefix}{given[1]}")
    for k in given:
        value = node[k]
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                math.isfinite(value) and value > 0):
            raise UserError(f"{prefix}{k}={value} must be a finite number > 0; set e.g. "
                            f"{prefix}{k}=1.0, or drop it for no clipping")


# --- targets -------------------------------------------------------------------------------
_HOW_TO_IMPORT = ("install the package that provides it (pip install -e DIR) or add the folder "
                  "that holds it to PYTHONPATH")
_UNKNOWN = object()  # the import system could not tell without running code


def _check_targets(container) -> None:
    """Fail on a ``_target_`` that cannot be imported, before TensorFlow starts.

    Nothing is imported: the import system finds the modules of the dotted path (``mysteps``
    and ``mysteps.steps`` of ``mysteps.steps.MyStep``) without running them, and the source
    of the last one is read for the name. What only running a module can tell (a module
    that fails while importing, a name made at import time, a compiled module) is checked
    when the node is built, and explained by ``target_error``.
    """
    for key, target in _targets(container):
        problem = _static_problem(target)
        if problem:
            raise UserError(f"{key}={target}: {problem}")


def _targets(container, prefix: str = ""):
    """``(key, target)`` of every ``_target_`` in a config container, Hydra's node aside."""
    items = (container.items() if isinstance(container, dict)
             else enumerate(container) if isinstance(container, list) else ())
    for key, value in items:
        path = f"{prefix}[{key}]" if isinstance(key, int) else f"{prefix}.{key}".lstrip(".")
        if key == "_target_" and isinstance(value, str):
            yield path, value
        elif path != "hydra":
            yield from _targets(value, path)


def target_error(target: str, error: BaseException, key: str = "_target_") -> UserError:
    """The one-line ``UserError`` for ``target`` (the value of config key ``key``), which
    failed to import with ``error``: the module that is missing or that raised, and the fix."""
    problem = _static_problem(target) or _import_problem(target, error)
    return UserError(f"{key}={target}: {problem}")


def locate(target: str, key: str = "_target_"):
    """The object ``target`` names, found as Hydra finds a ``_target_``; a ``UserError``
    from ``target_error`` if it cannot be imported."""
    parts = target.split(".")
    try:
        obj = importlib.import_module(parts[0])
        for i, part in enumerate(parts[1:], 1):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                if not isinstance(obj, types.ModuleType):
                    raise
                obj = importlib.import_module(".".join(parts[:i + 1]))
        return obj
    except Exception as e:  # whatever the module's own code raised, explained
        raise target_error(target, e, key) from None


def _static_problem(target: str) -> str | None:
    """Why ``target`` cannot be imported, if the import system tells without running code."""
    parts = target.split(".")
    if not all(parts):
        return "not a dotted path to a class or function (module.name); fix the target"
    spec = _find_spec(parts[0], None)
    if spec is None:
        return (f"module {parts[0]} cannot be imported: it is not installed and not on the "
                f"Python path; {_HOW_TO_IMPORT}")
    name = parts[0]
    for part in parts[1:]:
        if spec is _UNKNOWN:
            return None
        # An imported package's __path__ is where its submodules are (it may have grown).
        locations = getattr(sys.modules.get(name), "__path__", spec.submodule_search_locations)
        child = _find_spec(f"{name}.{part}", locations) if locations is not None else None
        if child is None:  # not a module: a name the module defines
            return _missing_name(name, spec, part)
        name, spec = f"{name}.{part}", child
    return None


def _find_spec(name: str, locations):
    """The spec of module ``name`` (``locations``: its package's ``__path__``), found as
    ``import`` finds it but without importing its package; None if there is none."""
    if name in sys.modules:
        return getattr(sys.modules[name], "__spec__", None) or _UNKNOWN
    try:
        if locations is None:
            return importlib.util.find_spec(name)
        for finder in sys.meta_path:  # an editable install's finder maps packages too
            find = getattr(finder, "find_spec", None)
            spec = find(name, list(locations)) if find else None
            if spec is not None:
                return spec
    except Exception:  # a finder that cannot tell: left to the import
        return _UNKNOWN
    return None


def _missing_name(module: str, spec, name: str) -> str | None:
    """Why ``module`` (found, not imported) lacks ``name``, when its source says so."""
    loaded = sys.modules.get(module)
    if loaded is not None and name in vars(loaded):
        return None
    names = _source_names(module, spec)
    if names is None or name in names:
        return None
    if isinstance(names, str):
        return names
    where = f" ({spec.origin})" if spec.origin else " (a folder without __init__.py)"
    close = difflib.get_close_matches(name, [n for n in names if not n.startswith("_")], n=1)
    hint = f" (did you mean {module}.{close[0]}?)" if close else ""
    what = "submodule or name" if spec.submodule_search_locations is not None else "name"
    return f"module {module}{where} has no {what} {name}{hint}; fix the target's spelling"


_SOURCE_NAMES: dict = {}
# Module code that can bind names the parser cannot see.
_DYNAMIC_NAMES = {"__getattr__", "globals", "vars", "locals", "setattr", "exec", "eval",
                  "__import__"}


def _source_names(module: str, spec):
    """Every name ``module``'s source can bind (a superset: names inside functions count),
    a one-line problem if it does not parse, or None when the source cannot tell (no
    source, a star import, a module ``__getattr__``, ``globals()``, ``sys.modules``)."""
    if spec.origin is None and spec.submodule_search_locations is not None:
        return frozenset()  # a namespace package: only its submodules
    if not (spec.origin or "").endswith(".py") or spec.loader is None:
        return None
    try:
        stat = os.stat(spec.origin)
    except OSError:
        return None
    cache_key = (spec.origin, stat.st_mtime_ns, stat.st_size)
    if cache_key not in _SOURCE_NAMES:
        _SOURCE_NAMES[cache_key] = _parse_names(module, spec)
    return _SOURCE_NAMES[cache_key]


def _parse_names(module: str, spec):
    try:
        source = spec.loader.get_source(module)
        tree = ast.parse(source or "", filename=spec.origin)
    except SyntaxError as e:
        return (f"module {module} exists but raises while importing: SyntaxError: {e.msg} "
                f"({spec.origin}, line {e.lineno}); fix that error")
    except Exception:  # an unreadable source: left to the import
        return None
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name):
            if node.id in _DYNAMIC_NAMES:
                return None
            if isinstance(node.ctx, ast.Store):
                names.add(node.id)
        elif isinstance(node, ast.Attribute) and (node.attr == "__dict__" or (
                node.attr == "modules" and getattr(node.value, "id", None) == "sys")):
            return None
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*":
                    return None
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.Global):
            names.update(node.names)
        elif isinstance(getattr(node, "name", None), str):  # except ... as e, match patterns
            names.add(node.name)
    if "__getattr__" in names:
        return None
    return frozenset(names)


def _import_problem(target: str, error: BaseException) -> str:
    """Why importing ``target`` failed with ``error``, Python's own exception (not Hydra's)."""
    parts = target.split(".")
    missing = getattr(error, "name", None) if isinstance(error, ModuleNotFoundError) else None
    if missing and (target == missing or target.startswith(f"{missing}.")):
        if "." not in missing:
            return (f"module {missing} cannot be imported: it is not installed and not on the "
                    f"Python path; {_HOW_TO_IMPORT}")
        parent, _, name = missing.rpartition(".")
        return f"module {parent} has no submodule or name {name}; fix the target's spelling"
    if isinstance(error, AttributeError):
        return f"{_first_line(error)}; fix the target's spelling"
    # The first module of the path that is not imported is the one that raised.
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    module = next((p for p in prefixes if p not in sys.modules), parts[0])
    return (f"module {module} exists but raises while importing: {type(error).__name__}: "
            f"{_first_line(error)}; fix that error (or install what the module imports)")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else repr(error)
