"""Preemption: SIGTERM and SIGINT ask the trainer to stop at the next execution boundary."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

log = logging.getLogger(__name__)

#: The exit status of a preempted run: sysexits.h's EX_TEMPFAIL ("a temporary failure;
#: the user is invited to retry"), so a scheduler or a wrapper script can requeue it.
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """A run stopped by a signal after saving; ``python -m trainer`` exits ``EXIT_PREEMPTED``.

    ``global_step`` None: stopped during start-up, before training began.
    """

    def __init__(self, *, signal: str, global_step: int | None, run_dir, saved: bool = True):
        self.signal, self.global_step, self.run_dir = signal, global_step, run_dir
        if global_step is None:
            super().__init__(f"stopped by {signal} during start-up, before training began; "
                             f"{run_dir} is as it was: run the same command again to start "
                             "(or resume)")
            return
        if saved:
            what = (f"after saving a checkpoint; resume with the same command and "
                    f"hydra.run.dir={run_dir} (trainer.resume=auto continues from it)")
        else:
            what = "without a checkpoint (no checkpoint callback): it cannot be resumed"
        super().__init__(f"stopped by {signal} at step {global_step} {what}")


class Preemption:
    """Catches SIGTERM and SIGINT while training (``with preemption.watch():``).

    The first signal is recorded (``signum``) and the training loop stops at the
    next execution boundary, saves and writes its outputs. SIGINT goes back to its
    default action at once, so a second Ctrl-C stops the process immediately (a
    checkpoint being written is not corrupted: TensorFlow renames it into place
    only when complete). Outside the main thread (where Python cannot install
    handlers) nothing is caught.
    """

    def __init__(self, *, quiet: bool = False):
        self.signum: int | None = None
        self.quiet = quiet  # no log line: start-up's stop says it all in its one line

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            if not self.quiet:
                log.warning("%s received: stopping at the next execution boundary to save a "
                            "checkpoint (press Ctrl-C again to stop at once)",
                            signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    @contextlib.contextmanager
    def watch(self):
        """Install the handlers for the duration of the block, then put back the old ones."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        # A signal that arrived during start-up, before this watch began, stops the loop
        # at its first boundary.
        self.signum = self.signum or _STARTUP.signum
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


#: The process's signals from its start until the trainer watches (``catch_from_start``).
_STARTUP = Preemption(quiet=True)


def catch_from_start() -> None:
    """Record SIGTERM and SIGINT from now on instead of dying (143) or raising
    ``KeyboardInterrupt`` in the middle of imports.

    ``python -m trainer`` calls it first thing: the driver checks ``raise_if_signalled``
    between the stages of start-up and stops with one line and ``EXIT_PREEMPTED``, and a
    signal that arrives later still, before training, stops the loop at its first
    boundary. A second SIGINT stops the process at once, as while training.
    """
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _STARTUP._handle)


def raise_if_signalled(run_dir) -> None:
    """``Preempted`` (before training began) if a signal arrived during start-up."""
    if _STARTUP.requested:
        raise Preempted(signal=_STARTUP.name, global_step=None, run_dir=run_dir)
