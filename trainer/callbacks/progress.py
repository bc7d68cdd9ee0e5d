"""Progress: a live line on a terminal (steps, steps/s, ETA, loss), log lines otherwise."""

from __future__ import annotations

import logging
import math
import sys
import time

from trainer.callbacks.base import VAL, Callback
from trainer.callbacks.progress_line import (
    MAX_BAR,
    Rate,
    Snapshot,
    bar,
    line,
    rate_text,
    terminal_width,
)
from trainer.common.errors import UserError
from trainer.training.periodic import Periodic

log = logging.getLogger("trainer")

MODES = ("auto", "bar", "log")


def _fmt(logs: dict) -> str:
    keys = [k for k in logs if k.startswith(("train/", *VAL))]
    return " ".join(f"{k}={logs[k]:.4g}" for k in keys)


def _losses(logs: dict) -> tuple:
    """The loss to show: ``train/loss``, else the step's ``train/*loss*`` logs (a GAN's
    two), at most two."""
    if "train/loss" in logs:
        return (("loss", logs["train/loss"]),)
    return tuple((k[6:], v) for k, v in logs.items()
                 if k.startswith("train/") and "loss" in k)[:2]


class _ClearLine(logging.Filter):
    """On a handler that writes to a terminal: a log record first clears the open progress
    line, so the record starts a line of its own (the line is drawn again after it)."""

    def __init__(self, progress: ProgressCallback):
        super().__init__()
        self.progress = progress

    def filter(self, record) -> bool:
        self.progress.clear()
        return True


class ProgressCallback(Callback):
    """Shows training progress inside each epoch.

    On a terminal, one line redrawn in place (``\\r``) after executions: the steps done of
    the epoch's, a bar, the training rate in steps/s (over the last 10 s of executions,
    host work between them included), the epoch's ETA and the run's, and the last
    execution's ``train/loss``; at the epoch's end it becomes a permanent line with the
    epoch's time, mean rate, and its train and validation logs. Without a terminal, one log
    line per epoch, and one every ``log_every_seconds`` inside a long epoch. Only the chief
    of a multi-worker run shows progress.

    The line is updated between compiled executions (never inside one), at most once per
    ``min_interval_seconds``: a loop of many tiny executions pays a clock read per
    execution, and a terminal write only ten times a second.

    Args:
        mode: ``"auto"`` (the line when the output is a terminal, log lines otherwise),
            ``"bar"`` or ``"log"``.
        min_interval_seconds: the least time between two redraws of the line.
        log_every_seconds: without a terminal, a progress log line this often inside an
            epoch (0: only at the epoch's end).
        stream: where the line goes (default ``sys.stdout``); Python only, for tests and
            benchmarks.
        clock: seconds, monotonic (default ``time.monotonic``); Python only, for tests.
    """

    def __init__(self, *, mode: str = "auto", min_interval_seconds: float = 0.1,
                 log_every_seconds: float = 60.0, stream=None, clock=None):
        if mode not in MODES:
            raise UserError(f"callbacks.progress.mode={mode!r} must be one of "
                            f"{', '.join(MODES)}")
        for key, value in (("min_interval_seconds", min_interval_seconds),
                           ("log_every_seconds", log_every_seconds)):
            if not value >= 0:
                raise UserError(f"callbacks.progress.{key}={value} must be a number of "
                                "seconds >= 0")
        self.mode = mode
        self.min_interval_seconds = float(min_interval_seconds)
        self.log_every_seconds = float(log_every_seconds)
        self.stream, self.clock = stream, clock or time.monotonic
        self.active = self.bar = False
        self.rate = Rate()
        self._open = 0  # the characters of the line on screen, 0: none open
        self._values: tuple = ()
        self._now = self._last_draw = 0.0
        # The log lines are a time trigger. The redraws are a throttle of their own: the line
        # is drawn again at a step it was drawn at (an epoch's start, after a log record),
        # which a Periodic never does.
        self._log_when = Periodic(every_seconds=self.log_every_seconds, clock=lambda: self._now)
        self._filters: list = []

    @property
    def _out(self):
        return self.stream if self.stream is not None else sys.stdout

    def _use_bar(self) -> bool:
        if self.mode != "auto":
            return self.mode == "bar"
        isatty = getattr(self._out, "isatty", None)
        return bool(isatty and isatty())

    # --- hooks -------------------------------------------------------------------------
    def on_fit_start(self, trainer):
        self.active = trainer.is_chief
        self.bar = self.active and self._use_bar()
        self._eval_seconds: list[float] = []
        self._first = True  # the fit's first execution traces: its time is not the rate's
        if self.bar:
            self._filters = [(h, _ClearLine(self)) for h in logging.getLogger().handlers
                             if self._shares_terminal(h)]
            for handler, f in self._filters:
                handler.addFilter(f)

    def on_epoch_start(self, trainer, epoch):
        if not self.active:
            return
        self._now = now = self.clock()
        step = trainer.current_step
        self._epoch_start, self._last_execution, self._values = (now, step), None, ()
        self.rate.reset(now, step)
        self._last_draw = now
        self._log_when.reset(step)
        if self.bar:
            self._draw(self._snapshot(trainer, epoch, step))

    def on_execution_end(self, trainer, global_step, logs):
        if not self.active:
            return
        self._now = now = self.clock()
        if self._first:
            self._first = False
            self.rate.reset(now, global_step)
        else:
            self.rate.add(now, global_step)
        self._last_execution = (now, global_step)
        self._values = _losses(logs)
        if self.bar:
            if now - self._last_draw >= self.min_interval_seconds:
                self._last_draw = now
                self._draw(self._snapshot(trainer, trainer.epoch, global_step))
        elif self._log_when.due(global_step):
            log.info(line(self._snapshot(trainer, trainer.epoch, global_step), None,
                          graphic=False))

    def on_epoch_end(self, trainer, epoch, logs):
        if not self.active:
            return
        now = self.clock()
        t0, s0 = self._epoch_start
        t1, s1 = self._last_execution or (now, s0)
        self._eval_seconds.append(now - t1)  # evaluation and the epoch's end
        seconds = t1 - t0
        timing = ""  # the epoch's training time and mean rate, when this fit ran steps of it
        if s1 > s0:
            timing = f"{seconds:.1f} s" + (f", {rate_text((s1 - s0) / seconds)}"
                                           if seconds > 0 else "")
        if self.bar:
            done, total = logs["step"] - epoch * trainer.steps_per_epoch, trainer.steps_per_epoch
            parts = [self._label(trainer, epoch), f"{done}/{total}", bar(done, total, MAX_BAR),
                     timing, _fmt(logs)]
            text = "  ".join(p for p in parts if p)
            self._write("\r" + text.ljust(self._open) + "\n")
            self._open = 0
        else:
            log.info("epoch %d/%d step %d %s%s", epoch + 1, trainer.epochs, logs["step"],
                     _fmt(logs), f" ({timing})" if timing else "")

    def on_fit_end(self, trainer, logs):
        if self._open:  # stopped inside an epoch (a signal, a step budget): end the line
            self._write("\n")
            self._open = 0
        for handler, f in self._filters:
            handler.removeFilter(f)
        self._filters = []

    # --- the line ----------------------------------------------------------------------
    def _label(self, trainer, epoch: int) -> str:
        return f"Epoch {epoch + 1}/{trainer.epochs}"

    def _snapshot(self, trainer, epoch: int, step: int) -> Snapshot:
        per_epoch = trainer.steps_per_epoch
        rate = self.rate.per_second()
        return Snapshot(label=self._label(trainer, epoch), done=step - epoch * per_epoch,
                        total=per_epoch, rate=rate, values=self._values,
                        run_eta=self._run_eta(trainer, epoch, step, rate))

    def _run_eta(self, trainer, epoch: int, step: int, rate: float | None) -> float | None:
        """Seconds to the end of the run: its steps left at the current rate, and the epoch
        ends left at the mean time the ones so far took; None when this epoch is the last
        (its own ETA says it all) or the rate is not known yet."""
        per_epoch = trainer.steps_per_epoch
        last = min(trainer.epochs * per_epoch, trainer.max_steps or math.inf)
        epoch_ends = math.ceil(last / per_epoch) - epoch
        if not rate or epoch_ends <= 1:
            return None
        ends = self._eval_seconds
        return (last - step) / rate + (epoch_ends * sum(ends) / len(ends) if ends else 0.0)

    def _draw(self, snapshot: Snapshot) -> None:
        text = line(snapshot, terminal_width(self._out))
        # Spaces over what is left of a longer line before (no terminal codes needed).
        self._write("\r" + text.ljust(self._open))
        self._open = len(text)

    def clear(self) -> None:
        """Wipe the open line (a log record is about to be written); the next update draws
        it again."""
        if self._open:
            self._write("\r" + " " * self._open + "\r")
            self._open = 0
            self._last_draw = -math.inf

    def _write(self, text: str) -> None:
        out = self._out
        out.write(text)
        out.flush()

    def _shares_terminal(self, handler) -> bool:
        """Whether a log handler writes where the line is, or to a terminal."""
        stream = getattr(handler, "stream", None)
        if stream is None:
            return False
        if stream is self._out:
            return True
        isatty = getattr(stream, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed stream
            return False
