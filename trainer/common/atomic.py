"""Files written whole or not at all, with the permissions an ordinary ``open`` gives them.

``tempfile.mkstemp`` and ``mkdtemp`` make their files 0600 and directories 0700 whatever
the umask: a file renamed into place from one would be private to the user where the rest
of the run dir is readable by the group (or everyone). Everything here gives the final file
or directory the mode ``open`` or ``mkdir`` would have given it instead.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

_umask_lock = threading.Lock()


def umask() -> int:
    """The process's umask, read without changing it where the system can tell it.

    Linux reports it in ``/proc/self/status``. Elsewhere it can only be read by setting
    another one and putting it back; the stand-in is 0o077, so a file another thread
    creates in that instant is more private than asked for, never less.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def default_mode(*, directory: bool = False) -> int:
    """The mode ``open`` (0o666) or ``mkdir`` (0o777) gives a new file under the umask."""
    return (0o777 if directory else 0o666) & ~umask()


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    A write that fails midway leaves ``path`` as it was and no temporary file behind;
    readers see the old file or the new one, never part of one. The new file gets the
    mode an ordinary ``open`` would give it (``default_mode``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        # After writing: a writer may make the file anew by its path (Keras' save).
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_directory(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp)`` on a new temporary directory beside ``path``, then rename it to
    ``path``, replacing a directory there.

    A write that fails midway leaves ``path`` as it was and nothing behind. Replacing takes
    two renames (the old directory aside, the new one in), so a reader in that instant finds
    no directory at ``path``, but never part of one. The new directory gets the mode
    ``mkdir`` would give it.
    """
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-")
    old = None
    try:
        write(tmp)
        os.chmod(tmp, default_mode(directory=True))
        if not path.exists():
            os.replace(tmp, path)
            return
        old = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-old-")
        os.replace(path, Path(old) / path.name)
        try:
            os.replace(tmp, path)
        except OSError:
            os.replace(Path(old) / path.name, path)  # the old one back
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
