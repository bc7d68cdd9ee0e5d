"""Sweeps: the Optuna search (configs/hparams_search/), the joblib and submitit launchers,
Optuna's sqlite storage, the sweep summary (python -m trainer.summary) and the HParams keys."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from tests.helpers import cli
from trainer.driver.run import flat_hparams
from trainer.summary import main as summary_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# A dense run of a few seconds.
TINY = ["+experiment=dense", "trainer.epochs=2", "data.batch_size=128", "callbacks=none"]
SEARCH = ["hparams_search=dense_optuna", "hydra.sweeper.n_trials=4"]


def summary(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "trainer.summary", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def table(stdout: str) -> list[list[str]]:
    """The rows of a summary below its ``job`` header, split on whitespace."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("job "))
    return [line.split() for line in lines[start + 1:]]


def runs_with_metrics(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}


# --- HParams -------------------------------------------------------------------------------
def test_flat_hparams_leaves_out_how_nodes_are_built():
    container = {
        "model": {"_target_": "trainer.models.mlp", "_partial_": True, "hidden_units": [8, 4],
                  "dropout": 0.1},
        "optimizer": {"_target_": "keras.optimizers.Adam",
                      "learning_rate": {"_target_": "keras.optimizers.schedules.CosineDecay",
                                        "initial_learning_rate": 0.01, "_convert_": "all"}},
        "callbacks": {"tensorboard": {"_target_": "trainer.TensorBoardCallback"}},
        "seed": 3, "optimized_metric": None,
    }
    assert flat_hparams(container) == {
        "model.hidden_units": "[8, 4]", "model.dropout": 0.1,
        "optimizer.learning_rate.initial_learning_rate": 0.01, "seed": 3,
    }


def test_the_hparams_of_the_dense_experiment_have_no_target_or_partial(make_cfg):
    from omegaconf import OmegaConf

    hparams = flat_hparams(OmegaConf.to_container(make_cfg("+experiment=dense"), resolve=True))
    assert not [k for k in hparams if {"_target_", "_partial_"} & set(k.split("."))]
    assert hparams["optimizer.learning_rate"] == pytest.approx(1e-3)
    assert hparams["model.dropout"] == pytest.approx(0.1)
    assert hparams["model.hidden_units"] == "[256, 128]"


# --- the search's config -------------------------------------------------------------------
def test_dense_optuna_is_an_optuna_search_maximising_val_accuracy(make_cfg):
    cfg = make_cfg("+experiment=dense", "hparams_search=dense_optuna", return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.direction == "maximize" and cfg.optimized_metric == "val/accuracy"
    assert set(sweeper.params) == {"optimizer.learning_rate", "model.hidden_units",
                                   "model.dropout"}
    assert "log" in sweeper.params["optimizer.learning_rate"]
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"


def test_without_a_search_the_sweeper_is_hydras_basic_one(make_cfg):
    # A search space in the root config would break plain -m sweeps ("BasicSweeper does
    # not support sweep type : INTERVAL_SWEEP"): it lives in hparams_search/ alone.
    cfg = make_cfg("+experiment=dense", return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
    assert not cfg.hydra.sweeper.params


def test_the_hparams_search_group_is_optional(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs, ignore=shutil.ignore_patterns("hparams_search"))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(configs), version_base="1.3"):
            cfg = compose("config", overrides=["+experiment=dense"])
    finally:
        GlobalHydra.instance().clear()
    assert cfg.optimized_metric == "val/accuracy"


def test_launchers_and_the_optuna_sweeper_are_installed():
    p = cli("--hydra-help", cwd=Path.cwd(), timeout=120)
    assert p.returncode == 0, p.stderr
    lines = {line.split(":")[0]: line for line in p.stdout.splitlines() if ":" in line}
    assert "optuna" in lines["hydra/sweeper"]
    for launcher in ("joblib", "submitit_local", "submitit_slurm"):
        assert launcher in lines["hydra/launcher"]


def test_optuna_keeps_a_study_in_sqlite(tmp_path):
    # Optuna 2.10 with SQLAlchemy 2 fails here ("assert version is not None"): the sweep
    # extra pins sqlalchemy<2 and alembic<1.14.
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    again = optuna.create_study(storage=storage, study_name="s", direction="maximize",
                                load_if_exists=True)
    assert len(again.trials) == 2 and again.best_value == study.best_value


# --- the summary ---------------------------------------------------------------------------
def fake_run(root: Path, name: str, overrides: list[str], metrics: dict | None,
             optimized_metric: str | None = "val/accuracy", direction: str | None = None):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"optimized_metric": optimized_metric, "seed": 0}))
    sweeper = {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper",
               "direction": direction, "n_trials": 8} if direction else {"params": None}
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": sweeper}}))
    if metrics is not None:
        (run / "metrics.json").write_text(json.dumps(metrics))
    return run


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    common = ["+experiment=dense", "trainer.epochs=2"]
    for job, (lr, acc, loss) in enumerate([(1e-3, 0.8, 0.9), (3e-3, 0.95, 0.2),
                                           (1e-2, 0.9, 0.1)]):
        fake_run(root, str(job), [f"optimizer.learning_rate={lr}", *common],
                 {"val/accuracy": acc, "val/loss": loss, "train/loss": loss, "step": 10,
                  "time/fit_seconds": 1.5, "params/trainable": 100})
    fake_run(root, "3", ["optimizer.learning_rate=0.1", *common], None)  # failed
    fake_run(root, "4", ["optimizer.learning_rate=0.2", *common], None)  # still running
    (root / "4" / ".trainer.lock").write_text(f"process {os.getpid()} on {os.uname().nodename}")
    return root


def test_summary_sorts_by_the_optimized_metric_and_marks_unfinished_runs(sweep, capsys):
    assert summary_main([str(sweep)]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    assert [row[0] for row in rows] == ["1", "2", "0", "3", "4"]
    assert rows[0][1:3] == ["0.9500", "0.2000"]  # the objective first, then val/loss
    assert rows[3][1] == "failed" and rows[4][1] == "running"
    assert rows[0][-1] == "optimizer.learning_rate=0.003"  # the shared overrides are above
    assert "all runs: +experiment=dense trainer.epochs=2" in out
    assert "5 runs (3 done, 1 running, 1 failed)" in out
    assert "(max, from the metric's name)" in out
    assert "params/trainable" not in out


def test_summary_takes_the_direction_from_the_sweeper(tmp_path, capsys):
    # Optuna maximised val/loss here (a contrived sweep): its direction beats the name.
    for job, loss in enumerate([0.1, 0.3, 0.2]):
        fake_run(tmp_path, str(job), [f"seed={job}"], {"val/loss": loss},
                 optimized_metric="val/loss", direction="maximize")
    assert summary_main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert [row[0] for row in table(out)] == ["1", "2", "0"]
    assert "(max, from hydra.sweeper.direction)" in out and "of 8 trials" in out
    # The sweeper's direction is the objective's, not any other metric's.
    assert summary_main([str(tmp_path), "--mode", "min"]) == 0
    assert [row[0] for row in table(capsys.readouterr().out)] == ["0", "2", "1"]


def test_summary_breaks_a_tie_on_the_objective_by_the_loss(tmp_path, capsys):
    # Equal accuracies (a small validation set): the lower val/loss first, a run without
    # one last, then the job order; a better objective still wins whatever its loss.
    for job, loss in enumerate([0.5, 0.3, None, 0.3, 0.4]):
        metrics = {"val/accuracy": 0.9, **({"val/loss": loss} if loss is not None else {})}
        fake_run(tmp_path, str(job), [f"seed={job}"], metrics)
    fake_run(tmp_path, "5", ["seed=5"], {"val/accuracy": 0.95, "val/loss": 0.9})
    assert summary_main([str(tmp_path)]) == 0
    assert [row[0] for row in table(capsys.readouterr().out)] == ["5", "1", "3", "4", "0", "2"]
    # Lower loss first whichever way the objective is sorted.
    assert summary_main([str(tmp_path), "--mode", "min"]) == 0
    assert [row[0] for row in table(capsys.readouterr().out)] == ["1", "3", "4", "0", "2", "5"]


def test_summary_metric_and_mode_options(sweep, capsys):
    assert summary_main([str(sweep), "--metric", "val/loss"]) == 0
    assert [row[0] for row in table(capsys.readouterr().out)][:3] == ["2", "1", "0"]
    assert summary_main([str(sweep), "--metric", "val/accuracy", "--mode", "min"]) == 0
    assert [row[0] for row in table(capsys.readouterr().out)][:3] == ["0", "2", "1"]
    assert summary_main([str(sweep), "--metric", "val/auc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no run has 'val/auc'") and err.count("\n") == 1


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_summary_of_no_sweep_exits_2_with_one_line(tmp_path, kind):
    directory = tmp_path / "sweep"
    if kind == "empty":
        (directory / "0").mkdir(parents=True)  # no .hydra/: not a run
    p = summary(directory)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.startswith(f"error: {directory}") and p.stderr.count("\n") == 1


def test_summary_does_not_import_tensorflow(sweep):
    code = ("import sys; from trainer.summary import main; main([sys.argv[1]]); "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    p = subprocess.run([sys.executable, "-c", code, str(sweep)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr


# --- real sweeps ---------------------------------------------------------------------------
@pytest.mark.slow
def test_optuna_search_with_two_joblib_workers(tmp_path):
    sweep = tmp_path / "sweep"
    p = cli("-m", *TINY, *SEARCH, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = runs_with_metrics(sweep)
    assert sorted(runs) == ["0", "1", "2", "3"]
    for job in runs:
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        params = dict(o.split("=", 1) for o in overrides)
        assert 1e-4 <= float(params["optimizer.learning_rate"]) <= 1e-2
        assert 0 <= float(params["model.dropout"]) <= 0.5
        assert params["model.hidden_units"] in ("[64,32]", "[128,64]", "[256,128]", "[512,256]")
    # Two worker processes, neither of them the sweep's own.
    pids = {(sweep / job / ".trainer.lock").read_text().split()[1] for job in runs}
    assert len(pids) == 2
    best = max(runs, key=lambda job: runs[job]["val/accuracy"])
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(runs[best]["val/accuracy"], rel=1e-9)

    s = summary(sweep)
    assert s.returncode == 0, s.stderr
    rows = table(s.stdout)
    assert [row[0] for row in rows] == sorted(runs, key=lambda j: -runs[j]["val/accuracy"])
    assert [float(row[1]) for row in rows] == pytest.approx(
        sorted((m["val/accuracy"] for m in runs.values()), reverse=True), abs=1e-4)
    assert "4 runs (4 done, of 4 trials)" in s.stdout


@pytest.mark.slow
def test_a_plain_multirun_sweep_works_without_the_hparams_search_files(tmp_path):
    configs, sweep = tmp_path / "configs", tmp_path / "sweep"
    shutil.copytree(CONFIGS, configs, ignore=shutil.ignore_patterns("hparams_search"))
    p = cli("-m", f"--config-path={configs}", *TINY, "trainer.max_steps=2",
            "optimizer.learning_rate=1e-3,3e-3", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
            timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(runs_with_metrics(sweep)) == ["0", "1"]
    s = summary(sweep)
    assert s.returncode == 0, s.stderr
    assert "from the metric's name" in s.stdout and len(table(s.stdout)) == 2


@pytest.mark.slow
def test_optuna_trial_on_submitit_local_kept_in_sqlite(tmp_path):
    import optuna

    sweep, db = tmp_path / "sweep", tmp_path / "optuna.db"
    p = cli(*TINY, "trainer.max_steps=2", "hparams_search=dense_optuna",  # MULTIRUN: no -m
            "hydra.sweeper.n_trials=1", "hydra.sweeper.n_jobs=1",
            "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=3",
            f"hydra.sweeper.storage=sqlite:///{db}", f"hydra.sweep.dir={sweep}",
            cwd=tmp_path, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = runs_with_metrics(sweep)
    assert list(runs) == ["0"]
    assert any((sweep / ".submitit").glob("*/*_log.out"))  # run as a submitit job
    study = optuna.load_study(study_name="dense", storage=f"sqlite:///{db}")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.value == pytest.approx(runs["0"]["val/accuracy"], rel=1e-9)


@pytest.mark.slow
def test_a_failing_job_does_not_end_the_sweep(tmp_path):
    # Job 0's batch is larger than the data (a UserError): it prints its one line and
    # returns NaN (a failed trial to Optuna); job 1 still runs.
    sweep = tmp_path / "sweep"
    p = cli("-m", *TINY, "trainer.max_steps=2", "data.batch_size=100000,64",
            f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "error: " in p.stderr and "data.batch_size=100000" in p.stderr
    assert sorted(runs_with_metrics(sweep)) == ["1"]
