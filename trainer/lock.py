"""One writer per run directory: an exclusive lock held while a run trains in it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from trainer.errors import UserError

LOCK_FILE = ".trainer.lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: Path):
    """Hold an exclusive lock on ``run_dir`` for the duration of the block.

    A second process asking for the same run directory fails at once with an error
    naming the process that holds it. The lock is an ``flock`` on a file in the
    directory: the kernel releases it when its holder exits, however it exits, so a
    lock left behind by a killed run never blocks a resume (the file stays; the
    lock does not).
    """
    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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
