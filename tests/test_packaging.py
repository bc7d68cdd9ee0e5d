"""A plain wheel carries the configs and experiments and runs from another directory."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import cli

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_wheel_install_runs_the_dense_experiment(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(ROOT)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    (wheel,) = wheels.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("trainer/configs/config.yaml", "trainer/configs/experiment/dense.yaml",
                     "trainer/configs/callbacks/default.yaml", "trainer/experiments/__init__.py",
                     "trainer/__main__.py"):
        assert required in names, required
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import trainer; print(trainer.__file__)"],
        cwd=elsewhere, env={**os.environ, **env}, capture_output=True, text=True, check=True,
    )
    assert where.stdout.startswith(str(site))
    run_dir = elsewhere / "run"
    p = cli("+experiment=dense", "trainer.epochs=1", "trainer.max_steps=3",
            f"hydra.run.dir={run_dir}", cwd=elsewhere, env=env)
    assert p.returncode == 0, p.stderr
    assert (run_dir / "metrics.json").exists()
