"""Trainer: the compiled multi-step loop, evaluation, callbacks and recompilation."""

from __future__ import annotations

import logging
import math
import time

import tensorflow as tf

from trainer.data.sources import sources_of
from trainer.errors import UserError
from trainer.freeze import variable_table
from trainer.loop import EXAMPLES, make_source_execution, raise_if_xla_error
from trainer.pacing import Pacing, check_jit_compile, check_steps_per_execution, choose_xla
from trainer.regularizers.xla import raise_if_xla_failure

log = logging.getLogger(__name__)


class Trainer:
    """Runs a step over a data module for a number of epochs.

    Each execution is one call of a compiled function that runs
    ``steps_per_execution`` steps on the graph side; callbacks run between
    executions and at epoch boundaries, and see ``(step, logs)`` with flat,
    slash-namespaced keys (``train/loss``, ``val/accuracy``).

    Args:
        epochs: passes over the training set.
        max_steps: optional budget of optimizer steps; stops mid-epoch when reached.
        steps_per_execution: steps per compiled call (an execution never crosses an
            epoch boundary or the step budget); ``"auto"`` (default) tunes it so one
            execution lasts about 0.5 s (see ``trainer.pacing.Pacing``).
        run_eagerly: run the same step code without tf.function, for debugging.
        jit_compile: compile with XLA: the whole execution when the data is in memory,
            else the step. ``"auto"`` (default) does so for in-memory runs of at least
            ``trainer.pacing.AUTO_XLA_MIN_STEPS`` steps, and falls back to no XLA (with
            a warning) if XLA cannot compile the step; ``xla`` says what was chosen.
        callbacks: objects with the ``trainer.callbacks.Callback`` hooks.
        run_dir: where callbacks put their files (TensorBoard, checkpoints).
        hparams: flat hyperparameters of the run, for the TensorBoard HParams summary.
        config_text: the resolved config as YAML, logged as text.
    """

    def __init__(
        self,
        *,
        epochs: int = 10,
        max_steps: int | None = None,
        steps_per_execution: int | str = "auto",
        run_eagerly: bool = False,
        jit_compile: bool | str = "auto",
        callbacks=(),
        run_dir: str = ".",
        hparams: dict | None = None,
        config_text: str = "",
    ):
        if epochs < 1:
            raise UserError(f"trainer.epochs={epochs} must be at least 1")
        steps_per_execution = check_steps_per_execution(steps_per_execution)
        if max_steps is not None and max_steps < 1:
            raise UserError(f"trainer.max_steps={max_steps} must be at least 1 (or null)")
        self.epochs = epochs
        self.max_steps = max_steps
        self.steps_per_execution = steps_per_execution
        self.run_eagerly = run_eagerly
        self.jit_compile = check_jit_compile(jit_compile)
        self.xla = False
        self.callbacks = list(callbacks)
        self.run_dir = str(run_dir)
        self.hparams = dict(hparams or {})
        self.config_text = config_text
        self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        self.epoch = 0
        self.stop_training = False
        self.trace_count = 0
        self.history: list[dict] = []
        self.logs: dict = {}
        self.step = None
        self.data = None
        self._variables_key = None
        self._fit_flags = None
        self._pace = None

    # --- building the compiled functions ------------------------------------------------
    def _count_trace(self):
        self.trace_count += 1

    def _state_logs(self) -> dict:
        opts = self.step.optimizers
        if len(opts) == 1:
            logs = {"learning_rate": next(iter(opts.values())).learning_rate}
        else:
            logs = {f"learning_rate/{k}": o.learning_rate for k, o in opts.items()}
        if hasattr(self.step, "state_logs"):
            logs.update(self.step.state_logs())
        return logs

    def _advance(self):
        self.global_step.assign_add(1)

    def _compile(self, evaluation: bool = False) -> None:
        """(Re)build the step's optimizer state and the compiled training functions.

        Called at the start of fit (with ``evaluation``, which also builds the eval
        function) and whenever the set of trainable variables changes, so the tape
        always watches the current variables (the stale variable list that makes
        Keras users recompile by hand).
        """
        self.step.build()
        if hasattr(self.step, "bind"):
            self.step.bind(self.global_step)
        self._variables_key = self._trainable_key()
        self.variable_table = variable_table(self.step.models.values())
        log.info("variables:\n%s", self.variable_table)
        auto = self.jit_compile == "auto"
        common = dict(run_eagerly=self.run_eagerly, jit_compile=self.xla, xla_fallback=auto,
                      on_trace=self._count_trace)
        reset = getattr(self.step, "reset", None)
        retry = reset is not None and reset.max_retries > 0
        if auto:
            common["last_jit"] = False
        self._train_fn = make_source_execution(
            self.step.train_step, self._train_source,
            state_logs=self._state_logs, after_step=self._advance,
            retry_if=(lambda: reset.last_reset) if retry else None,
            max_retries=reset.max_retries if retry else 0, **common,
        )
        if evaluation:
            self._eval_fn = make_source_execution(self.step.test_step, self._val_source, **common)
        grads = self.step.gradients_by_path
        self._grads_fn = grads if self.run_eagerly else tf.function(grads)

    def _trainable_key(self):
        return tuple(id(v) for v in self.step.trainable_variables)

    def recompile_if_needed(self) -> bool:
        """Recompile when variables were frozen or unfrozen since the last compile."""
        if self._trainable_key() == self._variables_key:
            return False
        log.info("trainable variables changed: recompiling the step")
        self._compile()
        return True

    # --- the loop ---------------------------------------------------------------------
    def fit(self, step, data) -> dict:
        """Train ``step`` on ``data``; return the final logs (last epoch's train and val).

        Calling ``fit`` again with the same step and data (after raising ``epochs``)
        continues with the functions already compiled, as Keras does.
        """
        flags = (self.run_eagerly, self.jit_compile)
        if step is not self.step or data is not self.data or flags != self._fit_flags:
            self.step, self.data = step, data
            self._train_source, self._val_source = sources_of(data)
            self._probe_batch = next(iter(data.train_dataset().take(1)))
            self.steps_per_epoch = data.steps_per_epoch("train")
            self._val_steps = data.steps_per_epoch("val")
            planned = self.epochs * self.steps_per_epoch - self.current_step
            if self.max_steps is not None:
                planned = min(planned, self._budget_left())
            self.xla = choose_xla(self.jit_compile, fused=self._train_source.xla_loop,
                                  run_eagerly=self.run_eagerly, planned_steps=planned)
            self._compile(evaluation=True)
            self._fit_flags = flags
        if self._pace is None or self._pace.setting != self.steps_per_execution:
            self._pace = Pacing(self.steps_per_execution)
        self.stop_training = False
        self._callback("on_fit_start")
        start = time.perf_counter()
        train_seconds = 0.0
        first_epoch = int(self.global_step.numpy()) // self.steps_per_epoch
        for epoch in range(first_epoch, self.epochs):
            self.epoch = epoch
            if self._budget_left() <= 0 or self.stop_training:
                break
            self._train_source.start_epoch(epoch)
            self._callback("on_epoch_start", epoch)
            sums, examples, done = {}, 0.0, 0
            # The global step mirrored on the host: no variable read (a sync) per execution.
            now = self.current_step
            while done < self.steps_per_epoch and self._budget_left(now) > 0:
                self.recompile_if_needed()
                n = min(self._pace.steps, self.steps_per_epoch - done, self._budget_left(now))
                traces = self.trace_count
                t0 = time.perf_counter()
                try:
                    out, state = self._train_fn(n)
                except tf.errors.OpError as e:
                    if self.jit_compile:
                        raise_if_xla_failure(e, self.step)
                        raise_if_xla_error(e, "the training step")
                    raise
                elapsed = time.perf_counter() - t0
                self._pace.observe(n, elapsed, traced=self.trace_count != traces)
                train_seconds += elapsed
                done += n
                now += n
                weight = out.pop(EXAMPLES)
                examples += weight
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + v * weight
                if hasattr(self.step, "check_state"):
                    self.step.check_state(state)
                logs = {f"train/{k}": v for k, v in {**out, **state}.items()}
                logs["time/steps_per_second"] = n / elapsed
                self._callback("on_execution_end", now, logs)
                if self.stop_training:
                    break
            logs = {f"train/{k}": v / examples if examples else 0.0 for k, v in sums.items()}
            logs.update({f"train/{k}": v for k, v in state.items()})
            logs.update(self.evaluate())
            logs.update(epoch=epoch + 1, step=self.current_step)
            _check_finite(logs, epoch)
            self.logs = logs
            self.history.append(logs)
            self._callback("on_epoch_end", epoch, logs)
        self.logs = {**self.logs, "time/train_seconds": train_seconds,
                     "time/fit_seconds": time.perf_counter() - start}
        self._callback("on_fit_end", self.logs)
        return self.logs

    def evaluate(self) -> dict:
        """Loss and metrics over the whole validation set, keys prefixed ``val/``."""
        # Rewind: an in-memory source's position would otherwise carry over from the last
        # evaluation, and next() (full batches) and next_any() (the short one) wrap it
        # differently, so some examples would count twice and others not at all.
        self._val_source.start_epoch(0)
        out, _ = self._eval_fn(self._val_steps)
        out.pop(EXAMPLES)
        return {f"val/{k}": v for k, v in out.items()}

    def gradients_by_path(self) -> dict:
        """Gradients on a fixed training batch, keyed by variable path (for histograms).

        A fixed probe batch keeps the data order, and so the run, independent of
        how often gradients are inspected.
        """
        return {k: v.numpy() for k, v in self._grads_fn(self._probe_batch).items()}

    @property
    def current_step(self) -> int:
        return int(self.global_step.numpy())

    def _budget_left(self, now: int | None = None) -> float:
        if self.max_steps is None:
            return math.inf
        return self.max_steps - (self.current_step if now is None else now)

    def _callback(self, hook, *args):
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)


def _check_finite(logs: dict, epoch: int) -> None:
    bad = [k for k, v in logs.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise FloatingPointError(
            f"epoch {epoch + 1}: {', '.join(bad)} became NaN or infinite; lower "
            "optimizer.learning_rate or check the data"
        )
