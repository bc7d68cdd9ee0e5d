"""python -m trainer.evaluate and python -m trainer.predict on a finished run's directory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.driver.run import run
from trainer.evaluate import main as evaluate_main
from trainer.predict import main as predict_main


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A short dense run with checkpoints, written as python -m trainer writes it."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    run_dir = tmp_path_factory.mktemp("run")
    GlobalHydra.instance().clear()
    with initialize_config_module("trainer.configs", version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=dense", "trainer.epochs=2",
                                           "~callbacks.tensorboard", "~callbacks.profile"])
    GlobalHydra.instance().clear()
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # what Hydra saves
    metrics = run(cfg, run_dir=run_dir)
    return run_dir, metrics


def test_evaluate_reports_what_training_logged_for_the_same_weights(finished, tmp_path,
                                                                     capsys):
    run_dir, metrics = finished
    out = tmp_path / "eval.json"
    assert evaluate_main([str(run_dir), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    for key in ("val/loss", "val/accuracy"):
        assert printed[key] == pytest.approx(metrics[key], abs=1e-6), key
    # The last checkpoint holds the same weights as model.keras.
    assert evaluate_main([str(run_dir), "--checkpoint", "latest"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["val/loss"] == pytest.approx(metrics["val/loss"], abs=1e-6)


@pytest.mark.parametrize("suffix", ["csv", "npz"])
def test_predict_writes_classes_and_probabilities(finished, tmp_path, suffix):
    run_dir, metrics = finished
    out = tmp_path / f"p.{suffix}"
    assert predict_main([str(run_dir), "--out", str(out)]) == 0
    if suffix == "npz":
        with np.load(out) as f:
            assert sorted(f.files) == ["prediction", "probabilities"]  # as the README says
            prediction, probabilities = f["prediction"], f["probabilities"]
        assert prediction.dtype == np.int64 and probabilities.dtype == np.float32
        assert prediction.shape == (360,)
    else:
        table = np.loadtxt(out, delimiter=",", skiprows=1)
        prediction, probabilities = table[:, 0].astype(int), table[:, 1:]
    assert probabilities.shape == (360, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    from trainer.data import Batching, digits

    y_val = digits(batching=Batching(batch_size=64)).y_val
    assert (prediction == y_val).mean() == pytest.approx(metrics["val/accuracy"], abs=1e-6)


def test_predict_on_new_inputs_and_their_errors(finished, tmp_path, capsys):
    run_dir, _ = finished
    from trainer.data import Batching, digits

    # Raw pixels (0-16, as load_digits gives them): predict scales them as training did.
    prepared = np.loadtxt(_predict(run_dir, tmp_path, "val.csv"), delimiter=",", skiprows=1)
    np.savez(tmp_path / "new.npz", x=digits(batching=Batching(batch_size=64)).x_val[:5] * 16.0)
    new = np.loadtxt(_predict(run_dir, tmp_path, "new.csv", "--input",
                              str(tmp_path / "new.npz")), delimiter=",", skiprows=1)
    np.testing.assert_allclose(new, prepared[:5], atol=1e-5)
    np.savez(tmp_path / "wide.npz", x=np.zeros((2, 63)))
    capsys.readouterr()
    assert predict_main([str(run_dir), "--input", str(tmp_path / "wide.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: inputs have features of shape (63,), the run's model takes (64,); "
                   "check --input (and the run's data config)")


def _predict(run_dir, tmp_path, name, *argv):
    assert predict_main([str(run_dir), *argv, "--out", str(tmp_path / name)]) == 0
    return tmp_path / name


@pytest.mark.parametrize(("argv", "message"), [
    (["{missing}"], "no such run directory"),
    (["{empty}"], "not a run directory (no .hydra/config.yaml)"),
])
def test_a_missing_or_foreign_run_dir_is_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for a in argv]
    assert evaluate_main(argv) == 2 and predict_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(message in line for line in err)


def test_evaluate_weighs_as_training_did_and_reports_the_keras_metrics(tmp_path, capsys):
    # Weighted validation rows (an npz's w_val) and a Keras metric: evaluate's values are
    # the weighted ones training logged, AUC included.
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from trainer.data import digits

    d = digits()
    rng = np.random.default_rng(0)
    path = tmp_path / "weighted.npz"
    np.savez(path, x=d.x_train, y=d.y_train, x_val=d.x_val, y_val=d.y_val,
             w=rng.uniform(0, 2, len(d.x_train)), w_val=rng.uniform(0, 2, len(d.x_val)))
    run_dir = tmp_path / "run"
    GlobalHydra.instance().clear()
    with initialize_config_module("trainer.configs", version_base="1.3"):
        cfg = compose("config", overrides=[
            "+experiment=dense", "data=npz", f"data.path={path}", "data.w_key=w",
            "trainer.epochs=1", "~callbacks.tensorboard", "~callbacks.profile",
            "metrics=[{_target_: keras.metrics.AUC}]"])
    GlobalHydra.instance().clear()
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    metrics = run(cfg, run_dir=run_dir)
    assert evaluate_main([str(run_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    for key in ("val/loss", "val/accuracy", "val/auc"):
        assert printed[key] == pytest.approx(metrics[key], abs=1e-6), key


@pytest.mark.parametrize(("units", "message"), [
    ("[256,128,10]", "holds no weights for some of this model's variables"),
    ("[64,128]", "incompatible tensor with shape (64, 256)"),
])
def test_a_checkpoint_that_does_not_fit_the_model_is_refused(finished, capsys, units,
                                                            message):
    """An override that adds a layer (of the output's width, so every shape still fits)
    leaves variables the checkpoint has no value for; one that narrows a layer changes a
    shape: one line each, not an evaluation of random weights or a traceback."""
    run_dir, _ = finished
    argv = [str(run_dir), f"model.hidden_units={units}", "--checkpoint", "latest"]
    assert evaluate_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "pass a checkpoint of this run" in err[0]
