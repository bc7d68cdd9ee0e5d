"""distribute.cluster=slurm: two workers find each other from a SLURM step's environment."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_slurm_tasks_train_one_run(tmp_path):
    # What srun sets for a step of 2 tasks on one node (no scontrol or nvidia-smi needed);
    # TensorFlow's SlurmClusterResolver turns it into the cluster, ports from port_base.
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": "2",
               "TF_CPP_MIN_LOG_LEVEL": "2"}
        env.pop("TF_CONFIG", None)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "trainer", "+experiment=dense", "distribute=multi_worker",
             "distribute.cluster=slurm", f"distribute.port_base={port}",
             f"hydra.run.dir={tmp_path}", "trainer.max_steps=10", "callbacks=none"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "worker 0 of 2" in outputs[0] and "worker 1 of 2" in outputs[1]
    metrics = json.loads((tmp_path / "metrics.json").read_text())  # the chief's
    assert metrics["step"] == 10
