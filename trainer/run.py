"""The driver: config -> objects (``build``) -> Trainer.fit -> metrics.json and model.keras
(``run``)."""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.config import TapeConfig
from trainer.errors import UserError
from trainer.freeze import param_counts, set_trainable

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> dict:
    """Resolve every value and fail on missing ones, before anything heavy starts."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise UserError(f"config key {key}: {str(e).splitlines()[0]}; set it on the command "
                        f"line, e.g. {key}=...") from None


def instantiate_node(node, **kwargs):
    """``hydra.utils.instantiate`` that surfaces a user error from the target as itself."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        raise


def flat_hparams(container: dict, prefix: str = "") -> dict:
    """Flatten a config into ``{"optimizer.learning_rate": 0.001, ...}`` of scalars."""
    out = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        elif value is not None:
            out[name] = str(value)
    return out


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _optimizer(node):
    """The configured Keras optimizer, split into parameter groups if ``groups`` is set."""
    spec = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    groups = spec.pop("groups", None) if isinstance(spec, dict) and "_target_" in spec else None
    optimizer = instantiate_node(spec)
    if groups:
        from trainer.optim import GroupedOptimizer

        return GroupedOptimizer(optimizer, groups=groups)
    return optimizer


# --- the step's arguments ----------------------------------------------------------------
@dataclass(frozen=True)
class StepArgument:
    """A keyword argument the driver offers a step, and where it comes from in the config.

    Args:
        value: what is passed.
        key: the config key it comes from, for errors (``"tape.reset"``).
        fix: how to bring the config back to the default (``"remove tape.reset.when"``).
        at_default: the config leaves it at its default, so a step that does not take
            it loses nothing and it is dropped silently.
    """

    value: Any
    key: str = ""
    fix: str = ""
    at_default: bool = True


def _callable_name(factory) -> str:
    func = getattr(factory, "func", factory)  # functools.partial from a _partial_ node
    module, name = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
    return f"{module}.{name}" if module and name else repr(func)


def step_kwargs(factory, offered: dict[str, StepArgument]) -> dict:
    """The keyword arguments of ``offered`` that ``factory``'s signature accepts.

    A step takes only the arguments it uses (a GAN step has no task or reset policy),
    so the driver reads the signature instead of asking every step to accept and
    reject the rest. An offered argument the signature names, or any argument when it
    has ``**kwargs``, is passed. One it does not take is dropped if the config leaves
    it at its default, and is otherwise a ``UserError`` naming the config key and the
    step. Arguments the factory already binds (keys of the config's ``step`` node) are
    left to it.
    """
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no introspectable signature: offer everything
        params = [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    bound = set(getattr(factory, "keywords", None) or ())
    kwargs = {}
    for name, arg in offered.items():
        if name in bound:
            continue
        if accepts_any or name in named:
            kwargs[name] = arg.value
        elif not arg.at_default:
            raise UserError(f"step {_callable_name(factory)} takes no {arg.key}; {arg.fix}")
    return kwargs


def _offered_step_arguments(cfg: DictConfig, model, optimizer, task) -> dict:
    """Everything the driver can give a step: the run's objects and the ``tape`` and
    ``regularizer`` settings, each marked with whether the config changed its default."""
    required = "a step must accept model and optimizer (or **kwargs)"
    nodes = [node for node in (cfg.get("regularizer") or {}).values() if node is not None]
    unconnected = cfg.tape.unconnected_gradients
    when = list(cfg.tape.reset.when)
    return {
        "model": StepArgument(model, "model", required, at_default=False),
        "optimizer": StepArgument(optimizer, "optimizer", required, at_default=False),
        # The data's task picks the default loss and metrics; a step with its own needs none.
        "task": StepArgument(task),
        "regularizers": StepArgument(
            [instantiate_node(node) for node in nodes], "regularizer",
            "remove the regularizer group (regularizer=null)", at_default=not nodes),
        "unconnected_gradients": StepArgument(
            unconnected, "tape.unconnected_gradients",
            "remove tape.unconnected_gradients (its default is none)",
            at_default=unconnected == TapeConfig.unconnected_gradients),
        "reset": StepArgument(
            instantiate_node(cfg.tape.reset) if when else None, "tape.reset",
            "remove tape.reset.when", at_default=not when),
    }


# --- the driver ----------------------------------------------------------------------------
@dataclass
class Run:
    """The objects of one run, built from a config and not yet trained.

    ``run(cfg)`` is ``build(cfg)``, then ``trainer.fit(step, data)``, then the outputs;
    tests, benchmarks and notebooks take the objects and drive them themselves.
    """

    cfg: dict  # the resolved config, as plain containers
    run_dir: Path
    data: Any
    step: Any
    trainer: Any
    callbacks: list = field(default_factory=list)

    @property
    def models(self) -> dict:
        """The step's models by name (``{"model": ...}``, or a GAN's generator and critic)."""
        return self.step.models


def build(cfg: DictConfig, run_dir: str | os.PathLike | None = None) -> Run:
    """Validate ``cfg`` and build the run's objects: data, model, optimizer, step, callbacks
    and trainer, seeded by ``cfg.seed``, with ``freeze.patterns`` applied.

    ``run_dir`` (created if missing) is where the callbacks will write; it defaults to
    Hydra's output directory, else the working directory. Nothing is trained.
    """
    container = validate(cfg)
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "."
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    import keras

    from trainer.callbacks.freeze import FreezeSchedule

    # TensorFlow's own INFO lines (checkpoint sharding, ...) drown the run's log.
    logging.getLogger("absl").setLevel(logging.WARNING)
    keras.utils.set_random_seed(cfg.seed)
    data = instantiate_node(cfg.data)
    model = instantiate_node(cfg.model)(input_shape=data.input_shape,
                                        num_outputs=data.num_outputs)
    optimizer = _optimizer(cfg.optimizer)
    factory = instantiate_node(cfg.step)
    offered = _offered_step_arguments(cfg, model, optimizer, data.task)
    step = factory(**step_kwargs(factory, offered))
    if cfg.freeze.patterns:
        set_trainable(step.models.values(), list(cfg.freeze.patterns), False)
    callbacks = [instantiate_node(c) for c in cfg.callbacks.values() if c is not None]
    if cfg.freeze.unfreeze:
        callbacks.insert(0, FreezeSchedule(unfreeze=container["freeze"]["unfreeze"]))
    trainer = instantiate_node(cfg.trainer)(
        callbacks=callbacks,
        run_dir=str(run_dir),
        hparams=flat_hparams(container),
        config_text=OmegaConf.to_yaml(cfg, resolve=True),
    )
    return Run(cfg=container, run_dir=run_dir, data=data, step=step, trainer=trainer,
               callbacks=callbacks)


def run(cfg: DictConfig, run_dir: str | os.PathLike | None = None) -> dict:
    """Build everything from ``cfg``, train, and write the run's outputs.

    Returns the final metrics (also written to ``<run_dir>/metrics.json``) and saves
    each model as ``<run_dir>/model.keras`` (or ``<name>.keras`` for a step's other
    models). ``run_dir`` defaults to Hydra's output directory, else the working directory.
    """
    r = build(cfg, run_dir)
    logs = r.trainer.fit(r.step, r.data)

    for name, m in r.models.items():
        filename = "model.keras" if name == "model" else f"{name}.keras"
        _atomic_write(r.run_dir / filename, m.save)
    metrics = {k: v for k, v in logs.items() if isinstance(v, int | float)}
    metrics.update(param_counts(r.models.values()))
    # Experiment-specific results measured after training (GAN mode coverage, PINN error).
    metrics.update(r.step.final_metrics(r.data))
    _atomic_write(
        r.run_dir / "metrics.json",
        lambda p: Path(p).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n"),
    )
    log.info("metrics: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics


def run_or_exit(cfg: DictConfig):
    """Run and return the sweep objective; a user error exits 2 with one line on stderr."""
    try:
        metrics = run(cfg)
    except (UserError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    key = cfg.get("optimized_metric")
    if key is None:
        return None
    if key not in metrics:
        print(f"error: optimized_metric={key!r} is not one of {sorted(metrics)}", file=sys.stderr)
        sys.exit(2)
    value = metrics[key]
    return value if math.isfinite(value) else math.inf
