"""The experiment trackers besides TensorBoard (logger=[tensorboard,mlflow,csv]): MLflow runs
read back through ``mlflow.MlflowClient`` and compared point by point with TensorBoard's event
files, ``metrics.csv``, a resumed run, a sweep's nested runs against a real ``mlflow server``."""

from __future__ import annotations

import csv
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.tb_reader import load, scalars
from trainer.common.errors import UserError
from trainer.driver.run import build, run

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
mlflow = pytest.importorskip("mlflow")

#: 12 steps an epoch (384 training examples of 32), executions of 4 steps, no histograms.
SMALL = ["data=synthetic", "trainer.epochs=2", "trainer.steps_per_execution=4",
         "callbacks.tensorboard.histogram_every_n_steps=0", "callbacks.progress.mode=log",
         "~callbacks.health"]  # its own scalars in tb/train: TensorBoard's only


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module's runs: creating one takes seconds (its migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _only_run(client, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def _tb_place(key: str) -> tuple[str, str]:
    """The TensorBoard run (sub-directory of tb/) and tag of a log key."""
    group, _, tag = key.partition("/")
    if group == "epoch":
        return "", key
    if group in ("train", "val"):
        return group, tag
    return "train", key


def _history(client, run_id, key) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client.get_metric_history(run_id, key)]


@pytest.mark.parametrize("variant", [
    [],
    pytest.param(["distribute=mirrored", "distribute.cpu_replicas=2",
                  "trainer.accumulate_steps=2"], marks=pytest.mark.slow),
    pytest.param(["trainer.run_eagerly=true"], marks=pytest.mark.slow),
], ids=["compiled", "mirrored-accumulate", "eager"])
def test_mlflow_and_csv_hold_tensorboards_points(make_cfg, tmp_path, store, variant, request):
    experiment = request.node.callspec.id
    cfg = make_cfg(*SMALL, *variant, "logger=[tensorboard,mlflow,csv]", "task_name=t",
                   f"logger.mlflow.tracking_uri={store}",
                   f"logger.mlflow.experiment_name={experiment}", "optimizer.learning_rate=0.003")
    metrics = run(cfg, run_dir=tmp_path)
    client = mlflow.MlflowClient(tracking_uri=store)
    mlrun = _only_run(client, experiment)
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == tmp_path.name
    # Parameters: the flattened config; artifacts: the config and the run's outputs.
    assert mlrun.data.params["optimizer.learning_rate"] == "0.003"
    assert mlrun.data.params["trainer.epochs"] == "2" and mlrun.data.params["task_name"] == "t"
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"config.yaml", "model.keras", "metrics.json", "history.jsonl"} <= artifacts

    keys = set(mlrun.data.metrics)
    assert {"train/loss", "val/loss", "epoch/train/loss", "epoch/val/loss",
            "time/steps_per_second"} <= keys
    tb_runs = {name: load(tmp_path / "tb" / name) for name in ("", "train", "val")}
    tb_tags = {(name, tag) for name, acc in tb_runs.items() for tag in acc.Tags()["tensors"]
               if name != "" or tag.startswith("epoch/")}
    assert tb_tags == {_tb_place(k) for k in keys}  # the same series, no more, no less
    csv_rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    csv_steps = [int(r["step"]) for r in csv_rows]
    assert csv_steps == sorted(set(csv_steps))  # one row per logged step
    for key in keys:
        name, tag = _tb_place(key)
        tb = scalars(tb_runs[name], tag)
        ml = _history(client, mlrun.info.run_id, key)
        assert [s for s, _ in ml] == [s for s, _ in tb], key
        # TensorBoard keeps float32; MLflow and the CSV the logged Python float.
        assert [v for _, v in ml] == pytest.approx([v for _, v in tb], rel=1e-6), key
        in_csv = [(int(r["step"]), float(r[key])) for r in csv_rows if r[key] != ""]
        assert in_csv == ml, key
    steps = sorted({s for k in keys for s, _ in _history(client, mlrun.info.run_id, k)})
    assert csv_steps == steps and steps[-1] == 24 == metrics["step"]
    assert set(csv_rows[0]) == {"step", *keys}


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_run_and_csv(make_cfg, tmp_path):
    # The default store: sqlite in the run directory. Checkpoints every 4 steps; the crash
    # comes at step 7, the run resumes from step 4.
    cfg_overrides = [*SMALL, "trainer.steps_per_execution=1", "logger=[tensorboard,mlflow,csv]",
                     "callbacks.checkpoint.every_n_steps=4",
                     "callbacks.checkpoint.every_seconds=0",
                     "callbacks.checkpoint.min_interval_seconds=0"]
    with pytest.raises(RuntimeError, match="crash at step 7"):
        run(make_cfg(*cfg_overrides, "+callbacks.crash._target_=tests.helpers.Crash",
                     "+callbacks.crash.at_step=7"), run_dir=tmp_path)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    # tests.helpers.Crash runs before the loggers (callbacks.*, then logger.*): they never
    # see step 7, and step 6's row was waiting for the next step's points.
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    crashed = _only_run(client, "train")
    assert crashed.info.status == "FAILED"
    first_id = crashed.info.run_id

    run(make_cfg(*cfg_overrides), run_dir=tmp_path)
    mlrun = _only_run(client, "train")  # the same run, not a second one
    assert mlrun.info.run_id == first_id and mlrun.info.status == "FINISHED"
    assert (tmp_path / "mlartifacts").is_dir()  # the store's artifacts beside it
    assert "model.keras" in {a.path for a in client.list_artifacts(first_id)}
    losses = _history(client, first_id, "train/loss")
    # Steps 5 and 6 were logged twice (the interrupted run's and the resumed run's points;
    # MLflow keeps both), every other step once, up to the end.
    assert sorted(s for s, _ in losses) == sorted([*range(1, 25), 5, 6])
    # The CSV dropped the interrupted run's rows past step 4: each step once, the resumed
    # run's values (those MLflow got last).
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 25))
    last = {}
    for s, v in losses:  # in logging order
        last[s] = v
    assert [float(r["train/loss"]) for r in rows] == [last[s] for s in range(1, 25)]


def test_a_sweeps_jobs_share_one_parent_run(tmp_path, store):
    from concurrent.futures import ProcessPoolExecutor

    from trainer.driver.tracking import PARENT_FILE, end_parent_runs, parent_run

    sweep = tmp_path / "sweep"
    # Four jobs asking at once, in processes of their own as joblib's are: one parent run.
    with ProcessPoolExecutor(2) as pool:
        ids = list(pool.map(parent_run, [store] * 4, ["sweeps"] * 4, [sweep] * 4))
    assert len(set(ids)) == 1 and (sweep / PARENT_FILE).exists()
    assert parent_run(store, "sweeps", tmp_path / "other") != ids[0]  # another sweep
    client = mlflow.MlflowClient(tracking_uri=store)
    assert client.get_run(ids[0]).info.status == "RUNNING"
    end_parent_runs(sweep)
    parent = client.get_run(ids[0])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep"


def test_logger_list_decides_tensorboard(make_cfg, tmp_path):
    from trainer.callbacks import CsvLogger, TensorBoardCallback

    kinds = {type(cb) for cb in build(make_cfg(*SMALL, "logger=[csv]"), tmp_path).callbacks}
    assert CsvLogger in kinds and TensorBoardCallback not in kinds
    kinds = {type(cb) for cb in build(make_cfg(*SMALL), tmp_path).callbacks}
    assert TensorBoardCallback in kinds and CsvLogger not in kinds


def test_a_missing_mlflow_is_one_line_naming_the_extra(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    with pytest.raises(UserError, match=r"pip install 'tape-trainer\[mlflow\]'") as e:
        build(make_cfg(*SMALL, "logger=[tensorboard,mlflow]"), tmp_path)
    assert "\n" not in str(e.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """A real ``mlflow server`` on 127.0.0.1 (a free port), its own sqlite store and artifact
    folder; up within 180 s or the test fails; killed afterwards."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)  # its own process group: the server starts uvicorn workers
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, "mlflow server exited"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server not up within 180 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its workers, nothing else
        proc.wait(timeout=30)


@pytest.mark.slow
def test_a_sweep_logs_nested_runs_to_a_real_server(tmp_path, server):
    # A git work tree as the working directory: its commit becomes each run's tag.
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()
    sweep_dir = tmp_path / "sweep"
    # Through a shell, the list quoted as docs/tracking.md shows it.
    command = (f"{shlex.quote(sys.executable)} -m trainer -m seed=0,1 data=synthetic "
               "trainer.epochs=1 callbacks=none 'logger=[mlflow]' task_name=swp "
               f"logger.mlflow.tracking_uri={server} hydra.sweep.dir={shlex.quote(str(sweep_dir))}")
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=server)
    runs = client.search_runs([client.get_experiment_by_name("swp").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if r not in parents), key=lambda r: r.info.run_name)
    assert len(parents) == 1 and [r.info.run_name for r in children] == ["0", "1"]
    parent = parents[0]
    assert parent.info.run_name == "sweep" and parent.info.status == "FINISHED"
    for i, child in enumerate(children):
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["mlflow.source.git.commit"] == commit
        assert child.info.status == "FINISHED" and child.data.params["seed"] == str(i)
        assert [s for s, _ in _history(client, child.info.run_id, "val/loss")] == [12]
        assert math.isfinite(child.data.metrics["train/loss"])
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "model.keras", "metrics.json"} <= artifacts
    assert not (sweep_dir / "mlflow.db").exists()  # the server's store, not an embedded one
