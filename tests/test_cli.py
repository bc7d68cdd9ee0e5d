"""The real CLI in a subprocess: a run, a multirun, user config dirs (bad input: test_errors)."""

import json

import pytest

from tests.helpers import cli

pytestmark = pytest.mark.slow
SHORT = [
    "trainer.epochs=1", "trainer.max_steps=5", "callbacks.tensorboard.histogram_every_n_steps=0"
]


def test_dense_run_writes_every_output(tmp_path):
    run_dir = tmp_path / "run"
    p = cli("+experiment=dense", *SHORT, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    for name in (".hydra/config.yaml", "tb/train", "tb/val", "checkpoints/checkpoint",
                 "model.keras", "metrics.json"):
        assert (run_dir / name).exists(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 5 and 0.0 <= metrics["val/accuracy"] <= 1.0
    # Not a terminal: plain log lines, no progress bar.
    assert "epoch 1/1 step 5" in p.stdout + p.stderr


def test_user_config_directory_on_the_search_path(tmp_path):
    configs = tmp_path / "my_configs" / "model"
    configs.mkdir(parents=True)
    (configs / "tiny.yaml").write_text(
        "_target_: trainer.models.mlp\n_partial_: true\nhidden_units: [7]\nname: tiny\n"
    )
    run_dir = tmp_path / "run"
    p = cli("+experiment=dense", *SHORT, f"hydra.searchpath=[file://{tmp_path / 'my_configs'}]",
            "model=tiny", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    # The user's file is used; the experiment still overrides hidden_units after it.
    assert "name: tiny" in (run_dir / ".hydra" / "config.yaml").read_text()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, body):
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def test_multirun_jobs_in_the_real_tensorboard_hparams_dashboard(tmp_path):
    import subprocess
    import sys
    import time
    import urllib.request

    sweep = tmp_path / "sweep"
    p = cli("-m", "+experiment=dense", *SHORT, "optimizer.learning_rate=1e-3,3e-3",
            f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (sweep / "multirun.yaml").exists()  # each job in its own directory, 0 and 1
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep), "--host",
         "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{base}/data/runs", timeout=2) as r:
                    runs = json.loads(r.read())
                if len(runs) >= 6:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert {"0/tb", "0/tb/train", "0/tb/val", "1/tb"} <= set(runs)
        experiment = _post(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        metric_names = {(m["name"]["group"], m["name"]["tag"]) for m in experiment["metricInfos"]}
        assert {("", "epoch/val/accuracy"), ("", "epoch/val/loss"),
                ("", "epoch/train/loss")} <= metric_names
        assert not any(tag.startswith("grad_norm/") for _, tag in metric_names)
        groups = _post(f"{base}/data/plugin/hparams/session_groups", {
            "experimentName": "", "startIndex": 0, "sliceSize": 10, "colParams": [],
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"],
        })["sessionGroups"]
        assert len(groups) == 2
        for group in groups:
            job = group["sessions"][0]["name"].split("/")[0]
            saved = json.loads((sweep / job / "metrics.json").read_text())
            assert group["hparams"]["optimizer.learning_rate"] == pytest.approx(
                saved["train/learning_rate"])
            values = {(m["name"]["group"], m["name"]["tag"]): m["value"]
                      for m in group["metricValues"]}
            assert values[("", "epoch/val/accuracy")] == pytest.approx(saved["val/accuracy"])
            assert values[("", "epoch/train/loss")] == pytest.approx(saved["train/loss"])
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_run_prints_no_warning_of_its_own(tmp_path):
    """A plain run raises no Python warning from the package's code and nothing AutoGraph
    had to leave unconverted (``AutoGraph could not transform ...``)."""
    import re
    from pathlib import Path

    import trainer

    p = cli("+experiment=dense", "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}",
            cwd=tmp_path, env={"PYTHONWARNINGS": "default"})  # DeprecationWarnings too
    assert p.returncode == 0, p.stderr
    output = p.stdout + p.stderr
    assert "AutoGraph could not transform" not in output
    package = re.escape(str(Path(trainer.__file__).parent))
    ours = re.findall(rf"^{package}\S*\.py:\d+: \w+: .*$", output, flags=re.MULTILINE)
    assert not ours
