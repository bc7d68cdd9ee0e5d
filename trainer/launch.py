"""``python -m trainer.launch``: the local worker processes of one multi-worker run.

Starts N ``python -m trainer distribute=multi_worker`` processes on 127.0.0.1, each with
its own ``TF_CONFIG``, prefixes their output lines with ``[worker i]``, forwards SIGINT and
SIGTERM to them, and decides the run's exit status: 0 when all finished, 75 when all were
preempted (saved; the same command resumes), non-zero when one failed (the others, which
would wait forever in a collective op, are stopped). Every wait is bounded.

Parses its arguments and runs ``trainer.driver.launcher.Launcher``; standard library only,
and no TensorFlow: the launcher starts at once.
"""

from __future__ import annotations

import argparse
import sys

from trainer.driver.launcher import (
    EXIT_TIMEOUT,
    Launcher,
    OneLineParser,
    positive_float,
    positive_int,
    split_argv,
    split_override,
)
from trainer.training.preemption import EXIT_PREEMPTED

DESCRIPTION = """\
Run one multi-worker training job as N local processes: each is
`python -m trainer distribute=multi_worker hydra.run.dir=DIR OVERRIDES` with its own
TF_CONFIG (a cluster of free ports on 127.0.0.1). Worker 0 is the chief: it writes
TensorBoard, checkpoints, metrics.json and model.keras into the shared run dir.

  python -m trainer.launch --workers 2 -- +experiment=dense trainer.epochs=3
  python -m trainer.launch --workers 2 -- +experiment=dense hydra.run.dir=outputs/mw
"""

EPILOG = f"""\
Output lines are prefixed with [worker i]; the launcher's own with [launch].
SIGINT and SIGTERM are forwarded to every worker: they stop together at the next
execution boundary, save, and exit {EXIT_PREEMPTED}; the same command with the same
hydra.run.dir resumes. When a worker fails or is killed, the others are stopped
(SIGTERM, then SIGKILL after --grace seconds).

exit status: 0 all workers finished; {EXIT_PREEMPTED} all were preempted (resume with the
same command and hydra.run.dir); {EXIT_TIMEOUT} --timeout exceeded; otherwise the status of
the first worker that failed (its exit code, or 128+N when killed by signal N); 2 a
usage error.
"""


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m trainer.launch", description=DESCRIPTION, epilog=EPILOG,
                usage="%(prog)s --workers N [options] -- [OVERRIDES ...]",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", "-n", type=positive_int, required=True, metavar="N",
                   help="the number of worker processes (worker 0 is the chief)")
    p.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                   help=f"stop every worker and exit {EXIT_TIMEOUT} after this long "
                        "(default: no limit)")
    p.add_argument("--grace", type=positive_float, default=10.0, metavar="SECONDS",
                   help="when stopping workers, how long after SIGTERM to send SIGKILL "
                        "(default: %(default)s)")
    p.add_argument("--stop-timeout", type=positive_float, default=120.0, metavar="SECONDS",
                   help="after a forwarded signal, or once one worker has exited, how long "
                        "the others have to exit before they are stopped "
                        "(default: %(default)s)")
    p.add_argument("--module", default="trainer", metavar="MODULE",
                   help="the Hydra app each worker runs with `python -m MODULE` "
                        "(default: %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each worker's TF_CONFIG and command line, start nothing")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The launcher's options, with ``overrides``: what every worker gets after ``--``."""
    parser = build_parser()
    own, overrides = split_argv(argv)
    args, unknown = parser.parse_known_args(own)
    if unknown:
        hint = ("; put the trainer's overrides after --" if any("=" in u for u in unknown)
                else "")
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    for o in overrides:
        if o.startswith("-"):
            parser.error(f"{o!r} after --: the workers take config overrides only "
                         "(no -m/--multirun, no Hydra flags)")
        key, value = split_override(o)
        if key == "distribute" and value != "multi_worker":
            parser.error(f"{o!r}: the launcher runs distribute=multi_worker workers")
    args.overrides = [o for o in overrides if split_override(o) != ("distribute", "multi_worker")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    launcher = Launcher(args)
    if args.dry_run:
        return launcher.dry_run()
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
