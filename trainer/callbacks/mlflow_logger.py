"""``MlflowLogger``: the run in MLflow (parameters, metrics, tags, artifacts), resumable."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import tensorflow as tf

from trainer.callbacks.metric_logger import MetricLogger
from trainer.common.errors import UserError

log = logging.getLogger(__name__)

#: The store a run without a tracking URI gets, in its run directory (a sweep's jobs: in the
#: sweep directory, which the driver passes as the URI).
STORE = "mlflow.db"
#: Where that store's artifacts go, beside it.
ARTIFACTS = "mlartifacts"
#: MLflow's limits on one ``log_batch`` call.
_MAX_PARAMS, _MAX_METRICS = 100, 1000


def import_mlflow():
    """``mlflow``, with its usage telemetry off (nothing leaves the machine unless a tracking
    server is named); a missing package is one ``UserError`` line."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    try:
        import mlflow
    except ImportError:
        raise UserError("logger=[...,mlflow] needs MLflow: pip install 'tape-trainer[mlflow]'"
                        ) from None
    return mlflow


def store_uri(directory) -> str:
    """The tracking URI of the embedded sqlite store in ``directory``."""
    return f"sqlite:///{Path(directory).resolve() / STORE}"


def experiment_id(client, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created if missing: in an embedded store (sqlite) with
    its artifacts in ``mlartifacts/`` beside the store, not in the working directory."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / ARTIFACTS).as_uri()
    return client.create_experiment(name, artifact_location=location)


class RunId(tf.train.experimental.PythonState):
    """The MLflow run id, in the training state: a resumed run continues the same run."""

    def __init__(self):
        self.run_id = ""

    def serialize(self) -> str:
        return json.dumps({"run_id": self.run_id})

    def deserialize(self, string_value) -> None:
        text = string_value.decode() if isinstance(string_value, bytes) else string_value
        self.run_id = json.loads(text)["run_id"]


class MlflowLogger(MetricLogger):
    """One MLflow run per fit: the run's metrics at the steps TensorBoard draws them
    (``MetricLogger``), its parameters and tags, the config and, through ``log_artifacts``,
    the files the driver writes after fit (``model.keras``, ``metrics.json``).

    The run is created at the first ``on_fit_start`` and its id saved in the training state
    (``callbacks/mlflow``): a run resumed from a checkpoint continues the same MLflow run
    (status ``RUNNING`` again). ``on_fit_end`` marks it ``FINISHED``, or ``KILLED`` when
    training was preempted; the driver marks it ``FAILED`` when training raises.

    Args:
        tracking_uri: where to log; None: ``sqlite:///<run_dir>/mlflow.db`` (``store_uri``).
        experiment_name: the MLflow experiment, created if missing.
        run_name: None: the run directory's name.
        params: the run's parameters (the flattened config); the driver sets them.
        tags: extra run tags (the git commit, the parent run of a sweep's job).
        config_text: the resolved config, logged as the artifact ``config.yaml``.
    """

    state_key = "mlflow"

    def __init__(self, *, tracking_uri: str | None = None, experiment_name: str = "train",
                 run_name: str | None = None, params: dict | None = None,
                 tags: dict | None = None, config_text: str = ""):
        import_mlflow()
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.params = dict(params or {})
        self.tags = dict(tags or {})
        self.config_text = config_text
        self._run = RunId()
        self._client = None

    @property
    def run_id(self) -> str:
        """The MLflow run's id ('' before the first fit)."""
        return self._run.run_id

    def state(self, trainer):
        return {"run": self._run}

    def on_fit_start(self, trainer):
        mlflow = import_mlflow()
        uri = self.tracking_uri or store_uri(trainer.run_dir)
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        if self.run_id:
            self._client.update_run(self.run_id, status="RUNNING")
            log.info("mlflow: continuing run %s (%s)", self.run_id, uri)
        else:
            tags = {"run_dir": str(Path(trainer.run_dir).resolve()), **self.tags}
            run = self._client.create_run(
                experiment_id(self._client, self.experiment_name, uri),
                run_name=self.run_name or Path(trainer.run_dir).resolve().name, tags=tags)
            self._run.run_id = run.info.run_id
            log.info("mlflow: run %s in experiment %s (%s)", self.run_id,
                     self.experiment_name, uri)
            if self.config_text:
                self._client.log_text(self.run_id, self.config_text, "config.yaml")
        self._log_params()

    def _log_params(self) -> None:
        """The parameters the run does not have yet: MLflow refuses to change one, so a
        resumed run with a changed value keeps the first and says so."""
        from mlflow.entities import Param

        logged = self._client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in self.params.items()
                         if k in logged and logged[k] != str(v))
        if changed:
            log.warning("mlflow: run %s keeps its first values of %s", self.run_id,
                        ", ".join(changed))
        params = [Param(k, str(v)) for k, v in self.params.items() if k not in logged]
        for i in range(0, len(params), _MAX_PARAMS):
            self._client.log_batch(self.run_id, params=params[i:i + _MAX_PARAMS])

    def write(self, step, metrics):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(points), _MAX_METRICS):
            self._client.log_batch(self.run_id, metrics=points[i:i + _MAX_METRICS])

    def on_fit_end(self, trainer, logs):
        self.end("KILLED" if trainer.preempted else "FINISHED")

    def end(self, status: str) -> None:
        """End the run with ``status`` (``FINISHED``, ``KILLED``, ``FAILED``)."""
        self._client.set_terminated(self.run_id, status)

    def log_artifacts(self, paths) -> None:
        """Each existing file of ``paths`` as an artifact of the run (at its top level)."""
        for path in paths:
            if Path(path).is_file():
                self._client.log_artifact(self.run_id, str(path))
