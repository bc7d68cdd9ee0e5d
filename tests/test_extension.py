"""Extending from outside the repository: your own step, regularizer and model config groups."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _run(outside: Path, *overrides, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(outside), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "trainer", f"hydra.searchpath=[file://{outside / 'configs'}]",
         "+experiment=smooth", "callbacks=none", *overrides],
        cwd=outside, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_project_adds_its_own_step_regularizer_and_model_from_its_config_dir(tmp_path):
    outside = tmp_path / "my_project"
    shutil.copytree(HERE / "extension", outside)
    done = _run(outside, "hydra.run.dir=run", "trainer.epochs=1")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((outside / "run" / "metrics.json").read_text())
    assert metrics["smoothing"] == 0.2  # the experiment's value reached the constructor
    assert metrics["train/reg/l2"] > 0 and metrics["params/trainable"] == 64 * 16 + 16 + 170
    # A command-line override of the step's own key, and a misspelt one.
    done = _run(outside, "hydra.run.dir=run2", "trainer.max_steps=2", "step.smoothing=0.3")
    assert json.loads((outside / "run2" / "metrics.json").read_text())["smoothing"] == 0.3
    bad = _run(outside, "hydra.run.dir=run3", "+step.smoothng=0.3")
    assert bad.returncode == 2
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: step my_extension.SmoothStep:") and "smoothng" in last
