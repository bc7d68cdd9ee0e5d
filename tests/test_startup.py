"""Start-up with real processes: a refused or failed start leaves the run dir exactly as it
was, and a stop signal at any moment of start-up ends the run with status 75 and one line.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180
SMALL = ["data=synthetic", "data.task=classification", "model.hidden_units=[16]",
         "trainer.epochs=2", "trainer.steps_per_execution=4", "callbacks.progress.mode=log"]


def _command(run_dir, *extra, module="trainer"):
    return [sys.executable, "-m", module, *SMALL, *extra, f"hydra.run.dir={run_dir}"]


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}


def _run(run_dir, *extra):
    return subprocess.run(_command(run_dir, *extra), cwd=run_dir.parent, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)


def _snapshot(run_dir: Path) -> dict:
    """Every file below the run dir with its bytes' digest, mode and modification time.
    The lock file is left out: it names the last process that held the lock."""
    out = {}
    for path in sorted(run_dir.rglob("*")):
        if path.is_file() and path.name != ".trainer.lock":
            st = path.stat()
            out[str(path.relative_to(run_dir))] = (
                hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mode, st.st_mtime_ns)
    return out


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run: its config, job log, checkpoints and outputs."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    p = _run(run_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def test_a_run_dir_in_use_is_left_as_it_was(finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    before = _snapshot(run_dir)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "__main__.log"} <= set(before)
    # A live holder of the run dir's lock (the kernel's flock, as a training process holds it).
    fd = os.open(run_dir / ".trainer.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, b"process 4242 on host\n", 0)
    try:
        p = _run(run_dir, "trainer.epochs=7", "optimizer.learning_rate=0.5")
    finally:
        os.close(fd)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "is in use by process 4242" in _last_line(p.stderr)
    assert _snapshot(run_dir) == before


def test_a_refused_checkpoint_leaves_the_run_dir_as_it_was_and_evaluable(finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    before = _snapshot(run_dir)
    p = _run(run_dir, "model.hidden_units=[32]")
    assert p.returncode == 2, p.stderr[-3000:]
    assert "another model or config" in _last_line(p.stderr)
    assert _snapshot(run_dir) == before
    assert "hidden_units:\n  - 16\n" in (run_dir / ".hydra" / "config.yaml").read_text()
    p = subprocess.run([sys.executable, "-m", "trainer.evaluate", str(run_dir)], env=_env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]


def test_an_accepted_resume_records_its_config(finished, tmp_path):
    """The config a run dir shows is the one its weights were trained with: a resume that
    trains further writes its own."""
    run_dir = _copy(finished, tmp_path)
    p = _run(run_dir, "trainer.epochs=3")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "epochs: 3" in (run_dir / ".hydra" / "config.yaml").read_text()
    assert "trainer.epochs=3" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "resumed from" in (run_dir / "__main__.log").read_text()


def _signal_during_start(run_dir, sig, *, after_line=None, after_seconds=None, extra=()):
    """Start a run and send ``sig`` once ``after_line`` is printed or ``after_seconds``
    passed; return (status, stderr)."""
    proc = subprocess.Popen(_command(run_dir, *extra), cwd=run_dir.parent, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = []
    try:
        if after_seconds is not None:
            time.sleep(after_seconds)
        else:
            # Hydra's console log goes to stdout (merged here): wait for the line.
            deadline = time.monotonic() + TIMEOUT
            for line in proc.stdout:
                out.append(line)
                if after_line in line or time.monotonic() > deadline:
                    break
        assert proc.poll() is None, "".join(out)[-3000:]
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(out) + rest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_starting_exits_75_with_one_line(tmp_path, sig):
    """During the imports and Hydra's composition: nothing trained, nothing written."""
    run_dir = tmp_path / "run"
    status, output = _signal_during_start(run_dir, sig, after_seconds=1.0)
    assert status == 75, output[-3000:]
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert _last_line(output).startswith(
        f"preempted: stopped by {signal.Signals(sig).name} during start-up")
    assert not (run_dir / ".hydra").exists() and not (run_dir / "checkpoints").exists()


def test_a_signal_while_building_exits_75_with_one_line(tmp_path):
    """Once the step has been built and compiled, but before the first step ran."""
    run_dir = tmp_path / "run"
    status, output = _signal_during_start(run_dir, signal.SIGTERM, after_line="variables:")
    assert status == 75, output[-3000:]
    assert "Traceback" not in output
    assert _last_line(output).startswith("preempted: stopped by SIGTERM")


def test_a_signal_while_a_resumed_run_starts_keeps_the_run_resumable(finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    before = _snapshot(run_dir)
    status, output = _signal_during_start(run_dir, signal.SIGTERM, after_seconds=1.0,
                                          extra=["trainer.epochs=3"])
    assert status == 75, output[-3000:]
    assert "during start-up" in _last_line(output) and "Traceback" not in output
    assert _snapshot(run_dir) == before
    p = _run(run_dir, "trainer.epochs=3")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in (run_dir / "__main__.log").read_text()


def test_every_checkpoint_unreadable_stops_with_status_2_and_changes_nothing(finished,
                                                                              tmp_path):
    """Not a fresh start over them: the docs' promise (Reliability, Errors)."""
    run_dir = _copy(finished, tmp_path)
    shards = sorted((run_dir / "checkpoints").glob("ckpt-*.data-*"))
    assert shards
    for shard in shards:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF  # one flipped byte: the checksum no longer matches
        shard.write_bytes(bytes(data))
    before = _snapshot(run_dir)
    p = _run(run_dir)
    assert p.returncode == 2, p.stderr[-3000:]
    last = _last_line(p.stderr)
    assert last.startswith("error: no readable checkpoint among") and "resume=never" in last
    assert _snapshot(run_dir) == before
