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
    """A run stopped by a signal after saving; ``python -m trainer`` exits ``EXIT_PREEMPTED``."""

    def __init__(self, *, signal: str, global_step: int, run_dir, saved: bool = True):
        self.signal, self.global_step, self.run_dir = signal, global_step, run_dir
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

    def __init__(self):
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
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
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
