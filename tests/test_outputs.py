"""The driver's outputs: atomic metrics.json and model.keras, the value returned to sweepers."""

import json
import math
from pathlib import Path

import keras
import pytest

from trainer import TapeStep
from trainer.driver.run import run, run_or_exit

# A run of two steps on tiny data, with no callbacks: it writes model.keras and metrics.json.
TINY = ["data=synthetic", "model.hidden_units=[4]", "trainer.epochs=1", "trainer.max_steps=2",
        "trainer.steps_per_execution=1", "callbacks=none"]


def _files(run_dir: Path) -> dict:
    """The run directory's top-level files and their bytes."""
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}


def test_a_model_save_failing_midway_leaves_the_previous_outputs_intact(
    make_cfg, tmp_path, monkeypatch
):
    """model.keras is written to a temporary file and renamed: a save that dies after
    writing part of the file leaves the previous model.keras (and metrics.json) as they
    were, and no temporary file behind."""
    run(make_cfg(*TINY), run_dir=tmp_path)
    previous = _files(tmp_path)
    assert {"model.keras", "metrics.json"} <= set(previous)

    def save_half_then_fail(self, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(keras.Model, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        run(make_cfg(*TINY, "seed=1"), run_dir=tmp_path)
    assert _files(tmp_path) == previous
    monkeypatch.undo()
    assert keras.models.load_model(tmp_path / "model.keras").count_params() > 0


def test_a_metrics_write_failing_midway_leaves_the_previous_file_intact(
    make_cfg, tmp_path, monkeypatch
):
    """metrics.json likewise: a write that dies halfway leaves the previous file whole
    (still valid JSON) and no temporary file behind."""
    run(make_cfg(*TINY), run_dir=tmp_path)
    previous = (tmp_path / "metrics.json").read_bytes()
    write_text = Path.write_text

    def write_half_then_fail(self, data, *args, **kwargs):
        write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        run(make_cfg(*TINY, "seed=1"), run_dir=tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "metrics.json").read_bytes() == previous
    assert json.loads(previous)["step"] == 2
    # The run's files (the lock, the history) and no temporary one.
    assert sorted(_files(tmp_path)) == [".trainer.lock", "history.jsonl", "metrics.json",
                                        "model.keras"]


class NanScoreStep(TapeStep):
    """The default step, plus a final metric that came out NaN."""

    def final_metrics(self, data) -> dict:
        return {"custom/score": math.nan}


def test_optimized_metric_is_returned_to_the_sweeper(make_cfg, tmp_path, monkeypatch):
    """``run_or_exit`` returns the value of ``optimized_metric`` that metrics.json holds."""
    monkeypatch.chdir(tmp_path)  # no Hydra run directory: outputs go to the working directory
    value = run_or_exit(make_cfg(*TINY, "optimized_metric=val/loss"))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert math.isfinite(saved["val/loss"])
    assert value == saved["val/loss"]


def test_a_non_finite_optimized_metric_is_returned_as_nan(make_cfg, tmp_path, monkeypatch):
    """A sweeper must not pick a NaN run, minimising or maximising: Optuna records a NaN
    objective as a failed trial (an infinity would be the best when maximising)."""
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg(*TINY, "step._target_=tests.test_outputs.NanScoreStep",
                   "optimized_metric=custom/score")
    assert math.isnan(run_or_exit(cfg))


def test_an_unknown_optimized_metric_exits_2_naming_it(make_cfg, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_or_exit(make_cfg(*TINY, "optimized_metric=val/accuracy_typo"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "val/accuracy_typo" in err and "val/loss" in err  # names it and what exists


# A run whose validation loss is lowest before its last epoch (a rate high enough to overshoot).
OVERSHOOT = ["data=synthetic", "data.task=classification", "optimizer.learning_rate=0.3",
             "trainer.epochs=6", "trainer.steps_per_execution=4", "callbacks.progress.mode=log",
             "callbacks.tensorboard.histogram_every_n_steps=0"]
KERAS_STOP = ("+callbacks.keras.callbacks=[{_target_: keras.callbacks.EarlyStopping, "
              "monitor: val_loss, patience: 100, restore_best_weights: true}]")


@pytest.mark.parametrize("how", [
    ["callbacks.checkpoint.monitor=val/loss"],
    ["callbacks=early_stopping", "callbacks.early_stopping.patience=100",
     "callbacks.early_stopping.restore_best_weights=true"],
    ["+callbacks.keras._target_=trainer.KerasCallbacks", KERAS_STOP],
], ids=["best_checkpoint", "early_stopping", "keras_early_stopping"])
def test_metrics_describe_the_weights_that_are_shipped(make_cfg, tmp_path, how):
    """With best weights restored at the end, metrics.json and the sweep's value are the
    best epoch's (what model.keras gives when evaluated), the last epoch's under last/."""
    from omegaconf import OmegaConf

    from trainer.driver.inference import evaluate
    from trainer.driver.load import load_run

    cfg = make_cfg(*OVERSHOOT, *how)
    metrics = run(cfg, run_dir=tmp_path)
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    best = min(history, key=lambda logs: logs["val/loss"])
    assert best["epoch"] < history[-1]["epoch"]  # the case at issue: best is not last
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["epoch"] == best["epoch"] and metrics["step"] == best["step"]
    for key in ("val/loss", "val/accuracy", "train/loss"):
        assert metrics[key] == best[key]
        assert metrics[f"last/{key}"] == history[-1][key]
    (tmp_path / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    shipped = load_run(str(tmp_path))
    assert evaluate(shipped, shipped.data.validation_batches())["val/loss"] == pytest.approx(
        metrics["val/loss"], rel=1e-6)


def test_metrics_are_the_last_epochs_when_the_last_weights_are_shipped(make_cfg, tmp_path):
    metrics = run(make_cfg(*OVERSHOOT), run_dir=tmp_path)
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert metrics["val/loss"] == history[-1]["val/loss"] and metrics["epoch"] == 6
    assert not any(k.startswith("last/") for k in metrics)
