"""What the progress line costs per execution, whatever the machine's load:
``python -m benchmarks.progress``.

Calls the progress callback's execution hook directly, on a stand-in trainer, ``--calls``
times per round: with redraws held back (what most executions of a fast loop do: read the
clock, keep the rate's sample, pick the loss), and redrawing at every call on a
pseudo-terminal that a thread reads, as a terminal would. The best of ``--rounds`` rounds
is kept (other processes only ever slow a round down). Prints microseconds per call, and
what the default ``min_interval_seconds`` (at most ten redraws a second) makes of them at
a given number of executions a second. Group D of ``benchmarks.bench`` times the same
callback inside real training (``progress_on_a_pty``).
"""

from __future__ import annotations

import argparse
import os
import time
from types import SimpleNamespace


def progress_on_a_pty(**kwargs):
    """The progress callback drawing its live line on a pseudo-terminal, whose other end a
    thread reads as a terminal would (unread, its buffer would fill and block the writer)."""
    import pty
    import threading

    from trainer import ProgressCallback

    master, follower = pty.openpty()

    def read():
        try:
            while os.read(master, 65536):
                pass
        except OSError:
            pass

    threading.Thread(target=read, daemon=True).start()
    assert os.isatty(follower)  # so mode auto draws the line
    return ProgressCallback(stream=open(follower, "w"), **kwargs)


def per_call(callback, *, calls: int, rounds: int) -> float:
    """Seconds per ``on_execution_end`` call, the best round's."""
    trainer = SimpleNamespace(is_chief=True, current_step=0, epoch=0, epochs=10,
                              steps_per_epoch=10**9, max_steps=None)
    logs = {"train/loss": 0.4321, "train/accuracy": 0.9, "train/grad_norm": 1.3,
            "train/learning_rate": 1e-3, "time/steps_per_second": 5000.0}
    callback.on_fit_start(trainer)
    callback.on_epoch_start(trainer, 0)
    best, step = float("inf"), 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            step += 1
            callback.on_execution_end(trainer, step, logs)
        best = min(best, (time.perf_counter() - t0) / calls)
    callback.on_fit_end(trainer, {})
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.progress", description=__doc__)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--executions-per-second", type=float, default=2000.0,
                        help="the loop to price the defaults at (2,000: about the tiny A "
                        "model's steps/s at steps_per_execution=1 in group A)")
    args = parser.parse_args(argv)
    held = per_call(progress_on_a_pty(min_interval_seconds=1e9), calls=args.calls,
                    rounds=args.rounds)
    drawn = per_call(progress_on_a_pty(min_interval_seconds=0), calls=args.calls // 10,
                     rounds=args.rounds)
    rate = args.executions_per_second
    share = rate * held + min(rate, 10.0) * drawn  # of each second of training
    out = {"held_us": 1e6 * held, "redraw_us": 1e6 * drawn, "executions_per_second": rate,
           "share_at_defaults": share}
    print(f"per execution, no redraw: {out['held_us']:.2f} us; a redraw on a terminal: "
          f"{out['redraw_us']:.1f} us")
    print(f"at {rate:,.0f} executions/s and at most 10 redraws/s: {100 * share:.2f}% of the "
          "training time")
    return out


if __name__ == "__main__":
    main()
