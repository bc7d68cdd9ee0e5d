"""Resuming: which checkpoint to continue from, and reading it back whole or not at all."""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path

import tensorflow as tf

from trainer.common.errors import UserError

log = logging.getLogger(__name__)

RESUME_CHOICES = ("auto", "never")
#: Keys every object-based checkpoint has that say nothing about the run.
_BOOKKEEPING = ("_CHECKPOINTABLE_OBJECT_GRAPH", "save_counter")


class CheckpointMismatchError(UserError):
    """A checkpoint of another architecture or another config."""


def check_resume(value) -> str:
    """``auto``, ``never`` or a path (a run directory, a checkpoint directory or prefix)."""
    if not isinstance(value, str) or not value:
        raise UserError(f"trainer.resume={value!r} must be auto, never or a path to a run "
                        "directory or checkpoint")
    return value


def candidates(resume: str, run_dir: Path, directory: str) -> list[str]:
    """The checkpoints to try, newest first.

    ``auto``: those in ``run_dir/directory`` (none: start fresh); ``never``: none;
    a path: a run directory (its ``directory``), a checkpoint directory, or one
    checkpoint's prefix (``.../ckpt-120``). A path that holds no checkpoint is an
    error: the user asked for one.
    """
    if resume == "never":
        return []
    own = _checkpoints_in(run_dir / directory)
    if resume == "auto":
        return own
    if own:
        # A run resumed from elsewhere into this dir, then stopped and started again with
        # the same command: its own checkpoints are newer than the path it started from.
        log.info("%s has checkpoints of its own: continuing from them, not from "
                 "trainer.resume=%s", run_dir, resume)
        return own
    path = Path(resume).expanduser()
    if Path(f"{path}.index").exists():
        return [str(path)]
    for folder in (path / directory, path):
        found = _checkpoints_in(folder)
        if found:
            return found
    what = "does not exist" if not path.exists() else "holds no checkpoint"
    raise UserError(f"trainer.resume={resume}: {what}; give a run directory, a checkpoint "
                    f"directory or a checkpoint such as {directory}/ckpt-100 (or "
                    "trainer.resume=never)")


def _checkpoints_in(folder: Path) -> list[str]:
    """Checkpoint prefixes in ``folder``, newest (highest number) first.

    Read from the ``.index`` files, not from the ``checkpoint`` index file alone: a
    kill between writing a checkpoint and updating that file must not hide it, and a
    checkpoint listed there whose files are gone is no candidate.
    """
    if not folder.is_dir():
        return []
    numbered = []
    for index in folder.glob("*.index"):
        prefix = str(index)[: -len(".index")]
        match = re.search(r"-(\d+)$", prefix)
        if match:
            numbered.append((int(match.group(1)), prefix))
    return [prefix for _, prefix in sorted(numbered, reverse=True)]


def _variables(path: str) -> dict[str, tuple]:
    return {name.replace("/.ATTRIBUTES/VARIABLE_VALUE", ""): tuple(shape)
            for name, shape in tf.train.list_variables(path)
            if not name.startswith(_BOOKKEEPING)}


def check_compatible(checkpoint: tf.train.Checkpoint, path: str, prefix: str = "") -> None:
    """Raise ``CheckpointMismatchError`` naming every variable that differs, before reading.

    The run's own checkpoint is written once to a temporary directory and the two
    listings are compared name by name and shape by shape: a missing variable, an
    extra one or another shape means another architecture, optimizer or config,
    and nothing is restored (TensorFlow would assign the matching variables and
    fail on the first mismatch, a partial load). ``prefix`` compares only the keys
    under it (a checkpoint of part of the run, such as ``callbacks/``). The copy is
    written beside ``path``, on the disk that holds the checkpoints.
    """
    try:
        scratch = tempfile.TemporaryDirectory(dir=Path(path).parent, prefix=".expected-")
    except OSError:  # a read-only checkpoint directory
        scratch = tempfile.TemporaryDirectory()
    with scratch as tmp:
        expected = _variables(checkpoint.write(str(Path(tmp) / "expected")))
    saved = {k: v for k, v in _variables(path).items() if k.startswith(prefix)}
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    # Variables only: other saved attributes (an iterator's state, Python state) are
    # serialized blobs whose size varies with their content.
    shapes = sorted(f"{k} {list(saved[k])} in the checkpoint, {list(expected[k])} here"
                    for k in set(saved) & set(expected)
                    if saved[k] != expected[k] and "/.ATTRIBUTES/" not in k)
    if missing or extra or shapes:
        parts = [f"shapes differ: {'; '.join(shapes)}"] if shapes else []
        parts += [f"not in the checkpoint: {', '.join(missing)}"] if missing else []
        parts += [f"not in this run: {', '.join(extra)}"] if extra else []
        raise CheckpointMismatchError(
            f"checkpoint {path} was written by another model or config ({'; '.join(parts)}); "
            "resume with the config it was trained with, or start fresh with "
            "trainer.resume=never (or another hydra.run.dir)")


def readable(paths: list[str]) -> str:
    """The newest checkpoint of ``paths`` whose every tensor can be read back.

    A checkpoint that cannot (truncated, corrupt, half deleted: each tensor's
    checksum is verified) is skipped with a warning naming it, and the previous one
    is tried. Nothing of the run is touched: the check reads the files only.
    """
    for i, path in enumerate(paths):
        try:
            reader = tf.train.load_checkpoint(path)
            for name, dtype in reader.get_variable_to_dtype_map().items():
                if dtype != tf.variant:  # a tf.data iterator's state has no numpy form
                    reader.get_tensor(name)
        except (tf.errors.OpError, ValueError, IndexError) as e:  # IndexError: truncated
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            following = paths[i + 1] if i + 1 < len(paths) else None
            log.warning("checkpoint %s cannot be read (%s); %s", path, first,
                        f"falling back to {following}" if following else "no older one is left")
            continue
        return path
    raise UserError(f"no readable checkpoint among {', '.join(paths)}; delete them or start "
                    "fresh with trainer.resume=never")


def restore(checkpoint: tf.train.Checkpoint, path: str) -> None:
    """Read ``path`` into ``checkpoint``, whole: a checkpoint of another model or config is
    refused before anything is assigned (``check_compatible``), and every object of
    the run must get its value."""
    check_compatible(checkpoint, path)
    status = checkpoint.read(path)
    status.assert_existing_objects_matched()
    # Matched: what is left is bookkeeping (the save counter, made at the next save), which
    # TensorFlow would otherwise warn about when the status is collected.
    status.expect_partial()
