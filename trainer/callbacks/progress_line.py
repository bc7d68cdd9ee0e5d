"""The progress line's parts: the training rate over a recent window, durations, and the
line itself (steps, bar, steps/s, ETA, loss), fitted to a terminal's width.

Plain functions and one small class, with no clock or stream of their own: the progress
callback (``trainer.callbacks.progress``) reads the clock and writes the line.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass

#: The narrowest bar drawn (inside its brackets); a narrower terminal drops the bar.
MIN_BAR = 10
#: The widest bar drawn, however wide the terminal.
MAX_BAR = 30


class Rate:
    """Steps per second over the last ``window`` seconds of ``(time, step)`` samples.

    A window, not the mean since the start: the rate follows a run that speeds up or slows
    down (another process on the machine, a recompile), and the ETA with it.
    """

    def __init__(self, *, window: float = 10.0):
        self.window = window
        self.samples: deque = deque()

    def reset(self, t: float, step: int) -> None:
        """Start counting from ``step`` at ``t`` (an epoch's start, a resumed step)."""
        self.samples.clear()
        self.samples.append((t, step))

    def add(self, t: float, step: int) -> None:
        self.samples.append((t, step))
        # Keep one sample at least ``window`` old: the rate spans the whole window.
        while len(self.samples) > 2 and t - self.samples[1][0] >= self.window:
            self.samples.popleft()

    def per_second(self) -> float | None:
        """The rate, or None before two samples (or when no time passed)."""
        if len(self.samples) < 2:
            return None
        (t0, s0), (t1, s1) = self.samples[0], self.samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else None


def duration(seconds: float) -> str:
    """``0:07``, ``12:03``, ``1:02:03``: minutes and seconds, hours when there are any;
    rounded half up (``round`` would show 2.5 s as 0:02 and 3.5 s as 0:04)."""
    s = max(0, int(seconds + 0.5))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def rate_text(per_second: float | None) -> str:
    """``3,412 steps/s``, ``12.3 steps/s``; below one step a second, ``4.2 s/step``; empty
    while it is not known."""
    if per_second is None or per_second <= 0:
        return ""
    if per_second >= 100:
        return f"{per_second:,.0f} steps/s"
    if per_second >= 1:
        return f"{per_second:.1f} steps/s"
    return f"{1 / per_second:.1f} s/step"


def value_text(value: float) -> str:
    return f"{value:.4g}"


@dataclass(frozen=True)
class Snapshot:
    """What one progress line shows.

    ``total`` None (a stream of unknown length) shows the steps done and the rate, with no
    bar and no ETA; ``run_eta`` None leaves the run's ETA out (the last epoch, or unknown).
    """

    label: str
    done: int
    total: int | None
    rate: float | None
    run_eta: float | None = None
    values: tuple = ()  # ((name, value), ...), the loss first

    @property
    def eta(self) -> float | None:
        if self.total is None or not self.rate:
            return None
        return max(0, self.total - self.done) / self.rate


def bar(done: int, total: int, width: int) -> str:
    """``[=======>......]`` with ``width`` characters inside the brackets."""
    filled = min(width, int(width * done / total)) if total else width
    if filled >= width:
        return "[" + "=" * width + "]"
    return "[" + "=" * filled + ">" + "." * (width - filled - 1) + "]"


def _count(s: Snapshot) -> str:
    if s.total is None:
        return f"{s.done} steps"
    return f"{s.done:>{len(str(s.total))}}/{s.total}"


def _eta(s: Snapshot, run: bool) -> str:
    if s.eta is None:
        return ""
    text = f"ETA {duration(s.eta)}"
    return text + (f" (run {duration(s.run_eta)})" if run and s.run_eta is not None else "")


def line(s: Snapshot, width: int | None = None, *, graphic: bool = True) -> str:
    """The progress line, at most ``width - 1`` characters (the last column stays free: a
    line that fills it wraps on some terminals, and ``\\r`` then redraws only its second
    half). Narrow terminals lose, in turn: bar length, the run's ETA, the bar, the rate,
    then the line's end. ``width`` None: no limit (a log line); ``graphic`` False: no bar."""
    values = " ".join(f"{k} {value_text(v)}" for k, v in s.values)

    def compose(bar_width: int, run: bool, rate: bool) -> str:
        parts = [s.label, _count(s)]
        if bar_width and s.total:
            parts.append(bar(s.done, s.total, bar_width))
        parts += [rate_text(s.rate) if rate else "", _eta(s, run), values]
        return "  ".join(p for p in parts if p)

    if width is None:
        return compose(MAX_BAR if graphic else 0, True, True)
    limit, candidates = max(1, width - 1), []
    for run in (True, False):
        # A bar is "  [" + its width + "]" beside the rest: as wide as the room left.
        room = min(MAX_BAR, limit - len(compose(0, run, True)) - 4)
        if graphic and room >= MIN_BAR:
            candidates.append(compose(room, run, True))
    candidates += [compose(0, False, True), compose(0, False, False)]
    return next((c for c in candidates if len(c) <= limit), candidates[-1][:limit])


def terminal_width(stream) -> int:
    """The width of the terminal ``stream`` writes to: ``COLUMNS`` if set (as
    ``shutil.get_terminal_size`` reads it), else the terminal's, else 80."""
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, OSError, ValueError):
        return 80
