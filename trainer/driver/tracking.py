"""The run's experiment trackers (``logger=[tensorboard,mlflow,csv]``): their callbacks from
the config, and MLflow's runs: one per Hydra job, nested under one parent run per sweep."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
from pathlib import Path

from hydra.experimental.callback import Callback as HydraCallback

from trainer.common.atomic import atomic_write
from trainer.common.errors import UserError

log = logging.getLogger(__name__)

#: The sweep directory's record of its MLflow parent runs, ``{tracking URI: run id}``.
PARENT_FILE = ".mlflow-parent.json"
_PARENT_LOCK = ".mlflow-parent.lock"
#: Files of the run directory logged as MLflow artifacts after training, when present.
ARTIFACTS = ("metrics.json", "history.jsonl")


def logger_callbacks(cfg, callbacks: list, *, build) -> list:
    """``callbacks`` with the config's ``logger`` list applied.

    ``tensorboard`` keeps the TensorBoard callback of ``callbacks`` (configured under
    ``callbacks.tensorboard``); without it in the list, that callback is left out. Every
    other entry is a node with a ``_target_``, built with ``build`` and added (the driver
    then passes an ``MlflowLogger`` what only it knows: ``configure_mlflow``).
    """
    from trainer.callbacks import TensorBoardCallback

    loggers = cfg.get("logger") or {}
    out = list(callbacks)
    if "tensorboard" not in loggers:
        out = [cb for cb in out if not isinstance(cb, TensorBoardCallback)]
    for name, node in loggers.items():
        if name == "tensorboard":
            continue
        if not (hasattr(node, "get") and node.get("_target_")):
            raise UserError(f"logger.{name} has no _target_; choose loggers with "
                            "'logger=[tensorboard,mlflow,csv]'")
        out.append(build(node))
    return out


def configure_mlflow(cb, *, params: dict, config_text: str) -> None:
    """What only the driver knows, for an ``MlflowLogger``: the run's parameters, config and
    git commit, and, for a job of a sweep (``-m``), the sweep's store (when no tracking URI
    is set), the job number as run name and the sweep's parent run."""
    cb.params = {**params, **cb.params}
    cb.config_text = cb.config_text or config_text
    commit = git_commit(_original_cwd())
    if commit:
        cb.tags.setdefault("mlflow.source.git.commit", commit)
    sweep = _sweep()
    if sweep is None:
        return
    sweep_dir, job = sweep
    if cb.tracking_uri is None:
        from trainer.callbacks.mlflow_logger import store_uri

        cb.tracking_uri = store_uri(sweep_dir)
    cb.run_name = cb.run_name or str(job)
    cb.tags.setdefault("mlflow.parentRunId",
                       parent_run(cb.tracking_uri, cb.experiment_name, sweep_dir))


def parent_run(tracking_uri: str, experiment_name: str, sweep_dir: Path) -> str:
    """The id of the sweep's parent run in ``tracking_uri``: created by the first job to ask,
    under a lock on the sweep directory, and recorded there (``PARENT_FILE``) for the others,
    whichever process or launcher runs them. The lock also keeps two jobs from creating an
    embedded store at once."""
    from trainer.callbacks.mlflow_logger import experiment_id, import_mlflow

    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    record = sweep_dir / PARENT_FILE
    with _locked(sweep_dir / _PARENT_LOCK):
        parents = json.loads(record.read_text()) if record.exists() else {}
        if tracking_uri in parents:
            return parents[tracking_uri]
        client = import_mlflow().MlflowClient(tracking_uri=tracking_uri)
        run = client.create_run(experiment_id(client, experiment_name, tracking_uri),
                                run_name=sweep_dir.name,
                                tags={"sweep_dir": str(sweep_dir.resolve())})
        parents[tracking_uri] = run.info.run_id
        text = json.dumps(parents, indent=2) + "\n"
        atomic_write(record, lambda p: Path(p).write_text(text))
        log.info("mlflow: parent run %s of sweep %s", run.info.run_id, sweep_dir)
        return run.info.run_id


def end_parent_runs(sweep_dir) -> None:
    """Mark the sweep's parent runs ``FINISHED`` (their jobs have ended)."""
    record = Path(sweep_dir) / PARENT_FILE
    if not record.exists():
        return
    from trainer.callbacks.mlflow_logger import import_mlflow

    mlflow = import_mlflow()
    for uri, run_id in json.loads(record.read_text()).items():
        mlflow.MlflowClient(tracking_uri=uri).set_terminated(run_id, "FINISHED")


class EndParentRuns(HydraCallback):
    """Hydra callback (``configs/hydra/default.yaml``): at the end of a ``-m`` sweep, in the
    sweep's own process, the MLflow parent run its jobs created is marked finished."""

    def on_multirun_end(self, config, **kwargs) -> None:
        end_parent_runs(config.hydra.sweep.dir)


def log_outputs(callbacks, run_dir) -> None:
    """The files ``write_outputs`` wrote (the models, ``metrics.json``, ``history.jsonl``) as
    artifacts of each ``MlflowLogger``'s run."""
    from trainer.callbacks import MlflowLogger

    files = [*sorted(Path(run_dir).glob("*.keras")), *(Path(run_dir) / n for n in ARTIFACTS)]
    for cb in callbacks:
        if isinstance(cb, MlflowLogger) and cb.run_id:
            cb.log_artifacts(files)


def fail_runs(callbacks) -> None:
    """Mark each ``MlflowLogger``'s run ``FAILED``: training raised (a crash, a blow-up that
    rollbacks did not cure). Best effort: the training error is the one to report."""
    from trainer.callbacks import MlflowLogger

    for cb in callbacks:
        if isinstance(cb, MlflowLogger) and cb.run_id:
            try:
                cb.end("FAILED")
            except Exception as e:  # the tracking server gone as well
                log.warning("mlflow: could not mark run %s failed: %s", cb.run_id, e)


def git_commit(directory) -> str | None:
    """The commit checked out in ``directory``'s git work tree, if it is in one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def _original_cwd() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.cwd if HydraConfig.initialized() else os.getcwd()


def _sweep() -> tuple[Path, int] | None:
    """``(sweep directory, job number)`` in a job of a ``-m`` sweep, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hydra = HydraConfig.get()
    return Path(hydra.sweep.dir), int(hydra.job.num)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive ``flock`` on ``path``, waiting for it (the kernel frees it at exit)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
