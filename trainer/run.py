"""The driver: config -> objects -> Trainer.fit -> metrics.json and model.keras."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

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


def build(node, **kwargs):
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
    optimizer = build(spec)
    if groups:
        from trainer.optim import GroupedOptimizer

        return GroupedOptimizer(optimizer, groups=groups)
    return optimizer


def _step_extras(cfg) -> dict:
    """Keyword arguments for the step beyond the defaults, so custom steps need only
    accept what their experiment configures."""
    extras = {}
    regularizers = [build(node) for node in (cfg.get("regularizer") or {}).values()]
    if regularizers:
        extras["regularizers"] = regularizers
    if cfg.tape.unconnected_gradients != "none":
        extras["unconnected_gradients"] = cfg.tape.unconnected_gradients
    if cfg.tape.reset.when:
        extras["reset"] = build(cfg.tape.reset)
    return extras


def run(cfg: DictConfig, run_dir: str | os.PathLike | None = None) -> dict:
    """Build everything from ``cfg``, train, and write the run's outputs.

    Returns the final metrics (also written to ``<run_dir>/metrics.json``).
    ``run_dir`` defaults to Hydra's output directory, else the working directory.
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
    data = build(cfg.data)
    model = build(cfg.model)(input_shape=data.input_shape, num_outputs=data.num_outputs)
    optimizer = _optimizer(cfg.optimizer)
    step = build(cfg.step)(model=model, optimizer=optimizer, task=data.task, **_step_extras(cfg))
    if cfg.freeze.patterns:
        set_trainable(step.models.values(), list(cfg.freeze.patterns), False)
    callbacks = [build(c) for c in cfg.callbacks.values() if c is not None]
    if cfg.freeze.unfreeze:
        callbacks.insert(0, FreezeSchedule(unfreeze=container["freeze"]["unfreeze"]))
    trainer = build(cfg.trainer)(
        callbacks=callbacks,
        run_dir=str(run_dir),
        hparams=flat_hparams(container),
        config_text=OmegaConf.to_yaml(cfg, resolve=True),
    )
    logs = trainer.fit(step, data)

    for name, m in step.models.items():
        filename = "model.keras" if name == "model" else f"{name}.keras"
        _atomic_write(run_dir / filename, m.save)
    metrics = {k: v for k, v in logs.items() if isinstance(v, int | float)}
    metrics.update(param_counts(step.models.values()))
    if hasattr(step, "final_metrics"):
        # Experiment-specific results measured after training (GAN mode coverage, PINN error).
        metrics.update(step.final_metrics(data))
    _atomic_write(
        run_dir / "metrics.json",
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
