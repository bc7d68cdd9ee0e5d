"""One writer per run directory: an exclusive lock held while a run trains in it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from trainer.common.errors import UserError

LOCK_FILE = ".trainer.lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, name: str | None = None):
    """Hold an exclusive lock on ``run_dir`` for the duration of the block.

    A second process asking for the same run directory fails at once with an error
    naming the process that holds it. The lock is an ``flock`` on a file in the
    directory: the kernel releases it when its holder exits, however it exits, so a
    lock left behind by a killed run never blocks a resume (the file stays; the
    lock does not). ``name`` is the lock file's (the workers of a multi-worker run
    share the run dir, each with its own lock).
    """
    path = Path(run_dir) / (name or LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # less the umask, as open() does
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"{run_dir} is in use by {holder}; wait for it to finish, stop it, "
                            "or choose another hydra.run.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def worker_index_from_env(cluster: str = "tf_config") -> int:
    """This process's worker index in a multi-worker cluster (0: the chief), read from
    ``TF_CONFIG`` or SLURM's ``SLURM_PROCID`` without starting TensorFlow."""
    import json

    if cluster == "slurm":
        return int(os.environ.get("SLURM_PROCID", "0"))
    try:
        config = json.loads(os.environ.get("TF_CONFIG", "{}"))
        task = config.get("task", {})
        chiefs = len(config.get("cluster", {}).get("chief", []))
        if task.get("type") == "chief":
            return 0
        return chiefs + int(task.get("index", 0))
    except (ValueError, TypeError, AttributeError):
        return 0  # the strategy reports a malformed TF_CONFIG itself
