"""Files written atomically get the mode an ordinary open() gives them: the umask decides."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from trainer.common import atomic
from trainer.common.atomic import atomic_write, default_mode, umask

# Each umask and the modes open() and mkdir() give under it (002: a group-writable one).
UMASKS = [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750), (0o002, 0o664, 0o775)]


@pytest.fixture(params=UMASKS, ids=["022", "027", "002"])
def modes(request):
    """Runs the test under each umask (put back after it); yields the file and dir modes."""
    mask, file_mode, dir_mode = request.param
    previous = os.umask(mask)
    try:
        yield file_mode, dir_mode
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_umask_is_read_without_changing_it(monkeypatch):
    previous = os.umask(0o027)
    try:
        assert umask() == 0o027
        # Where /proc cannot tell it, it is set and put back.
        monkeypatch.setattr(atomic, "open", lambda *a, **k: (_ for _ in ()).throw(OSError()),
                            raising=False)
        assert umask() == 0o027
        assert os.umask(0o027) == 0o027  # unchanged
    finally:
        os.umask(previous)


def test_atomic_write_gives_the_mode_open_would(modes, tmp_path):
    file_mode, dir_mode = modes
    assert default_mode() == file_mode and default_mode(directory=True) == dir_mode
    target = tmp_path / "out.json"
    atomic_write(target, lambda p: Path(p).write_text("{}\n"))
    assert target.read_text() == "{}\n" and _mode(target) == file_mode
    # The same as a file open() makes beside it.
    (tmp_path / "plain.json").write_text("{}\n")
    assert _mode(tmp_path / "plain.json") == file_mode


def test_a_run_dir_has_one_mode_for_every_file(modes, make_cfg, tmp_path):
    """metrics.json, history.jsonl and model.keras (written through temporary files) have
    the mode of the run dir's other files: the lock, the event files, the checkpoints."""
    from trainer.driver.run import run

    file_mode, dir_mode = modes
    run(make_cfg("data=synthetic", "model.hidden_units=[4]", "trainer.epochs=1",
                 "trainer.max_steps=2", "trainer.steps_per_execution=1",
                 "callbacks.tensorboard.histogram_every_n_steps=0",
                 "callbacks.progress.mode=log"), run_dir=tmp_path)
    files = {p.relative_to(tmp_path).as_posix(): _mode(p)
             for p in tmp_path.rglob("*") if p.is_file()}
    assert {"metrics.json", "history.jsonl", "model.keras", ".trainer.lock"} <= set(files)
    assert {name: mode for name, mode in files.items() if mode != file_mode} == {}
    # The directories are TensorFlow's (tb/, checkpoints/): it makes them 0755 less the
    # umask, which a group-writable umask (002) does not widen.
    dirs = {p.name: _mode(p) for p in tmp_path.rglob("*") if p.is_dir()}
    assert {name: mode for name, mode in dirs.items() if mode != dir_mode & 0o755} == {}


def test_an_export_directory_has_the_mode_mkdir_would(modes, make_cfg, tmp_path):
    """The export is written in a temporary directory (mkdtemp: 0700) and renamed into place."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from trainer.driver.shards import export

    file_mode, dir_mode = modes
    out = tmp_path / "shards"
    GlobalHydra.instance().clear()  # make_cfg clears it again afterwards
    with initialize_config_module("trainer.configs", version_base="1.3"):
        cfg = compose("export_data", overrides=["data=synthetic", f"out={out}", "shards=1"])
    export(cfg)
    assert _mode(out) == dir_mode
    shards = {p.name: _mode(p) for p in out.glob("*.tfrecord")}
    assert shards and set(shards.values()) == {file_mode}
