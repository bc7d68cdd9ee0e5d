"""The local worker processes of one multi-worker run (``python -m trainer.launch``).

Starts N ``python -m trainer distribute=multi_worker`` processes on 127.0.0.1, each with
its own ``TF_CONFIG``, prefixes their output lines with ``[worker i]``, forwards SIGINT and
SIGTERM to them, and decides the run's exit status: 0 when all finished, 75 when all were
preempted (saved; the same command resumes), non-zero when one failed (the others, which
would wait forever in a collective op, are stopped). Every wait is bounded.

Standard library only, and no TensorFlow: the launcher starts at once.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.resources
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

from trainer.training.preemption import EXIT_PREEMPTED

HOST = "127.0.0.1"



#: The exit status when ``--timeout`` is exceeded (as coreutils' ``timeout``).
EXIT_TIMEOUT = 124



#: How long to wait for a worker to be reaped after SIGKILL before giving up on it.
REAP_SECONDS = 5.0



POLL_SECONDS = 0.05



FORWARDED = (signal.SIGINT, signal.SIGTERM)



class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (and exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")



def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value



def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value



def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """The launcher's own arguments and the workers' overrides, split at the first ``--``."""
    if "--" in argv:
        i = argv.index("--")
        return list(argv[:i]), list(argv[i + 1:])
    return list(argv), []



def split_override(override: str) -> tuple[str, str | None]:
    """``key`` (without ``+``/``++``/``~``) and value of a Hydra override."""
    key, sep, value = override.partition("=")
    return key.lstrip("+~"), (value if sep else None)



def _last_value(overrides: list[str], key: str) -> str | None:
    for o in reversed(overrides):
        k, value = split_override(o)
        if k == key and value is not None:
            return value
    return None



def task_name(overrides: list[str]) -> str:
    """The run's ``task_name``: a ``task_name=`` override, else the experiment's, else train."""
    name = _last_value(overrides, "task_name")
    if name:
        return name.strip("'\"")
    experiment = _last_value(overrides, "experiment")
    if experiment and re.fullmatch(r"[\w./-]+", experiment):
        with contextlib.suppress(Exception):
            path = importlib.resources.files("trainer.configs") / "experiment"
            text = path.joinpath(f"{experiment}.yaml").read_text()
            found = re.search(r"^task_name:\s*['\"]?([\w.-]+)['\"]?\s*(#.*)?$", text, re.M)
            if found:
                return found.group(1)
    return "train"



def choose_run_dir(overrides: list[str], now: datetime.datetime | None = None) -> str:
    """The run dir all workers share, fixed once here.

    The user's ``hydra.run.dir=`` if given (with any ``${now:FORMAT}`` expanded here,
    so that workers started a second apart agree), else Hydra's default form,
    ``outputs/<task_name>/runs/<YYYY-MM-DD_HH-MM-SS>`` (configs/hydra/default.yaml).
    """
    now = now or datetime.datetime.now()
    given = _last_value(overrides, "hydra.run.dir")
    if given:
        return re.sub(r"\$\{now:([^}]*)\}", lambda m: now.strftime(m.group(1)), given)
    return f"outputs/{task_name(overrides)}/runs/{now:%Y-%m-%d_%H-%M-%S}"



def free_ports(n: int, host: str = HOST) -> list[int]:
    """``n`` distinct ports free on ``host`` now (bound to port 0, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()



def tf_config(ports: list[int], index: int, host: str = HOST) -> dict:
    """Worker ``index``'s ``TF_CONFIG`` in a cluster of one worker per port."""
    return {"cluster": {"worker": [f"{host}:{p}" for p in ports]},
            "task": {"type": "worker", "index": index}}



def worker_command(index: int, run_dir: str, overrides: list[str],
                   module: str = "trainer") -> list[str]:
    """Worker ``index``'s command line; only the chief (0) writes ``.hydra/`` and the log."""
    own = [o for o in overrides if split_override(o)[0] != "hydra.run.dir"]
    cmd = [sys.executable, "-m", module, "distribute=multi_worker", *own,
           f"hydra.run.dir={run_dir}"]
    if index:
        # Hydra opens every configured log handler: drop the file one, not just detach it.
        cmd += ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]",
                "~hydra.job_logging.handlers.file"]
    return cmd



def describe(status: int) -> str:
    """A worker's exit status in words: ``exited 2``, ``was killed by SIGKILL``."""
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    if status == EXIT_PREEMPTED:
        return f"exited {status} (preempted)"
    return f"exited {status}"



def exit_code(status: int) -> int:
    """A worker's status as a shell exit code (128+N for death by signal N)."""
    return 128 - status if status < 0 else status



class Worker:
    """One worker process and the threads copying its output."""

    def __init__(self, index: int, proc: subprocess.Popen):
        self.index, self.proc, self.pid = index, proc, proc.pid
        self.status: int | None = None
        self.threads: list[threading.Thread] = []

    @property
    def name(self) -> str:
        return f"worker {self.index} (pid {self.pid})"

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the worker's process group (the worker and anything it started)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def poll(self) -> int | None:
        if self.status is None:
            self.status = self.proc.poll()
        return self.status



class Launcher:
    """Starts the workers, copies their output, forwards signals, and ends the run."""

    def __init__(self, args: argparse.Namespace, out=None, err=None):
        self.args = args
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.run_dir = choose_run_dir(args.overrides)
        self.workers: list[Worker] = []
        self.pending: list[int] = []  # signals received, not yet forwarded
        self._lock = threading.Lock()

    # -- output ------------------------------------------------------------------------

    def _write(self, stream, text: str) -> None:
        with self._lock, contextlib.suppress(OSError, ValueError):
            stream.write(text)
            stream.flush()

    def say(self, message: str) -> None:
        self._write(self.err, f"[launch] {message}\n")

    def _pump(self, pipe, prefix: str, stream) -> None:
        try:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n").rstrip("\r")
                self._write(stream, f"{prefix}{line}\n")
        except (OSError, ValueError):
            pass
        finally:
            with contextlib.suppress(OSError):
                pipe.close()

    # -- start ---------------------------------------------------------------------------

    def commands(self) -> list[tuple[dict, list[str]]]:
        ports = free_ports(self.args.workers)
        return [(tf_config(ports, i), worker_command(i, self.run_dir, self.args.overrides,
                                                     self.args.module))
                for i in range(self.args.workers)]

    def dry_run(self) -> int:
        for cfg, cmd in self.commands():
            self._write(self.out, f"TF_CONFIG={shlex.quote(json.dumps(cfg))} "
                                  f"{shlex.join(cmd)}\n")
        return 0

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for i, (cfg, cmd) in enumerate(self.commands()):
            # A session (so a process group) of its own: a Ctrl-C at the terminal reaches
            # the launcher only, which forwards it once; and the group can be killed whole.
            proc = subprocess.Popen(cmd, env={**env, "TF_CONFIG": json.dumps(cfg)},
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True,
                                    preexec_fn=_die_with_parent(os.getpid()))
            self.workers.append(Worker(i, proc))
        # Threads only once every worker is forked (preexec_fn and threads do not mix).
        for w in self.workers:
            for pipe, stream in ((w.proc.stdout, self.out), (w.proc.stderr, self.err)):
                t = threading.Thread(target=self._pump, args=(pipe, f"[worker {w.index}] ",
                                                              stream), daemon=True)
                t.start()
                w.threads.append(t)
        cluster = ",".join(cfg["cluster"]["worker"])
        self.say(f"run dir {self.run_dir}: {len(self.workers)} workers ({cluster})")
        for w in self.workers:
            self.say(f"worker {w.index}: pid {w.pid}" + (" (chief)" if w.index == 0 else ""))

    # -- run -----------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self.pending.append(signum)

    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.poll() is None]

    def run(self) -> int:
        """Start the workers and wait (bounded) until all have exited; the exit status."""
        previous = {s: signal.signal(s, self._on_signal) for s in FORWARDED}
        try:
            self.start()
            return self._wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._cleanup()

    def _wait(self) -> int:
        args = self.args
        t0 = time.monotonic()
        deadline = None  # the live workers must have exited by then
        stop_at = kill_at = None  # when SIGTERM / SIGKILL were sent to stop everything
        failed = timed_out = None
        while True:
            now = time.monotonic()
            while self.pending:
                sig = self.pending.pop(0)
                name = signal.Signals(sig).name
                for w in self.live():
                    w.signal(sig)
                self.say(f"{name} received: forwarded to the workers, which stop at the next "
                         f"execution boundary and save")
                if deadline is None:
                    deadline = now + args.stop_timeout
            for w in self.workers:
                if w.status is not None or w.poll() is None:
                    continue
                if w.status in (0, EXIT_PREEMPTED):
                    if deadline is None:
                        deadline = now + args.stop_timeout
                elif failed is None and stop_at is None:
                    failed = w
                    self.say(f"{w.name} {describe(w.status)}: stopping the other workers")
                    stop_at = now
                    self._signal_live(signal.SIGTERM)
            live = self.live()
            if not live:
                break
            if kill_at is not None:
                if now - kill_at > REAP_SECONDS:
                    self.say(f"{', '.join(w.name for w in live)} still alive after SIGKILL; "
                             "giving up on them")
                    break
            elif stop_at is not None:
                if now - stop_at > args.grace:
                    kill_at = now
                    self._signal_live(signal.SIGKILL)
            elif args.timeout is not None and now - t0 > args.timeout:
                timed_out = True
                self.say(f"timeout: {args.timeout:g} s exceeded; stopping the workers")
                stop_at = now
                self._signal_live(signal.SIGTERM)
            elif deadline is not None and now > deadline:
                self.say(f"{', '.join(w.name for w in live)} still running "
                         f"{args.stop_timeout:g} s after a signal or another worker's exit; "
                         "stopping them")
                stop_at = now
                self._signal_live(signal.SIGTERM)
            time.sleep(POLL_SECONDS)
        return self._outcome(failed, timed_out)

    def _signal_live(self, sig: int) -> None:
        for w in self.live():
            w.signal(sig)

    def _outcome(self, failed: Worker | None, timed_out: bool | None) -> int:
        statuses = ", ".join(f"worker {w.index} " + ("still alive" if w.status is None else
                                                     describe(w.status))
                             for w in self.workers)
        if timed_out:
            code = EXIT_TIMEOUT
        else:
            failed = failed or next((w for w in self.workers
                                     if w.status not in (0, EXIT_PREEMPTED)), None)
            if failed is not None:
                code = 1 if failed.status is None else exit_code(failed.status)
            elif all(w.status == 0 for w in self.workers):
                code = 0
            else:
                code = EXIT_PREEMPTED
        if code == 0:
            reason = "all workers finished"
        elif code == EXIT_PREEMPTED and failed is None:
            reason = f"preempted: resume with the same command and hydra.run.dir={self.run_dir}"
        elif timed_out:
            reason = f"timed out after {self.args.timeout:g} s"
        elif failed.status is None:
            reason = f"failed: {failed.name} could not be stopped"
        else:
            reason = f"failed: {failed.name} {describe(failed.status)}"
        self.say(f"exit {code} ({reason}); {statuses}")
        return code

    def _cleanup(self) -> None:
        """Leave nothing behind: SIGKILL what remains of every worker's process group."""
        for w in self.workers:
            if w.poll() is None:
                w.signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.proc.wait(timeout=REAP_SECONDS)
            else:
                w.signal(signal.SIGKILL)  # anything the worker started and left behind
        end = time.monotonic() + 2.0
        for w in self.workers:
            for t in w.threads:
                t.join(timeout=max(0.0, end - time.monotonic()))



def _die_with_parent(parent: int):
    """A ``preexec_fn``: on Linux the worker gets SIGTERM if the launcher dies (say SIGKILL)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec():
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec
