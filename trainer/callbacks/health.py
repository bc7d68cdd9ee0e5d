"""Per-layer training health in TensorBoard, and alerts when a layer goes wrong."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import tensorflow as tf

from trainer.callbacks.base import Callback, resolve
from trainer.callbacks.tensorboard import _scalar_writer
from trainer.common.errors import UserError
from trainer.step.layer_health import DEAD, PREFIX, STATS
from trainer.training.periodic import Periodic

log = logging.getLogger(__name__)

#: The TensorBoard text tag of the alerts.
ALERTS = "health/alerts"


@dataclass(frozen=True)
class Thresholds:
    """When a layer's health raises an alert (see ``HealthCallback``)."""

    vanishing_grad_norm: float = 1e-7
    exploding_grad_norm: float = 1e3
    dead_fraction: float = 1.0
    update_ratio_decades: float = 2.0
    update_ratio_history: int = 5

    def check(self) -> None:
        bad = [name for name, value in (("vanishing_grad_norm", self.vanishing_grad_norm),
                                        ("exploding_grad_norm", self.exploding_grad_norm),
                                        ("update_ratio_decades", self.update_ratio_decades))
               if not value > 0]
        if bad:
            raise UserError(f"callbacks.health.{bad[0]} must be > 0")
        if not self.vanishing_grad_norm < self.exploding_grad_norm:
            raise UserError("callbacks.health.vanishing_grad_norm must be below "
                            "exploding_grad_norm")
        if not 0 < self.dead_fraction <= 1:
            raise UserError(f"callbacks.health.dead_fraction={self.dead_fraction} must be in "
                            "(0, 1] (1: alert when every unit of a layer is dead)")
        if self.update_ratio_history < 1:
            raise UserError("callbacks.health.update_ratio_history must be at least 1 "
                            "(measurements of a layer before its update ratio is compared)")


class Alerts:
    """Host-side checks of the layers' health: each condition of each layer is reported
    once (a log line naming the layer and the step); ``check`` returns the new ones.

    The update ratio is compared, in decades (log10), with a running mean of the layer's
    earlier ratios (an exponential average with weight 0.1 for the new value, once
    ``update_ratio_history`` of them were seen): a slowly decaying learning rate moves
    the mean along, a sudden jump or collapse does not.
    """

    def __init__(self, thresholds: Thresholds):
        self.t = thresholds
        self.raised: set[tuple[str, str]] = set()
        self._ratio: dict[str, tuple[float, int]] = {}  # layer -> (mean log10, count)

    def check(self, logs: dict, step: int) -> list[str]:
        layers = _by_layer(logs)
        found = []
        for layer, stats in layers.items():
            for condition, message in self._conditions(layer, stats):
                if (layer, condition) not in self.raised:
                    self.raised.add((layer, condition))
                    found.append(f"step {step}: layer {layer}: {message}")
        return found

    def _conditions(self, layer: str, stats: dict):
        t = self.t
        grad = stats.get("grad_norm")
        if stats.get("nonfinite_fraction", 0.0) > 0:
            yield "nonfinite", (f"{stats['nonfinite_fraction']:.3g} of its gradient entries "
                                "are not finite")
        if grad is not None and grad > t.exploding_grad_norm:
            yield "exploding", (f"exploding gradient: norm {grad:.3g} > exploding_grad_norm "
                                f"{t.exploding_grad_norm:g}")
        if grad is not None and grad < t.vanishing_grad_norm:
            yield "vanishing", (f"vanishing gradient: norm {grad:.3g} < vanishing_grad_norm "
                                f"{t.vanishing_grad_norm:g}")
        dead = stats.get(DEAD)
        if dead is not None and dead >= t.dead_fraction:
            yield "dead", f"{dead:.0%} of its units are dead (zero for every probe example)"
        ratio = stats.get("update_ratio")
        if ratio is not None and ratio > 0 and math.isfinite(ratio):
            now = math.log10(ratio)
            mean, count = self._ratio.get(layer, (now, 0))
            if count >= t.update_ratio_history and abs(now - mean) > t.update_ratio_decades:
                yield "update_ratio", (f"update/weight ratio {ratio:.3g} is "
                                       f"{abs(now - mean):.1f} decades from its usual "
                                       f"{10 ** mean:.3g}")
            self._ratio[layer] = (now if count == 0 else 0.9 * mean + 0.1 * now, count + 1)


def _by_layer(logs: dict) -> dict:
    layers: dict[str, dict] = {}
    for k, v in logs.items():
        layer, _, stat = k[len(PREFIX):].rpartition("/")
        layers.setdefault(layer, {})[stat] = v
    return layers


class HealthCallback(Callback):
    """Per-layer health every ``every_n_steps`` steps, as TensorBoard scalars
    ``health/<layer>/<stat>`` (``grad_norm``, ``weight_norm``, ``update_ratio``,
    ``nonfinite_fraction``, and ``dead_fraction`` for ReLU-like layers), a
    custom-scalars layout that groups them per layer, and alerts.

    The health is computed inside the compiled step (``trainer.step.layer_health``), on
    the sampled (first) step of the executions this callback asks for: the first at or
    past each multiple of ``every_n_steps`` (but at most one per
    ``min_interval_seconds``) and the first of the fit. The values are
    written at the step of the update they describe. Alerts (a warning in the log and a
    ``health/alerts`` text entry), once per layer and condition: a gradient norm below
    ``vanishing_grad_norm`` or above ``exploding_grad_norm``, non-finite gradient
    entries, a dead fraction at or above ``dead_fraction``, an update ratio more than
    ``update_ratio_decades`` decades from the layer's running mean (after
    ``update_ratio_history`` measurements).

    Args:
        every_n_steps: interval in steps (> 0).
        min_interval_seconds: hold a due measurement back this soon after the last one
            (it is taken at the first boundary after that): writing the scalars costs
            the host 2-3 ms, and a fast loop passes 100 steps in a few milliseconds.
        log_dir: the TensorBoard directory (``<log_dir>/train`` is written), relative to
            the run directory unless absolute: the tensorboard callback's.
        vanishing_grad_norm, exploding_grad_norm, dead_fraction, update_ratio_decades,
            update_ratio_history: the alerts' thresholds (``Thresholds``).
    """

    uses_health = True
    #: The executions that compute health are chosen on every worker alike (by step);
    #: only the chief writes.
    chief_only = False
    #: After the tensorboard callback, whose restart marker must precede this file.
    order = -5

    def __init__(self, *, every_n_steps: int = 100, min_interval_seconds: float = 1.0,
                 log_dir: str = "tb",
                 vanishing_grad_norm: float = 1e-7, exploding_grad_norm: float = 1e3,
                 dead_fraction: float = 1.0, update_ratio_decades: float = 2.0,
                 update_ratio_history: int = 5):
        if every_n_steps < 1:
            raise UserError(f"callbacks.health.every_n_steps={every_n_steps} must be at least "
                            "1; remove the callback with ~callbacks.health to turn it off")
        if min_interval_seconds < 0:
            raise UserError(f"callbacks.health.min_interval_seconds={min_interval_seconds} "
                            "must be >= 0 (0: exactly every every_n_steps)")
        self.every_n_steps = int(every_n_steps)
        self.log_dir = log_dir
        self.thresholds = Thresholds(
            vanishing_grad_norm=float(vanishing_grad_norm),
            exploding_grad_norm=float(exploding_grad_norm), dead_fraction=float(dead_fraction),
            update_ratio_decades=float(update_ratio_decades),
            update_ratio_history=int(update_ratio_history))
        self.thresholds.check()
        self.alerts = Alerts(self.thresholds)
        #: Every alert raised so far, as logged.
        self.raised: list[str] = []
        self._when = Periodic(every_n_steps=self.every_n_steps,
                              min_seconds=float(min_interval_seconds), at_start=True)
        self._writer = None
        self._writers = {}
        self._layout_written = False

    def on_fit_start(self, trainer):
        health = trainer.health
        if health is None:
            log.info("health: the step %s reports no per-layer health (the default TapeStep "
                     "does); callbacks.health does nothing", type(trainer.step).__name__)
            return
        if trainer.is_chief and self._writer is None:
            self._writer = tf.summary.create_file_writer(
                str(resolve(trainer, self.log_dir) / "train"))
        if self._writer is not None and not self._layout_written:
            self._write_layout(health.layers(), trainer.current_step)
            self._layout_written = True
        global_step = trainer.current_step
        self._when.reset(global_step)
        health.request(self._when.due(global_step, start=True))

    def on_execution_end(self, trainer, global_step, logs):
        health = trainer.health
        if health is None:
            return
        if trainer.health_logs:
            self._record(trainer.health_logs, trainer.health_step,
                         loss_scaled=trainer.step.loss_scale is not None)
        health.request(self._when.due(global_step))

    def on_fit_end(self, trainer, logs):
        if trainer.health is not None:
            trainer.health.request(False)
        if self._writer is not None:
            self._writer.flush()

    def _record(self, values: dict, step: int, *, loss_scaled: bool = False) -> None:
        # Under a loss scale (mixed float16) an update with non-finite gradients is skipped
        # and the scale halves (counted in train/precision/overflows): routine, no alert.
        skipped = loss_scaled and any(v > 0 for k, v in values.items()
                                      if k.endswith("/nonfinite_fraction"))
        new = [] if skipped else self.alerts.check(values, step)
        for line in new:
            log.warning("health alert: %s", line)
        self.raised += new
        if self._writer is None:
            return
        keys = tuple(sorted(values))
        write = self._writers.get(keys)
        if write is None:  # compiled once per set of layers: a scalar costs 0.3 ms eagerly
            write = self._writers[keys] = _scalar_writer(self._writer, list(keys))
        write(tf.constant(step, tf.int64), tf.constant([values[k] for k in keys], tf.float32))
        if new:
            with self._writer.as_default(step=step):
                tf.summary.text(ALERTS, "\n\n".join(new))

    def _write_layout(self, layers: list[str], step: int) -> None:
        with self._writer.as_default(step=step):
            tf.summary.experimental.write_raw_pb(layout_summary(layers).SerializeToString(),
                                                 step=step)


def layout_summary(layers: list[str]):
    """The custom-scalars layout: one category comparing every layer per statistic,
    then one category per layer with its statistics."""
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.custom_scalar import summary as custom_scalar

    stats = [*STATS, DEAD]

    def chart(title, regex):
        return layout_pb2.Chart(title=title,
                                multiline=layout_pb2.MultilineChartContent(tag=[regex]))

    overview = layout_pb2.Category(
        title="health: all layers",
        chart=[chart(s, rf"^{re.escape(PREFIX)}.*/{s}$") for s in stats])
    per_layer = [layout_pb2.Category(
        title=f"health: {layer}", closed=True,
        chart=[chart(s, rf"^{re.escape(PREFIX + layer)}/{s}$") for s in stats])
        for layer in layers]
    return custom_scalar.pb(layout_pb2.Layout(category=[overview, *per_layer]))
