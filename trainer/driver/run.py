"""The driver: config -> objects (``build``) -> Trainer.fit -> metrics.json and model.keras
(``run``)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from trainer.common.atomic import atomic_write as _atomic_write
from trainer.common.errors import UserError
from trainer.driver.rundir import accept
from trainer.driver.schemas import TapeConfig
from trainer.driver.tracking import configure_mlflow, fail_runs, log_outputs, logger_callbacks
from trainer.driver.validation import locate, target_error, validate
from trainer.step.freezing import param_counts, require_trainable, set_trainable
from trainer.training.lock import run_dir_lock, worker_index_from_env
from trainer.training.preemption import EXIT_PREEMPTED, Preempted, raise_if_signalled
from trainer.training.recovery import EXIT_DIVERGED, Diverged

log = logging.getLogger(__name__)


def instantiate_node(node, **kwargs):
    """``hydra.utils.instantiate`` that surfaces a user error from the target as itself,
    and a target that cannot be imported as a one-line ``UserError``."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, UserError):
            raise cause from None
        # Hydra names the target (a nested node's too) and its key only in its message; its
        # ImportError wraps the import's own error.
        located = re.match(r"Error locating target '(.+?)'", str(e))
        if located:
            key = re.search(r"^full_key: (.+)$", str(e), flags=re.M)
            original = getattr(cause, "__cause__", None) or cause or e
            raise target_error(located.group(1), original,
                               f"{key.group(1)}._target_" if key else "_target_") from None
        if isinstance(cause, TypeError) and "keyword argument" in str(cause):
            # A misspelt key on a node the schemas do not type (a regularizer, a step).
            target = node.get("_target_", "?") if hasattr(node, "get") else "?"
            raise UserError(f"{target}: {cause}; check the spelling of that key in its "
                            "config node") from None
        raise


def instantiate_data(node):
    """``instantiate_node`` for a data config: its flat keys gathered into the option
    objects its target takes.

    A data config is flat (``data.batch_size=64 data.val_fraction=0.3``); the builders
    of ``trainer.data`` take option objects (``batching=Batching(batch_size=64)``,
    ``split=Split(val_fraction=0.3)``). For each parameter of the target annotated with
    one of ``trainer.data.options.OPTIONS`` and not set by the node itself, the node's
    keys that name the option's fields (and no parameter of the target) become one
    nested node, ``{_target_: trainer.data.options.Batching, batch_size: 64}``, built
    with the rest. Other keys stay as they are: a target of flat arguments (your own)
    gets them all, and a key no parameter takes fails as it would without grouping.
    """
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    try:
        grouped = option_keys(locate(target)) if isinstance(target, str) else {}
    except Exception:  # instantiating the node reports what is wrong with it
        grouped = {}
    grouped = {key: group for key, group in grouped.items()
               if key in node and group[0] not in node}
    if not grouped:
        return instantiate_node(node)
    keys = OmegaConf.to_container(node, resolve=True)
    for key, (name, option) in grouped.items():
        keys.setdefault(name, {"_target_": f"{option.__module__}.{option.__qualname__}"})
        keys[name][key] = keys.pop(key)
    return instantiate_node(OmegaConf.create(keys))


def option_keys(function) -> dict[str, tuple[str, type]]:
    """The flat data config keys ``function`` takes through its option objects, as
    ``{key: (parameter, option class)}``: the fields of each parameter annotated with
    one of ``trainer.data.options.OPTIONS``, but for those ``function`` takes by name
    (see ``instantiate_data``). ``{}`` for a function of flat arguments."""
    from trainer.data.options import OPTIONS

    parameters = inspect.signature(function, eval_str=True).parameters
    return {f.name: (name, p.annotation) for name, p in parameters.items()
            if p.annotation in OPTIONS for f in dataclasses.fields(p.annotation)
            if f.name not in parameters}


def flat_hparams(container: dict, prefix: str = "") -> dict:
    """Flatten a config into ``{"optimizer.learning_rate": 0.001, ...}`` of scalars.

    Hydra's instantiation keys (``model._target_``, ``step._partial_``, anything below
    one) are left out: the TensorBoard HParams dashboard compares hyperparameters.
    """
    out = {}
    for key, value in container.items():
        if key in ("_target_", "_partial_", "_recursive_", "_convert_"):
            continue  # how a node is built, not a hyperparameter
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        elif value is not None:
            out[name] = str(value)
    return out


def _optimizer(node, schedule=None, total_steps: int = 0, swa=None, steps_per_epoch: int = 1):
    """The configured Keras optimizer, split into parameter groups if ``groups`` is set;
    with ``schedule`` (the schedule group's factory) its learning rate is the peak of it;
    with ``swa`` (``trainer.swa``, a dict) and its ``lr``, SWA's rate follows from its start."""
    from trainer.step.schedules import apply_schedule, apply_swa

    spec = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    spec = _float_rates(spec)
    if schedule is not None:
        spec = apply_schedule(spec, schedule, total_steps=total_steps)
    if swa:
        spec = apply_swa(spec, swa, steps_per_epoch=steps_per_epoch, build=instantiate_node)
    groups = spec.pop("groups", None) if isinstance(spec, dict) and "_target_" in spec else None
    optimizer = instantiate_node(spec)
    if groups:
        from trainer.step.optimizers import GroupedOptimizer

        return GroupedOptimizer(optimizer, groups=groups)
    return optimizer


def _float_rates(spec):
    """A learning rate given as an integer (``optimizer.learning_rate=3``) as a float: the
    schema types it Any (a number or a schedule node), and Keras wants a float."""
    if not isinstance(spec, dict):
        return spec
    out = {k: _float_rates(v) for k, v in spec.items()}
    rate = out.get("learning_rate")
    if isinstance(rate, int) and not isinstance(rate, bool):
        out["learning_rate"] = float(rate)
    return out


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


def _make_step(factory, kwargs):
    """``factory(**kwargs)``; a key of the step's config that its constructor does not take
    (``+step.smoothng=0.1``) is a one-line error naming it, not a traceback."""
    try:
        return factory(**kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise UserError(f"step {_callable_name(factory)}: {e}; check the spelling of that key "
                        "under step (or remove it)") from None


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
        "metrics": StepArgument(
            metric_objects(cfg.get("metrics") or []), "metrics", "remove metrics",
            at_default=not cfg.get("metrics")),
    }


def metric_objects(nodes) -> list:
    """The ``metrics`` list's ``keras.metrics`` objects (built in the strategy's scope:
    their variables then keep one copy per replica, summed when read)."""
    from keras.src.utils.naming import to_snake_case

    objects = []
    for i, node in enumerate(nodes):
        if not (hasattr(node, "get") and node.get("_target_")):
            raise UserError(f"metrics: {node!r} is not a metric node; write each entry as "
                            "{_target_: keras.metrics.AUC} (with its arguments, if any)")
        cls = locate(node._target_, f"metrics[{i}]._target_")
        named = {}
        if "name" not in node and "name" in inspect.signature(cls).parameters:
            # Keras numbers unnamed metrics per process (auc, auc_1, ...): the log keys and
            # the checkpoint's names must not depend on what else the process built.
            named["name"] = to_snake_case(cls.__name__)
        objects.append(instantiate_node(node, **named))
    return objects


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
    callbacks: list = field(default_factory=list)  # in the order the trainer runs them

    @property
    def distribution(self):
        """The run's ``trainer.distribute.strategies.Distribution`` (one device by default)."""
        return self.trainer.distribution

    @property
    def models(self) -> dict:
        """The step's models by name (``{"model": ...}``, or a GAN's generator and critic)."""
        return self.step.models


def _choices() -> dict:
    """The config group options the run chose (``choice/optimizer: adamw``), for HParams:
    the class a group builds is otherwise only in the ``_target_`` keys left out there."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {f"choice/{group}": str(option) for group, option in choices.items()
            if option is not None and not group.startswith("hydra/")}


def _run_dir(run_dir: str | os.PathLike | None) -> Path:
    """``run_dir``, else Hydra's output directory, else the working directory; created."""
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        run_dir = HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "."
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def steps_per_epoch(cfg: DictConfig, data) -> int:
    """Training steps per epoch: the data's, cut by trainer.limit_train_batches or
    trainer.overfit_batches."""
    from trainer.data.dataplan import BatchLimits

    limits = BatchLimits(train=cfg.trainer.get("limit_train_batches"),
                         overfit=cfg.trainer.get("overfit_batches") or 0)
    return limits.train_steps(data.steps_per_epoch("train"))


def planned_updates(cfg: DictConfig, data) -> int:
    """Optimizer updates the run plans: epochs x steps per epoch, capped by max_steps."""
    planned = int(cfg.trainer.epochs) * steps_per_epoch(cfg, data)
    max_steps = cfg.trainer.get("max_steps")
    return min(planned, int(max_steps)) if max_steps else planned


def build(cfg: DictConfig, run_dir: str | os.PathLike | None = None) -> Run:
    """Validate ``cfg`` and build the run's objects: data, model, optimizer, step, callbacks
    and trainer, seeded by ``cfg.seed``, with ``freeze.patterns`` applied.

    ``run_dir`` (created if missing) is where the callbacks will write; it defaults to
    Hydra's output directory, else the working directory. Nothing is trained.
    """
    container = validate(cfg)
    run_dir = _run_dir(run_dir)

    # The data first: its errors (a missing file, a malformed CSV) come before TensorFlow
    # starts, in a second and without its start-up lines.
    data = instantiate_data(cfg.data)

    import keras

    from trainer.callbacks import FreezeSchedule, MlflowLogger, TensorBoardCallback
    from trainer.training.resume import check_resume

    # TensorFlow's own INFO lines (checkpoint sharding, ...) drown the run's log.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)  # a line per collective op
    # The strategy before anything runs TensorFlow: logical CPU devices and a multi-worker
    # cluster can only be set up in a fresh runtime.
    distribution = instantiate_node(cfg.distribute)
    distribution.strategy  # noqa: B018 (created now, on purpose)
    keras.utils.set_random_seed(cfg.seed)
    # Set for every run, float32 too: the policy is process-wide and a run must not inherit
    # the last one's.
    keras.mixed_precision.set_global_policy(cfg.precision)
    # Everything with variables in the strategy's scope: an optimizer made outside it
    # would leave the replicas silently diverging.
    with distribution.scope():
        model = instantiate_node(cfg.model)(input_shape=data.input_shape,
                                            num_outputs=data.num_outputs)
        schedule = instantiate_node(cfg.schedule) if cfg.get("schedule") else None
        optimizer = _optimizer(cfg.optimizer, schedule, planned_updates(cfg, data),
                               swa=container["trainer"].get("swa"),
                               steps_per_epoch=steps_per_epoch(cfg, data))
        factory = instantiate_node(cfg.step)
        offered = _offered_step_arguments(cfg, model, optimizer, data.task)
        step = _make_step(factory, step_kwargs(factory, offered))
        if cfg.precision == "mixed_float16":
            from trainer.step.optimizers import LossScale

            step.use_loss_scale(LossScale())
    if cfg.freeze.patterns:
        set_trainable(step.models.values(), list(cfg.freeze.patterns), False)
        require_trainable(step.models.values(), list(cfg.freeze.patterns))
    callbacks = [instantiate_node(c) for c in cfg.callbacks.values() if c is not None]
    callbacks = logger_callbacks(cfg, callbacks, build=instantiate_node)
    if not distribution.is_chief:  # the chief alone writes the run's files
        callbacks = [cb for cb in callbacks if not cb.chief_only]
    if cfg.freeze.unfreeze:
        callbacks.insert(0, FreezeSchedule(unfreeze=container["freeze"]["unfreeze"]))
    # What only the driver knows: the run's config.
    params = {**flat_hparams(container), **_choices()}
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    for cb in callbacks:
        if isinstance(cb, TensorBoardCallback):
            cb.hparams, cb.config_text = params, config_text
        elif isinstance(cb, MlflowLogger):
            configure_mlflow(cb, params=params, config_text=config_text)
    # The trainer node's driver keys: how to start (resume, op determinism), not how to train.
    node = dict(container["trainer"])
    resume, deterministic = node.pop("resume"), node.pop("deterministic")
    node.pop("checkpoint_dir", None)  # the trainer reads the checkpoint callback's directory
    if deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    trainer = instantiate_node(node)(callbacks=callbacks, run_dir=str(run_dir),
                                     distribution=distribution)
    trainer.resume = check_resume(resume)
    # The trainer's list: the callbacks in the order they run.
    return Run(cfg=container, run_dir=run_dir, data=data, step=step, trainer=trainer,
               callbacks=trainer.callbacks)


def run(cfg: DictConfig, run_dir: str | os.PathLike | None = None) -> dict:
    """Build everything from ``cfg``, train, and write the run's outputs.

    Returns the final metrics (also written to ``<run_dir>/metrics.json``), saves
    each model as ``<run_dir>/model.keras`` (or ``<name>.keras`` for a step's other
    models) and the epochs' logs as ``<run_dir>/history.jsonl``. ``run_dir`` defaults
    to Hydra's output directory, else the working directory; one process at a time
    trains in it. A run stopped by SIGTERM or SIGINT writes its outputs so far and
    raises ``Preempted``.
    """
    validate(cfg)
    run_dir = _run_dir(run_dir)
    raise_if_signalled(run_dir)
    # The workers of a multi-worker run share the run dir; each holds a lock of its own.
    with run_dir_lock(run_dir, name=_lock_name(cfg)):
        r = build(cfg, run_dir)
        raise_if_signalled(run_dir)
        # A start that is refused here (a checkpoint of another model) leaves the run dir
        # as it was: its config and log are written only once the run is accepted.
        r.trainer.prepare(r.step, r.data)
        raise_if_signalled(run_dir)
        accept(run_dir, cfg if r.trainer.is_chief else None)
        try:
            r.trainer.fit(r.step, r.data)
        except Exception:
            fail_runs(r.trainer.callbacks)
            raise
        metrics = write_outputs(r) if r.trainer.is_chief else r.trainer.final_logs
        log_outputs(r.trainer.callbacks, run_dir)
    if r.trainer.preempted:
        from trainer.callbacks import CheckpointCallback

        saved = any(isinstance(cb, CheckpointCallback) for cb in r.trainer.callbacks)
        raise Preempted(signal=r.trainer.preempted, global_step=r.trainer.current_step,
                        run_dir=run_dir, saved=saved)
    return metrics


def _lock_name(cfg) -> str | None:
    """The lock file of this process in the run dir: the default, but for workers other
    than the first of a multi-worker run (read from TF_CONFIG or SLURM before TensorFlow
    starts)."""
    if not str(cfg.distribute.get("_target_", "")).endswith("MultiWorker"):
        return None
    index = worker_index_from_env(cfg.distribute.get("cluster", "tf_config"))
    return f".trainer-worker-{index}.lock" if index else None


def write_outputs(r: Run) -> dict:
    """The run's models, ``history.jsonl`` and ``metrics.json``, each written atomically.

    After a resume they describe the whole run: the history and the last logs come
    back with the checkpoint. Returns the metrics.
    """
    # The logs of the weights written: the best epoch's when a callback restored them.
    logs = r.trainer.final_logs
    for name, m in r.models.items():
        filename = "model.keras" if name == "model" else f"{name}.keras"
        _atomic_write(r.run_dir / filename, m.save)
    lines = "".join(json.dumps(epoch, sort_keys=True) + "\n" for epoch in r.trainer.history)
    _atomic_write(r.run_dir / "history.jsonl", lambda p: Path(p).write_text(lines))
    metrics = {k: v for k, v in logs.items() if isinstance(v, int | float)}
    metrics.update(param_counts(r.models.values()))
    # Experiment-specific results measured after training (GAN mode coverage, PINN error).
    metrics.update(r.step.final_metrics(r.data))
    _atomic_write(
        r.run_dir / "metrics.json",
        lambda p: Path(p).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n"),
    )
    # Significant digits, not decimals: a learning rate of 1.5e-5 is not 0.0. Counts whole.
    log.info("metrics: %s", " ".join(f"{k}={v}" if isinstance(v, int) else f"{k}={v:.4g}"
                                     for k, v in metrics.items()))
    return metrics


def run_or_exit(cfg: DictConfig):
    """Run and return the sweep objective.

    A user error exits 2 with one line on stderr; a run preempted by SIGTERM or SIGINT
    exits ``EXIT_PREEMPTED`` (75) after saving, with one line saying how to resume; one
    that kept blowing up after ``trainer.recovery.max_attempts`` rollbacks exits
    ``EXIT_DIVERGED`` (3) with one line saying why.
    In a sweep (``-m``), a job that fails that way (a diverging trial, a bad value of a
    swept key) prints its line and returns NaN instead, so the sweep goes on and Optuna
    records a failed trial. A non-finite objective is NaN too: neither the best nor a
    value a sweeper would compare.
    """
    try:
        metrics = run(cfg)
    except (UserError, FloatingPointError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        if _in_sweep():
            return math.nan
        sys.exit(2)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except Diverged as e:
        print(f"diverged: {e}", file=sys.stderr)
        if _in_sweep():
            return math.nan
        sys.exit(EXIT_DIVERGED)
    except Exception as e:
        # A bad record met while streaming shards fails inside the compiled step.
        from trainer.data.tfrecord import data_error_line

        line = data_error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        sys.exit(2)
    key = cfg.get("optimized_metric")
    if key is None:
        return None
    if key not in metrics:
        print(f"error: optimized_metric={key!r} is not one of {sorted(metrics)}", file=sys.stderr)
        sys.exit(2)
    value = metrics[key]
    return value if math.isfinite(value) else math.nan


def _in_sweep() -> bool:
    """Whether this job is one of a multirun's (``python -m trainer -m ...``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _one_line(error: Exception) -> str:
    """The error's own message on one line.

    ``UserError`` passes through ``tf.function`` tracing untouched (``ag_pass_through``);
    should a TensorFlow version re-raise it AutoGraph's way anyway, the message starts
    with ~15 lines of "in user code:" frames and ends with ``UserError: <message>``,
    and AutoGraph keeps the original text as ``ag_error_metadata.cause_message``.
    """
    text = str(error)
    cause = getattr(getattr(error, "ag_error_metadata", None), "cause_message", None)
    marker = f"{type(error).__name__}: "
    if isinstance(cause, str):
        text = cause.removeprefix(marker)
    elif text.startswith("in user code:") and marker in text:
        text = text[text.rindex(marker) + len(marker):]
    return " ".join(text.split())
