"""The real ``tensorboard`` server shows a finished run: scalars and HParams over its HTTP API.

What a user sees in the dashboard is what the server's plugins answer; these requests are
the ones the dashboard's pages make (``tensorboard/plugins/hparams/http_api.md`` documents
the HParams routes: JSON bodies of ``api.proto``'s request messages, POSTed).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from trainer.callbacks import Callback
from trainer.driver.run import build, write_outputs

pytestmark = pytest.mark.slow  # a 46-step run, then a server start: 8-11 s on 2 cores

#: Bounded waits: the server's start (imports, then the first load of the log dir).
START_SECONDS = 90
ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


class Logged(Callback):
    """Every train log by global step (one per execution)."""

    def __init__(self):
        self.train = {}

    def on_execution_end(self, trainer, global_step, logs):
        self.train[global_step] = dict(logs)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """The dense experiment for 2 epochs (46 steps, paced ``auto``), as ``python -m
    trainer`` runs it, with a callback recording what it logged."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("trainer.configs", version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=dense", "trainer.epochs=2",
                                           "callbacks.progress.mode=log"])
    GlobalHydra.instance().clear()
    run_dir = tmp_path_factory.mktemp("served")
    r = build(cfg, run_dir)
    logged = Logged()
    r.trainer.callbacks.append(logged)
    r.trainer.fit(r.step, r.data)
    write_outputs(r)
    return run_dir, logged, r.trainer.history


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``tensorboard --logdir LOGDIR --host 127.0.0.1 --port FREE``, the default reader
    (the Rust data server when installed, as a user's ``tensorboard`` gets)."""

    def __init__(self, logdir, log_path):
        self.port = _free_port()
        self.log_path = log_path
        self.log = open(log_path, "wb")  # noqa: SIM115 (closed by stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir),
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=self.log)

    def get(self, path: str, **query):
        url = f"http://127.0.0.1:{self.port}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict):
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def wait_for(self, ready, what: str, seconds: float = START_SECONDS):
        """Poll ``ready()`` (a request) until it returns something truthy."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                value = ready()
                if value:
                    return value
            except OSError:
                pass  # not listening yet, or the log dir not loaded yet
            time.sleep(0.5)
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise AssertionError(f"tensorboard did not serve {what} within {seconds} s "
                             f"(exit code {self.process.poll()}):\n{tail}")

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)
        finally:
            self.log.close()


@pytest.fixture(scope="module")
def server(finished_run, tmp_path_factory):
    run_dir, _, _ = finished_run
    # The run dir, as `tensorboard --logdir outputs` sees a run: runs tb, tb/train, tb/val.
    s = Server(run_dir, tmp_path_factory.mktemp("tensorboard") / "server.log")
    try:
        # Loaded once the runs' last scalars are in (the last epoch's, written last).
        for run, tag in [("tb/val", "loss"), ("tb", "epoch/val/loss")]:
            s.wait_for(lambda run=run, tag=tag: any(step == 46 for _, step, _ in s.get(
                "/data/plugin/scalars/scalars", run=run, tag=tag)), f"{run}: {tag}")
        yield s
    finally:
        s.stop()


def _served(server, run, tag) -> dict:
    return {step: value for _, step, value in
            server.get("/data/plugin/scalars/scalars", run=run, tag=tag)}


def test_the_scalars_tags(server):
    tags = server.get("/data/plugin/scalars/tags")
    for tag in ("loss", "accuracy", "grad_norm", "learning_rate", "time/steps_per_second"):
        assert tag in tags["tb/train"], tag
    assert {"loss", "accuracy"} <= set(tags["tb/val"])


def test_training_scalars_are_every_executions_logs(server, finished_run):
    _, logged, _ = finished_run
    for tag in ("loss", "accuracy", "grad_norm"):
        served = _served(server, "tb/train", tag)
        assert sorted(served) == sorted(logged.train), tag
        assert served == {s: pytest.approx(logs[f"train/{tag}"], rel=1e-6)
                          for s, logs in logged.train.items()}, tag
    assert len(logged.train) >= 20  # a 46-step run draws a curve (auto pacing)


def test_validation_scalars_are_each_epochs(server, finished_run):
    _, _, history = finished_run
    for tag in ("loss", "accuracy"):
        assert _served(server, "tb/val", tag) == {
            epoch["step"]: pytest.approx(epoch[f"val/{tag}"], rel=1e-6) for epoch in history}


def test_histograms_are_of_the_weights_only(server):
    tags = server.get("/data/plugin/histograms/tags")["tb/train"]
    weights = {t for t in tags if t.startswith("weights/")}
    assert "weights/mlp/dense_0/kernel" in weights
    assert not any("seed_generator" in t for t in tags)


def test_the_hparams_experiment(server, finished_run):
    experiment = server.wait_for(lambda: server.post(
        "/data/plugin/hparams/experiment", {"experimentName": ""}), "the HParams experiment",
        seconds=30)
    names = {info["name"] for info in experiment["hparamInfos"]}
    assert {"optimizer.learning_rate", "model.dropout", "data.batch_size"} <= names
    # Hydra's instantiation keys are not hyperparameters.
    assert not [n for n in names if "_target_" in n or "_partial_" in n]
    # The dashboard shows the first five metrics: validation first.
    shown = [m["displayName"] for m in experiment["metricInfos"]][:5]
    assert shown == ["val/accuracy", "val/loss", "train/accuracy", "train/loss",
                     "train/grad_norm"]


def test_the_hparams_session_has_the_config_and_the_last_epochs_metrics(server, finished_run):
    _, _, history = finished_run
    groups = server.post("/data/plugin/hparams/session_groups", {
        "experimentName": "", "allowedStatuses": ALL_STATUSES, "colParams": [],
        "startIndex": 0, "sliceSize": 100})["sessionGroups"]
    assert len(groups) == 1
    group = groups[0]
    assert group["hparams"]["optimizer.learning_rate"] == pytest.approx(1e-3)
    assert group["hparams"]["model.dropout"] == pytest.approx(0.1)
    assert group["hparams"]["data.batch_size"] == 64
    assert not [n for n in group["hparams"] if "_target_" in n or "_partial_" in n]
    metrics = {(m["name"].get("group", ""), m["name"]["tag"]): m
               for m in group["metricValues"]}
    # The last epoch's values, as in history.jsonl and metrics.json (the training loss
    # is the epoch's mean, not the last execution's).
    final = history[-1]
    for key in ("val/accuracy", "val/loss", "train/accuracy", "train/loss"):
        value = metrics["", f"epoch/{key}"]
        assert value["value"] == pytest.approx(final[key], rel=1e-6), key
        assert int(value["trainingStep"]) == final["step"] == 46
