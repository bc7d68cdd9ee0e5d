"""Trainer: executions, evaluation, callbacks, recompilation; the owner of training state."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import tensorflow as tf

from trainer.callbacks.base import VAL, Callback
from trainer.common.errors import UserError
from trainer.common.keys import EXAMPLES
from trainer.compile.calibrate import choose_faster, describe, time_compilations
from trainer.compile.executions import Executions, build_executions
from trainer.compile.pacing import Pacing, check_steps_per_execution
from trainer.compile.plan import CompileOptions, CompilePlan, plan_compile
from trainer.compile.xla import raise_if_xla_error
from trainer.data.base import Data
from trainer.data.dataplan import BatchLimits, DataPlan
from trainer.distribute.strategies import Distribution, NoDistribution
from trainer.step.averaging import (
    Average,
    EmaSettings,
    StochasticWeightAverage,
    SwaSettings,
    WeightAverage,
)
from trainer.step.base import Step
from trainer.step.freezing import variable_table
from trainer.step.layer_health import PREFIX as HEALTH
from trainer.step.layer_health import LayerHealth
from trainer.step.tape import TapeResetError
from trainer.training.preemption import Preemption
from trainer.training.recovery import Diverged, Recovery
from trainer.training.resume import candidates, check_resume, readable
from trainer.training.state import Progress, TrainingState

log = logging.getLogger(__name__)


class Trainer:
    """Runs a step over a data set for a number of epochs.

    Each execution is one call of a compiled function that runs
    ``steps_per_execution`` steps on the graph side; callbacks run between
    executions and at epoch boundaries, and see ``(global_step, logs)`` with flat,
    slash-namespaced keys (``train/loss``, ``val/accuracy``).

    The trainer owns the training state: its global step and epoch, its progress
    (the epochs' history, the open epoch's running sums) and, from ``fit`` on,
    ``checkpoint``, one ``tf.train.Checkpoint`` that gathers the step's models,
    optimizers and state, the models' seed generators, the data order and position
    and the callbacks' state (see ``trainer.training.state``). With ``resume`` it reads a
    checkpoint back before training (``prepare``'s and ``fit``'s ``resume``), and continues
    from its exact step.

    SIGTERM and SIGINT during ``fit`` stop it at the next execution boundary
    (``preempted`` then names the signal); the callbacks' ``on_fit_end`` runs, so
    the checkpoint callback saves, and the epoch stays open for a resumed run.

    Args:
        epochs: passes over the training set.
        max_steps: optional budget of optimizer steps; stops mid-epoch when reached.
        steps_per_execution: steps per compiled call (an execution never crosses an
            epoch boundary or the step budget); ``"auto"`` (default) tunes it so one
            execution lasts about 0.5 s (see ``trainer.compile.pacing.Pacing``).
        run_eagerly: run the same step code without tf.function, for debugging.
        jit_compile: ``True``, ``False`` or ``"auto"`` (default): what the compile plan
            (``trainer.compile.plan``) decides XLA from; ``plan`` holds its decision,
            with the reason.
        accumulate_steps: split each batch into this many micro-batches and apply
            their summed gradients as one update (gradient accumulation: the update of
            the whole batch at the memory of a micro-batch). The global step, lazy
            regularizers and the reset policy count updates; a bad micro-batch
            discards its whole update.
        callbacks: ``trainer.callbacks.Callback`` objects.
        run_dir: where callbacks put their files (TensorBoard, checkpoints).
        distribution: a ``trainer.distribute.strategies.Distribution`` (default: one device).
            The step's models and optimizers must have been created in its scope
            (the driver does); the trainer builds optimizer state there, runs the
            step on every replica, and under several workers makes every decision
            that changes what runs (steps per execution, stopping on a signal, the
            clock of timed callbacks) the same on all of them.
        recovery: a ``trainer.training.recovery.Recovery`` or its keyword arguments (the
            ``trainer.recovery`` node): when an execution's loss blows up, roll the whole
            training state back to the last good snapshot, lower the learning rate and go
            on; ``fit`` raises ``Diverged`` once ``max_attempts`` rollbacks did not help.
            Off by default.
        limit_train_batches, limit_val_batches: the training steps of each epoch and the
            batches each evaluation runs: an int (batches) or a float in (0, 1] (a
            fraction of the split); None runs all (``trainer.data.dataplan.BatchLimits``).
        overfit_batches: train on the same first batches of the training set every epoch,
            in the same order, and validate on them (debugging: a model that cannot drive
            their loss to zero has a bug); an int or a fraction, 0 turns it off.
        val_every_n_steps: also validate at every global step that is a multiple of this
            (executions end there), between epoch ends; each validation feeds the
            callbacks' ``on_validation_end`` (early stopping, the best checkpoint,
            TensorBoard). None: at epoch ends only.
    """

    def __init__(
        self,
        *,
        epochs: int = 10,
        max_steps: int | None = None,
        steps_per_execution: int | str = "auto",
        run_eagerly: bool = False,
        jit_compile: bool | str = "auto",
        accumulate_steps: int = 1,
        ema=None,
        swa=None,
        callbacks=(),
        run_dir: str = ".",
        distribution: Distribution | None = None,
        recovery=None,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        overfit_batches: int | float = 0,
        val_every_n_steps: int | None = None,
    ):
        if epochs < 1:
            raise UserError(f"trainer.epochs={epochs} must be at least 1")
        steps_per_execution = check_steps_per_execution(steps_per_execution)
        if max_steps is not None and max_steps < 1:
            raise UserError(f"trainer.max_steps={max_steps} must be at least 1 (or null)")
        self.epochs = epochs
        self.max_steps = max_steps
        #: What each epoch runs of the data (``trainer.data.dataplan.BatchLimits``).
        self.limits = BatchLimits(train=limit_train_batches, val=limit_val_batches,
                                  overfit=overfit_batches)
        if val_every_n_steps is not None and (isinstance(val_every_n_steps, bool) or not
                                              isinstance(val_every_n_steps, int)
                                              or val_every_n_steps < 1):
            raise UserError(f"trainer.val_every_n_steps={val_every_n_steps!r} must be an "
                            "integer >= 1 (or null: validate at epoch ends only)")
        self.val_every_n_steps = val_every_n_steps
        self.steps_per_execution = steps_per_execution
        self.run_eagerly = run_eagerly
        self.jit_compile = jit_compile
        CompileOptions(jit_compile=jit_compile, accumulate_steps=accumulate_steps)  # checks
        #: How the run is compiled (``trainer.compile.plan.CompilePlan``), from ``prepare`` on.
        self.plan = CompilePlan()
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise UserError(f"callback {cb!r} is not a trainer.callbacks.Callback; "
                                "subclass it and override the hooks it needs")
        # Stable: the given order, with callbacks that save the others' state last.
        self.callbacks = sorted(callbacks, key=lambda cb: cb.order)
        #: What ``prepare`` resumes from (its ``resume`` argument; ``"auto"`` by default).
        self.resume = "auto"
        # Where resume="auto" looks, relative to run_dir: the checkpoint callback's directory.
        self.checkpoint_dir = next((cb.directory for cb in self.callbacks
                                    if isinstance(getattr(cb, "directory", None), str)),
                                   "checkpoints")
        self.run_dir = str(run_dir)
        self.accumulate_steps = int(accumulate_steps)
        #: ``trainer.ema`` (``trainer.step.averaging.EmaSettings``), read from a mapping.
        self.ema = ema if isinstance(ema, EmaSettings) else EmaSettings.read(ema)
        #: ``trainer.swa`` (``trainer.step.averaging.SwaSettings``), read from a mapping.
        self.swa = swa if isinstance(swa, SwaSettings) else SwaSettings.read(swa)
        if self.ema.on and self.swa.on:
            raise UserError("trainer.ema.decay and trainer.swa.start_epoch are both set; a run "
                            "keeps one average: drop one of them")
        #: The weight average (``trainer.step.averaging.Average``: ``WeightAverage`` with
        #: ``ema``, ``StochasticWeightAverage`` with ``swa``), from ``prepare`` on; or None.
        self.averages: Average | None = None
        self.distribution = distribution if distribution is not None else NoDistribution()
        #: Rollback on blow-up (``trainer.training.recovery.Recovery``; ``enabled`` False: off).
        self.recovery = Recovery.of(recovery)
        self._clock_start, self._clock = time.monotonic(), 0.0
        self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.epoch_variable = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.epoch = 0
        self.trace_count = 0
        self.progress = Progress()
        self.stop_training = False
        self.logs: dict = {}
        #: The checkpoint the last ``fit`` resumed from, or None.
        self.restored_from: str | None = None
        #: The epoch (1-based) whose weights a callback gave the models at the end of
        #: ``fit`` (the best checkpoint's, early stopping's best); None: the last ones.
        self.weights_epoch: int | None = None
        #: The global step of the validation whose weights a callback gave the models, when
        #: it was not an epoch's end (``val_every_n_steps``); None otherwise.
        self.weights_step: int | None = None
        self._preemption, self._cut_short = Preemption(), False
        self._stopped_when_restored = False
        self.step: Step | None = None
        #: What this fit runs of its data set (``trainer.data.dataplan.DataPlan``), from
        #: ``prepare`` on: read once, passed down.
        self.data_plan: DataPlan | None = None
        self._executions: Executions | None = None
        #: The ``trainer.step.layer_health.LayerHealth`` of the step's model, from ``prepare`` on,
        #: when a callback watches it (``Callback.uses_health``) and the step reports it
        #: (``Step.health_model()``); else None. ``health.request(True)`` asks the next
        #: execution's sampled step for the layers' health.
        self.health: LayerHealth | None = None
        #: The layers' health measured by the last execution (``health/<layer>/<stat>``),
        #: empty when it measured none, and the global step of the update it describes.
        self.health_logs: dict = {}
        self.health_step: int | None = None
        self.checkpoint: tf.train.Checkpoint | None = None
        self.training_state: TrainingState | None = None  # from prepare on
        self.variable_table = ""
        self._variables_key = None
        self._fit_flags = None
        self._pace = None

    # --- the public state callbacks read ---------------------------------------------------
    @property
    def models(self) -> dict:
        """The step's models by name."""
        return self.step.models

    @property
    def optimizers(self) -> dict:
        """The step's optimizers by name (``GroupedOptimizer``s: ``learning_rate`` can be set)."""
        return self.step.optimizers

    @property
    def stop_training(self) -> bool:
        """Set by a callback (early stopping) to end ``fit`` after the current execution.

        It is part of the training state at once: a checkpoint written after it was set
        resumes as a stopped run.
        """
        return self.progress.stopped

    @stop_training.setter
    def stop_training(self, value: bool) -> None:
        self.progress.stopped = bool(value)

    @property
    def history(self) -> list[dict]:
        """The logs of every finished epoch (restored with the checkpoint on resume)."""
        return self.progress.history

    @property
    def validations(self) -> list[dict]:
        """The logs of the validations between epoch ends (``val_every_n_steps``), in order:
        the open epoch's training means so far, ``val/...``, ``epoch`` (1-based, the epoch
        they fell in) and ``step`` (restored with the checkpoint on resume)."""
        return self.progress.validations

    @property
    def final_logs(self) -> dict:
        """The logs that describe the weights the models hold after ``fit``.

        ``logs`` (the last epoch's) unless a callback gave the models an earlier epoch's
        weights (``weights_epoch``: the best checkpoint, ``restore_best_weights``); then
        that epoch's logs, with the last epoch's under ``last/`` (``last/val/loss``), so
        what is reported (``metrics.json``, a sweep's objective) is what is shipped.
        """
        logs, epoch, step = self.logs, self.weights_epoch, self.weights_step
        if step is not None:  # a validation's weights (``val_every_n_steps``)
            if step == logs.get("step"):
                return dict(logs)
            shipped = next(h for h in [*self.history, *self.validations] if h["step"] == step)
        elif epoch is None or epoch == logs.get("epoch"):
            return dict(logs)
        else:
            shipped = next(h for h in self.history if h.get("epoch") == epoch)
        timers = {k: v for k, v in logs.items() if k.startswith("time/")}
        last = {f"last/{k}": v for k, v in logs.items() if not k.startswith("time/")}
        return {**shipped, **last, **timers}

    @property
    def preempted(self) -> str | None:
        """The signal that cut the last ``fit`` short (``"SIGTERM"``, ``"SIGINT"``), or None.

        A signal that arrives once all the work is done (during the last evaluation or
        ``on_fit_end``) cuts nothing short: the run is complete, not preempted. The
        workers of a multi-worker run stop together when any of them gets one.
        """
        if not self._cut_short:
            return None
        # A worker of a multi-worker run stops with the others when one got the signal.
        return self._preemption.name or "a signal to another worker"

    @property
    def is_chief(self) -> bool:
        """Whether this process keeps the run's files (always, but on workers other
        than the chief of a multi-worker run)."""
        return self.distribution.is_chief

    @property
    def worker_index(self) -> int:
        """This process's index among the workers of a multi-worker run (0: the chief)."""
        return self.distribution.worker_index

    def clock(self) -> float:
        """Seconds since the trainer was made, for timed callbacks (checkpoints every n
        seconds): under several workers, the chief's, as of the last execution, so all
        workers' callbacks decide alike."""
        if self.distribution.num_workers > 1:
            return self._clock
        return time.monotonic() - self._clock_start

    def _agree(self, steps: int = 0) -> tuple[int, bool]:
        """``(steps, stop)`` as every worker will run them: the chief's steps for the next
        execution, and whether a signal reached any worker. One process: its own."""
        if self.distribution.num_workers == 1:
            return steps, self._preemption.requested
        (steps, self._clock), (stop,) = self.distribution.agree(
            [steps, time.monotonic() - self._clock_start], [self._preemption.requested])
        return int(steps), stop

    @property
    def current_step(self) -> int:
        """The global step as a Python int (reads the variable)."""
        return int(self.global_step.numpy())

    @property
    def data(self) -> Data | None:
        """The data set of the last ``prepare`` (None before)."""
        return self.data_plan.data if self.data_plan is not None else None

    @property
    def steps_per_epoch(self) -> int:
        """Training steps in one pass over the data (the data plan's)."""
        return self.data_plan.steps_per_epoch

    def validation_batches(self) -> list:
        """The batches an evaluation runs, once, as ``(x, y)`` numpy batches in a fixed
        order (cut by ``trainer.limit_val_batches``; with ``trainer.overfit_batches``, the
        fixed training batches)."""
        return self.data_plan.validation_batches()

    def gradients_by_path(self) -> dict:
        """Gradients on a fixed training batch, keyed by variable path (for histograms).

        Inspecting leaves the run alone: a fixed probe batch keeps the data order,
        and the state the forward pass moves (dropout's seed generators, batch-norm
        statistics, the step's state) is put back afterwards, so a run with
        histograms every step ends bit-identical to one without.
        """
        moved = [v for m in self.step.models.values() for v in m.non_trainable_variables]
        # Not the metrics: the probe never updates them, and their per-replica copies
        # (summed when read) could not be read and put back by the chief alone.
        moved += tf.nest.flatten({k: v for k, v in self.step.state().items() if k != "metrics"})
        saved = [v.numpy() for v in moved]
        grads = {k: v.numpy() for k, v in self._executions.gradients(self.data_plan.probe).items()}
        for v, value in zip(moved, saved):
            v.assign(value)
        return grads

    @property
    def trainable_variables(self) -> list:
        """The step's trainable variables, read fresh (freezing is honoured)."""
        return self.step.trainable_variables

    def inference_loss(self, batch):
        """The step's loss of ``batch`` in inference mode, no update
        (``Step.inference_loss``); call it in a ``tf.function`` of one's own."""
        return self.step.inference_loss(batch)

    # --- building the compiled functions ------------------------------------------------
    def _count_trace(self):
        self.trace_count += 1

    def _state_logs(self) -> dict:
        opts = self.step.optimizers
        if len(opts) == 1:
            logs = {"learning_rate": next(iter(opts.values())).learning_rate}
        else:
            logs = {f"learning_rate/{k}": o.learning_rate for k, o in opts.items()}
        for name, opt in opts.items():
            if opt.clipping is not None:
                prefix = "optimizer/" if len(opts) == 1 else f"optimizer/{name}/"
                logs.update(opt.clipping.state_logs(opt.iterations, prefix))
        if self.step.loss_scale is not None:
            logs.update(self.step.loss_scale.state_logs())
        # The execution returns the global step with its logs: the host learns it without
        # a variable read of its own. The Keras metrics are read here too: their values over
        # the epoch so far, not averaged over the execution.
        return {**logs, **self.step.state_logs(), **self.step.metric_results("train"),
                "global_step": self.global_step}

    def _compile(self, evaluation: bool = False) -> None:
        """(Re)build the step's optimizer state and the compiled training functions.

        Called at the start of fit (with ``evaluation``, which also builds the eval
        function) and whenever the set of trainable variables changes, so the tape
        always watches the current variables (the stale variable list that makes
        Keras users recompile by hand).
        """
        self._check_scope()
        for opt in self.step.optimizers.values():
            opt.accumulate_steps = self.accumulate_steps
            if self.recovery.enabled:  # a scheduled rate follows the rollbacks' scale
                opt.scale_schedules_by(self.recovery.scale_variable(self.distribution))
        try:
            with self.distribution.scope():
                self.step.build()
        except RuntimeError as e:
            if "Mixing different tf.distribute.Strategy" not in str(e):
                raise
            raise UserError(f"the step's optimizers were created outside the "
                            f"{self.distribution.kind} strategy's scope; create the step's "
                            "models and optimizers inside `with distribution.scope():` (the "
                            "driver does)") from None
        self._check_scope()
        self._variables_key = self._trainable_key()
        self.variable_table = variable_table(self.step.models.values())
        # Once per step and set of trainable variables: jit_compile=auto compiles the same
        # step two or three times, a recompile after an unfreeze has a new table to show.
        shown = (id(self.step), self._variables_key)
        if shown != getattr(self, "_table_shown", None):
            self._table_shown = shown
            log.info("variables:\n%s", self.variable_table)
        built = build_executions(
            self.step, self.data_plan, self.plan, global_step=self.global_step,
            strategy=self.distribution.strategy if self.distribution.distributed else None,
            state_logs=self._state_logs, on_trace=self._count_trace,
            evaluation=(lambda: self.step.metric_results("val")) if evaluation else None,
            after_update=self.averages.update if self.averages is not None
            and self.averages.in_step else None,
            health=self.health)
        if not evaluation:  # the evaluation function stays: it reads no trainable list
            built = dataclasses.replace(built, evaluate=self._executions.evaluate)
        self._executions = built

    def _check_scope(self) -> None:
        """Under a strategy: every variable of the step was created in its scope."""
        named = {v.path: v for m in self.step.models.values() for v in m.variables}
        for name, opt in self.step.optimizers.items():
            named.update({f"optimizer {name}: {getattr(v, 'path', v.name)}": v
                          for v in opt.variables})
        named.update({f"step state {i}: {getattr(v, 'name', v)}": v
                      for i, v in enumerate(tf.nest.flatten(self.step.state()))})
        self.distribution.check_variables(named)

    def _trainable_key(self):
        return tuple(id(v) for v in self.step.trainable_variables)

    def recompile_if_needed(self) -> bool:
        """Recompile when variables were frozen or unfrozen since the last compile."""
        if self._trainable_key() == self._variables_key:
            return False
        log.info("trainable variables changed: recompiling the step")
        self._compile()
        return True

    def _prepare(self, step, data) -> None:
        _check_step(step)
        data_plan = DataPlan.read(data, self.limits)
        if data_plan.weighted and not step.takes_sample_weight:
            raise UserError(f"the step {type(step).__name__} takes no per-example weights, but "
                            "the data is weighted (data.class_weight, data.w_key or data.weight); "
                            "remove the weights, or use a step that weighs its loss (TapeStep)")
        if self.run_eagerly and self.distribution.distributed:
            # Eagerly, replicas run in threads that issue their collectives in whatever
            # order they reach them, and mismatched collectives abort the run.
            raise UserError(f"trainer.run_eagerly=true is for debugging on one device; under "
                            f"distribute={self.distribution.kind} steps run compiled (set "
                            "distribute=none to step through them eagerly)")
        self.step, self.data_plan = step, data_plan
        if data_plan.describe():
            log.info(data_plan.describe())
        self.plan = self._plan()
        if self.distribution.distributed:
            log.info("distribution: %s", self.distribution.describe())
        if data_plan.num_outputs:
            with self.distribution.scope():
                step.build_metrics(data_plan.num_outputs)
        with self.distribution.scope():
            self.averages = self.make_average(step.models)
        #: Everything a restart needs (``TrainingState``): the checkpoint callback saves it,
        #: resuming restores it; ``checkpoint`` is the ``tf.train.Checkpoint`` it writes.
        self.training_state = TrainingState.of(self, step=step, source=data_plan.train,
                                               callbacks=self.callbacks)
        self.checkpoint = self.training_state.checkpoint
        self.progress.steps_per_epoch = self.steps_per_epoch
        self.health = self._layer_health(step, data_plan)
        paths = candidates(self.resume, Path(self.run_dir), self.checkpoint_dir)
        path = readable(paths) if paths else None
        if path:
            # The callbacks' state first: what it implies (the freeze schedule's unfreezes)
            # decides which variables the optimizer is built for, before the full restore.
            self.training_state.restore_callbacks(path)
            self._callback("on_restore")
        self._compile(evaluation=True)
        if path:
            self.training_state.restore(path)
            self.restored_from = path
            self._after_restore()
            # A resumed run compiles as the run it resumes did (XLA's numbers differ).
            kept = self._plan(stored=self.progress.plan)
            recompile = kept.decisions() != self.plan.decisions()
            self.plan = kept  # its reason says it was kept
            if recompile:
                self._compile(evaluation=True)
        if self.plan.measure:
            self._choose_xla_by_timing()
        self.progress.plan = json.loads(self.plan.to_json())  # saved with the checkpoint
        log.info(self.plan.describe())

    def _layer_health(self, step, data_plan) -> LayerHealth | None:
        """The health probe of the step's model, if a callback watches it."""
        model = step.health_model()
        if model is None or not any(cb.uses_health for cb in self.callbacks):
            return None
        probe = data_plan.probe
        with self.distribution.scope():
            return LayerHealth(model, probe_x=probe[0] if isinstance(probe, (tuple, list))
                               else None)

    def _plan(self, measured: bool | None = None, stored: dict | None = None) -> CompilePlan:
        """The compile plan for the step and data of this fit (``trainer.compile.plan``)."""
        # The whole run, not what is left of it: a resumed run must choose as the
        # interrupted one did, or its numbers would differ.
        planned = self.epochs * self.steps_per_epoch
        return plan_compile(self.step, fused_source=self.data_plan.fused,
                            planned_steps=min(planned, self.max_steps or planned),
                            distributed=self.distribution.distributed, options=self.options,
                            measured=measured, stored=stored)

    @property
    def options(self) -> CompileOptions:
        """The compile options as set now (``run_eagerly`` and ``jit_compile`` may change
        between fits, as in Keras: the next ``fit`` plans again)."""
        return CompileOptions(jit_compile=self.jit_compile, run_eagerly=self.run_eagerly,
                              steps_per_execution=self.steps_per_execution,
                              accumulate_steps=self.accumulate_steps)

    @property
    def xla(self) -> bool:
        """Whether the training update runs under XLA (the plan's ``update_xla``)."""
        return self.plan.update_xla

    def _choose_xla_by_timing(self) -> None:
        """``jit_compile=auto`` on a long in-memory run: time the execution with and without
        XLA, and plan with the faster. The plan is part of the training state: a resumed
        run keeps it (its numbers must continue those of the run it resumes)."""
        plain = self._executions.train
        self.plan = dataclasses.replace(self.plan, update_xla=True, fused=True)
        self._compile()  # the XLA compilation of the same step
        # Executions inside one epoch (the epoch's end runs a second function).
        steps = max(1, min(self.steps_per_epoch - 1, 100))
        seconds = time_compilations({True: self._executions.train, False: plain},
                                    self.checkpoint, steps=steps)
        faster = choose_faster(seconds)
        log.info(describe(seconds, steps, faster))
        self.plan = self._plan(measured=faster)
        self._compile(evaluation=True)

    # --- the loop ---------------------------------------------------------------------
    def prepare(self, step: Step, data: Data, *, resume: str | None = None) -> None:
        """Everything ``fit`` does before its first step, without training: check the step
        and the data, plan the compilation, build the compiled functions and read a
        checkpoint back (a foreign one raises ``UserError`` here, with nothing assigned).

        ``resume``: ``"auto"`` (the default: continue from the newest checkpoint of the
        checkpoint callback's directory in ``run_dir``, if there is one), ``"never"``, or
        a path: a run directory, a checkpoint directory or a checkpoint prefix.

        ``fit`` calls it itself; the driver calls it first, so that a run whose start is
        refused writes nothing into its run dir. Done once for the same step, data and
        compile settings.
        """
        if resume is not None:
            self.resume = check_resume(resume)
        flags = self.options
        if step is not self.step or data is not self.data or flags != self._fit_flags:
            self._prepare(step, data)
            self._fit_flags = flags

    def fit(self, step: Step, data: Data, *, resume: str | None = None) -> dict:
        """Train ``step`` on ``data``; return the final logs (last epoch's train and val).

        With ``resume`` the training state is first read back from a checkpoint, and
        training continues from its global step, in the middle of an epoch if it was
        saved there. Calling ``fit`` again with the same step and data (after raising
        ``epochs``) continues with the functions already compiled, as Keras does.
        """
        self.prepare(step, data, resume=resume)
        if self._pace is None or self._pace.setting != self.steps_per_execution:
            self._pace = Pacing(self.steps_per_execution)
        # The whole run's steps: auto pacing splits it into at least MIN_EXECUTIONS executions.
        self._pace.planned_steps = min(self.epochs * self.steps_per_epoch,
                                       self.max_steps or math.inf)
        # A run that a callback stopped (early stopping) stays stopped when resumed.
        self.stop_training, self._stopped_when_restored = self._stopped_when_restored, False
        self._preemption, self._cut_short = Preemption(), False
        self.weights_epoch = self.weights_step = None
        start = time.perf_counter()
        with self._preemption.watch():
            self._callback("on_fit_start")
            try:
                train_seconds = self._train()
            finally:
                self.recovery.forget()
            # Optimizer state for the variables trainable now (an unfreeze at an epoch start
            # that a preemption cut short), so the final checkpoint matches a resumed run.
            self.recompile_if_needed()
            progress = self.progress
            progress.train_seconds += train_seconds
            progress.fit_seconds += time.perf_counter() - start
            # The whole run's, across restarts.
            self.logs = {**self.logs, "time/train_seconds": progress.train_seconds,
                         "time/fit_seconds": progress.fit_seconds}
            self._callback("on_fit_end", self.logs)
            if self.ships_average and self._averaged() and not self.preempted:
                # After the last checkpoint was saved (with the trained weights, to resume
                # from): the models ship the average (the best checkpoint's, if restored).
                self.averages.copy_to_models()
                self.averages.ready(self.data)
        return self.logs

    def make_average(self, models: dict) -> Average | None:
        """The weight average ``trainer.ema`` or ``trainer.swa`` asks for, of ``models``."""
        if self.ema.on:
            return WeightAverage(models, decay=self.ema.decay, warmup=self.ema.warmup)
        if self.swa.on:
            return StochasticWeightAverage(models, batch_norm=self.swa.batch_norm)
        return None

    @property
    def ships_average(self) -> bool:
        """Whether the run ships its weight average (``weights: averaged``), not the
        trained weights."""
        settings = self.ema if self.ema.on else self.swa
        return settings.on and settings.weights == "averaged"

    def _averaged(self) -> bool:
        """Whether the average holds anything yet (SWA's before its first cycle does not)."""
        averages = self.averages
        return averages is not None and (not isinstance(averages, StochasticWeightAverage)
                                         or int(averages.count.numpy()) > 0)

    def _train(self) -> float:
        """The epochs of ``fit``; returns the seconds spent in executions."""
        seconds, progress = 0.0, self.progress
        # The global step is the one count of progress: the epoch and the position in it
        # are derived from it (an execution never crosses an epoch boundary).
        global_step = self.current_step
        epoch = self._epoch_at(global_step)
        self._start_recovery(global_step)
        while epoch < self.epochs and not self.stop_training:
            if self._agree()[1]:
                self._cut_short = True  # before opening an epoch: its start is not half done
                break
            if progress.open_epoch != epoch:
                if self._budget_left(global_step) <= 0:
                    break
                progress.open_epoch, progress.sums, progress.examples = epoch, {}, 0.0
                self.data_plan.train.start_epoch(epoch)
                self.step.reset_metrics("train")
            self.epoch = epoch
            self.epoch_variable.assign(epoch)
            self._callback("on_epoch_start", epoch)
            try:
                global_step, ran, signalled, spent = self._run_epoch(epoch, global_step)
            except _RolledBack as back:
                # From the restored state on, as a resumed run goes on (perhaps in an
                # earlier epoch: its data order is drawn again when it opens).
                seconds += back.seconds
                global_step = self.current_step
                epoch = self._epoch_at(global_step)
                continue
            seconds += spent
            finished = global_step - epoch * self.steps_per_epoch >= self.steps_per_epoch
            if signalled and not finished:
                self._cut_short = True
                break  # the epoch stays open: a resumed run finishes it
            last = progress.history[-1] if progress.history else {}
            if not ran and not finished and last.get("step") == global_step:
                break  # a step budget's cut, evaluated already: nothing new to report
            self._end_epoch(epoch, global_step, finished)
            if not finished:
                break
            epoch += 1
        return seconds

    def _epoch_at(self, global_step: int) -> int:
        """The epoch to run from ``global_step``: the open one, else the one it starts."""
        open_epoch = self.progress.open_epoch
        return open_epoch if open_epoch is not None else global_step // self.steps_per_epoch

    def _run_epoch(self, epoch: int, global_step: int) -> tuple[int, bool, bool, float]:
        """The executions of ``epoch`` from ``global_step`` on, until the epoch ends, the
        step budget runs out, a callback stops training or a signal arrives; returns the
        global step, whether any execution ran, whether a signal stopped it, and the
        seconds the executions took."""
        progress, per_epoch = self.progress, self.steps_per_epoch
        ran, signalled, seconds = False, False, 0.0
        while (position := global_step - epoch * per_epoch) < per_epoch:
            if self._budget_left(global_step) <= 0 or self.stop_training:
                break
            n = self._pace.steps_for(min(per_epoch - position, self._budget_left(global_step),
                                         self._to_validation(global_step)))
            n, signalled = self._agree(n)
            if signalled:
                break
            self.recompile_if_needed()
            traces = self.trace_count
            t0 = time.perf_counter()
            out, state = self._run_training(n, position)
            ran = True
            elapsed = time.perf_counter() - t0
            self._pace.observe(n, elapsed, traced=self.trace_count != traces)
            seconds += elapsed
            start, global_step = global_step, int(state.pop("global_step"))
            self._take_health(state, start)
            weight = out.pop(EXAMPLES)
            snapshot = self._check_blow_up(out, state, start, global_step, seconds)
            progress.examples += weight
            for k, v in out.items():
                progress.sums[k] = progress.sums.get(k, 0.0) + v * weight
            progress.state = state
            self._check_step_state(state)
            if snapshot:  # the state after this execution, its sums included
                self.recovery.take(self.checkpoint, global_step)
            logs = {f"train/{k}": v for k, v in {**out, **state}.items()}
            logs["time/steps_per_second"] = n / elapsed
            if self._validation_due(epoch, global_step):
                self._validate(epoch, global_step)
            self._callback("on_execution_end", global_step, logs)
        return global_step, ran, signalled, seconds

    def _take_health(self, state: dict, first_step: int) -> None:
        """Move the layers' health out of an execution's state (it is not the step's
        state, and is logged only by whoever asked for it): into ``health_logs`` when
        the execution was asked for it, at its first update's step."""
        health = {k: state.pop(k) for k in [k for k in state if k.startswith(HEALTH)]}
        measured = self.health is not None and self.health.requested and health
        self.health_logs = health if measured else {}
        self.health_step = first_step + 1 if measured else None

    def _to_validation(self, global_step: int) -> float:
        """Steps to the next step-level validation (``val_every_n_steps``): an execution
        ends there."""
        every = self.val_every_n_steps
        return every - global_step % every if every else math.inf

    def _validation_due(self, epoch: int, global_step: int) -> bool:
        """A step-level validation at ``global_step``: a multiple of ``val_every_n_steps``
        that is not where the epoch's end evaluates (its last step, the step budget)."""
        every = self.val_every_n_steps
        return bool(every) and global_step % every == 0 and self._budget_left(global_step) > 0 \
            and global_step - epoch * self.steps_per_epoch < self.steps_per_epoch

    def _validate(self, epoch: int, global_step: int) -> None:
        """A validation between epoch ends: its logs (as an epoch's, with the open epoch's
        training means so far) into ``validations`` and to ``on_validation_end``."""
        logs = self._evaluated_logs(epoch, global_step)
        self.progress.validations.append(logs)
        log.info("validation at step %d: %s", global_step, " ".join(
            f"{k}={v:.4g}" for k, v in logs.items() if k.startswith(VAL)))
        self._callback("on_validation_end", global_step, logs)

    def _evaluated_logs(self, epoch: int, global_step: int) -> dict:
        """The open epoch's logs so far (the example-weighted means of its executions, the
        step's state) with an evaluation of the weights (and of their average) now."""
        progress = self.progress
        examples = progress.examples
        logs = {f"train/{k}": v / examples if examples else 0.0
                for k, v in progress.sums.items()}
        logs.update({f"train/{k}": v for k, v in progress.state.items()})
        logs.update(self.evaluate())
        if self._averaged():
            with self.averages.swapped(self.data):
                prefix = self.averages.prefix
                logs.update({f"{prefix}/{k[4:]}": v for k, v in self.evaluate().items()})
        logs.update(epoch=epoch + 1, step=global_step)
        _check_finite(logs, epoch, loss_scaled=self.step.loss_scale is not None)
        return logs

    def _end_epoch(self, epoch: int, global_step: int, finished: bool) -> None:
        """The epoch's logs (the example-weighted means of its executions, the step's state
        at its end, the evaluation), in the history and to the callbacks."""
        progress = self.progress
        swa = self.swa
        if swa.on and finished and epoch >= swa.start_epoch and \
                (epoch + 1 - swa.start_epoch) % swa.cycle_epochs == 0:
            self.averages.add()  # the end of a cycle
        validations = progress.validations
        if validations and validations[-1]["step"] == global_step:
            # Stopped (early stopping) right after a validation: it is the epoch's.
            logs = dict(validations[-1])
        else:
            logs = self._evaluated_logs(epoch, global_step)
            self._callback("on_validation_end", global_step, logs)
        self.logs = logs
        if progress.history and progress.history[-1]["epoch"] == epoch + 1:
            progress.history[-1] = logs  # the rest of an epoch a step budget had cut
        else:
            progress.history.append(logs)
        # An epoch cut by the step budget stays open: a later fit (a larger budget, a
        # resumed run) continues its data and its sums, and replaces its history entry.
        progress.open_epoch = None if finished else epoch
        self._callback("on_epoch_end", epoch, logs)

    def _check_step_state(self, state: dict) -> None:
        """The step's host-side check; a failing run saves its last good state first
        (the callbacks' ``on_fit_end``: the checkpoint callback saves)."""
        try:
            self.step.check_state(state)
        except UserError:
            self._callback("on_fit_end", self.logs)
            raise

    # --- rollback on blow-up (trainer.recovery) ---------------------------------------------
    def _start_recovery(self, global_step: int) -> None:
        """The rate scale the run reached (restored with the progress), and the state it
        starts from as the first good snapshot."""
        recovery = self.recovery
        if not recovery.enabled:
            return
        recovery.scale_variable(self.distribution).assign(self.progress.lr_scale)
        recovery.good_step = global_step
        if recovery.every_n_steps:
            recovery.take(self.checkpoint, global_step, confirmed=True)

    def _check_blow_up(self, out: dict, state: dict, start: int, end: int,
                       seconds: float) -> bool:
        """After the execution from global step ``start`` to ``end``: roll back if it blew up
        (raises ``_RolledBack``); else whether a snapshot is due at ``end``. Reads only the
        logs the execution returned: no device read."""
        recovery = self.recovery
        if not recovery.enabled:
            return False
        reason = recovery.blow_up(out)
        if reason is None:
            try:  # the reset policy gave up (too many resets in a row): roll back instead
                self.step.check_state(state)
            except TapeResetError as e:
                reason = str(e).split(";")[0]
            except UserError:
                pass  # not a blow-up: _check_step_state saves and raises it again
        if reason is None:
            return recovery.passed(out, start, end)
        self._roll_back(reason, end)
        raise _RolledBack(seconds)

    def _roll_back(self, reason: str, global_step: int) -> None:
        """Put the training state back as it was at the last good snapshot (or checkpoint),
        scale the learning rates down and tell the callbacks; or, after ``max_attempts``
        rollbacks, save that good state and raise ``Diverged``."""
        recovery, progress = self.recovery, self.progress
        attempts, scale = progress.rollbacks, progress.lr_scale
        exhausted = attempts >= recovery.max_attempts
        source = self._restore_good_state()
        if source is None and not exhausted:
            reason += " and no good state to roll back to (no snapshot, no checkpoint)"
            exhausted = True
        back_to = self.current_step
        new_scale = scale if exhausted or source is None else scale * recovery.lr_scale
        if source is not None:
            # The restored rates are the snapshot's: scale them to the run's new scale.
            ratio = new_scale / progress.lr_scale
            for opt in self.step.optimizers.values():
                if opt.schedule is None and ratio != 1.0:
                    opt.learning_rate = float(tf.convert_to_tensor(opt.learning_rate)) * ratio
            progress.rollbacks, progress.lr_scale = attempts + (not exhausted), new_scale
            recovery.scale_variable(self.distribution).assign(new_scale)
            self.step.after_rollback()
            history = progress.history
            self.logs = dict(history[-1]) if history else {}
        if exhausted:
            saved = f"the last good state (step {back_to}) is saved" if source else "nothing saved"
            message = (f"{reason} at step {global_step} after {attempts} rollbacks "
                       f"(trainer.recovery.max_attempts={recovery.max_attempts}); {saved}: "
                       "lower optimizer.learning_rate (or raise trainer.recovery.max_attempts) "
                       "and resume")
            log.error("diverged: %s", message)
            if source is not None:
                self._callback("on_fit_end", self.logs)
            raise Diverged(message)
        line = (f"rollback {attempts + 1}/{recovery.max_attempts} at step {global_step}: "
                f"{reason}; back to step {back_to} ({source}), learning rate scale "
                f"{scale:g} -> {new_scale:g}")
        log.warning("%s", line)
        self._callback("on_rollback", global_step, line)

    def _restore_good_state(self) -> str | None:
        """Restore the newest good state: the in-memory snapshot, else the newest checkpoint
        on disk at or before the last step known good. Returns what was restored, or None."""
        recovery = self.recovery
        if recovery.snapshot is not None:
            recovery.restore(self.checkpoint)
            return "snapshot in memory"
        good = recovery.good_step if recovery.good_step is not None else -1
        found = [p for p in candidates("auto", Path(self.run_dir), self.checkpoint_dir)
                 if int(p.rsplit("-", 1)[1]) <= good]
        if not found:
            return None
        path = readable(found)
        self.training_state.restore(path)
        return f"checkpoint {path}"

    def _after_restore(self) -> None:
        """Host state that follows from a restored checkpoint."""
        self.data_plan.train.check_restored()
        saved = self.progress.steps_per_epoch
        if saved and saved != self.steps_per_epoch:
            raise UserError(
                f"checkpoint {self.restored_from} was written with {saved} steps per epoch, this "
                f"run has {self.steps_per_epoch} (another data.batch_size, data set or "
                "trainer.limit_train_batches): resume "
                "with the config it was trained with, or start fresh with trainer.resume=never")
        history = self.progress.history
        self.logs = dict(history[-1]) if history else {}
        self._stopped_when_restored = self.progress.stopped
        open_epoch = self.progress.open_epoch
        log.info("resumed from %s: global step %d, epoch %d%s", self.restored_from,
                 self.current_step, (open_epoch if open_epoch is not None else len(history)) + 1,
                 " (in progress)" if open_epoch is not None else "")

    def _run_training(self, num_steps: int, position: int):
        try:
            return self._executions.train(num_steps, position)
        except tf.errors.OpError as e:
            if self.plan.update_xla or self.plan.forward_xla:
                raise_if_xla_error(e, "the training step", self.step.regularizers)
            raise

    def evaluate(self) -> dict:
        """Loss and metrics over the whole validation set, keys prefixed ``val/``."""
        # Rewind: an in-memory source's position would otherwise carry over from the last
        # evaluation, and next() (full batches) and next_any() (the short one) wrap it
        # differently, so some examples would count twice and others not at all.
        self.data_plan.val.start_epoch(0)
        self.step.reset_metrics("val")
        out, metrics = self._executions.evaluate(self.data_plan.val_steps)
        out.pop(EXAMPLES)
        return {f"val/{k}": v for k, v in {**out, **metrics}.items()}

    def _budget_left(self, global_step: int) -> float:
        if self.max_steps is None:
            return math.inf
        return self.max_steps - global_step

    def _callback(self, hook, *args):
        # on_fit_end runs in reverse order, as teardown does: the checkpoint callback first
        # saves the last state, then others may change the models (restore best weights).
        callbacks = reversed(self.callbacks) if hook == "on_fit_end" else self.callbacks
        for cb in callbacks:
            getattr(cb, hook)(self, *args)


class _RolledBack(Exception):
    """The training state was rolled back: the epoch loop starts again from it."""

    def __init__(self, seconds: float):
        super().__init__("rolled back")
        self.seconds = seconds  # spent in the epoch's executions until then


def _check_step(step) -> None:
    """The one type check of the step ``fit`` is given, with errors that say what is
    missing (``DataPlan.read`` checks the data)."""
    if not isinstance(step, Step):
        raise UserError(f"the step {type(step).__name__} is not a trainer.Step; subclass "
                        "trainer.Step (or trainer.TapeStep) and define train_step(batch, info)")
    if type(step).train_step is Step.train_step:
        raise UserError(f"the step {type(step).__name__} does not define "
                        "train_step(batch, info)")
    for name, model in step.models.items():
        if not model.variables:
            raise UserError(f"the step's model {name!r} has no variables yet (a subclassed model "
                            "makes them on its first call): call model.build(input_shape), or "
                            "the model on a batch, before fit")


def _check_finite(logs: dict, epoch: int, *, loss_scaled: bool = False) -> None:
    # Under a loss scale (mixed float16) gradients that overflow are the scale's business: it
    # skips the update and halves itself; the sampled step's gradient norm may then be
    # infinite while training is fine.
    ignored = {"train/grad_norm"} if loss_scaled else set()
    bad = [k for k, v in logs.items()
           if isinstance(v, float) and not math.isfinite(v) and k not in ignored]
    if bad:
        raise FloatingPointError(
            f"epoch {epoch + 1}: {', '.join(bad)} became NaN or infinite; lower "
            "optimizer.learning_rate or check the data"
        )
