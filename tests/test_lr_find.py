"""The learning-rate finder (``trainer.training.lr_finder``, ``python -m trainer.lr_find``):
its curve against a hand-written gradient descent, compiled, eager, mirrored and
accumulated; its suggestion against a grid of fixed rates on a convex problem; no trace
left in the step; the command's files; one-line errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from trainer.common.errors import UserError
from trainer.driver.run import build
from trainer.training.lr_finder import Sweep, find_learning_rate, smooth, smooth_centered, suggest

# A linear model (no hidden layer) on 48 training rows of a linear regression problem.
LINEAR = ["data=synthetic", "data.n_samples=64", "model.hidden_units=[]", "optimizer=sgd",
          "optimizer.momentum=0.0", "callbacks=none"]


def _find(r, sweep):
    t = r.trainer
    return find_learning_rate(r.step, r.data, sweep=sweep, run_eagerly=t.run_eagerly,
                              jit_compile=t.jit_compile, accumulate_steps=t.accumulate_steps,
                              distribution=t.distribution)


def _gradient_descent(x, y, w, b, rates):
    """Full-batch gradient descent on the mean squared error at ``rates``; the loss before
    each update."""
    losses = []
    for rate in rates:
        residual = x @ w + b - y
        losses.append(float(np.mean(residual**2)))
        w = w - rate * 2 * x.T @ residual / len(x)
        b = b - rate * 2 * residual.mean(axis=0)
    return np.asarray(losses)


@pytest.mark.parametrize("overrides", [
    pytest.param([], id="compiled"), pytest.param(["trainer.run_eagerly=true"], id="eager"),
    pytest.param(["distribute=mirrored", "distribute.cpu_replicas=2"], id="mirrored",
                 marks=pytest.mark.slow),
    pytest.param(["trainer.accumulate_steps=2"], id="accumulate", marks=pytest.mark.slow)])
def test_the_curve_is_gradient_descent_at_the_swept_rates(make_cfg, tmp_path, overrides):
    # One full batch per update, no shuffle: each update's loss is known in closed form.
    r = build(make_cfg(*LINEAR, "data.batch_size=48", "data.shuffle=false", *overrides),
              tmp_path)
    w, b = (v.numpy().astype(np.float64) for v in r.models["model"].trainable_variables)
    sweep = Sweep(min_lr=1e-3, max_lr=100.0, num_steps=20, smoothing=0.5)
    curve = _find(r, sweep)
    x, y = r.data.x_train.astype(np.float64), np.asarray(r.data.y_train, np.float64)
    expected = _gradient_descent(x, y, w, b, sweep.rates())
    np.testing.assert_allclose(curve.rates, sweep.rates()[:len(curve.rates)], rtol=1e-12)
    np.testing.assert_allclose(curve.losses, expected[:len(curve.losses)], rtol=2e-4)
    np.testing.assert_allclose(curve.running, smooth(curve.losses, 0.5), rtol=1e-12)
    # Rates above 1 (twice the curvature's inverse) diverge: the sweep stops there.
    assert curve.diverged and len(curve.rates) < sweep.num_steps
    # And the model is back at its starting weights.
    start = [v.numpy() for v in r.models["model"].trainable_variables]
    assert np.array_equal(start[0], w) and np.array_equal(start[1], b)
    best = np.minimum.accumulate(curve.running)
    assert curve.running[-1] > 4 * best[-1]
    assert all(curve.running[i] <= 4 * best[i] for i in range(len(best) - 1))


def test_smoothing_by_hand():
    losses = [4.0, 2.0, 1.0]
    # Bias-corrected moving average with smoothing 0.5: 4, (0.5*2 + 2*0.5... by hand:
    # avg = 2, 2; then 1 + 1 = 2 -> 2 / 0.75; then 1 + 0.5 = 1.5 -> 1.5 / 0.875.
    np.testing.assert_allclose(smooth(losses, 0.5), [4.0, 2.0 / 0.75, 1.5 / 0.875])
    backward = smooth([1.5 / 0.875, 2.0 / 0.75, 4.0], 0.5)[::-1]
    np.testing.assert_allclose(smooth_centered(losses, 0.5), backward)
    np.testing.assert_allclose(smooth_centered(losses, 0.0), losses)
    # Steepest fall against log(rate), before the minimum (at 1.0), by central differences
    # per decade: -0.1 (one-sided), -3.0 / 2, -3.4 / 2, then -0.5 (one-sided): at 1e-1.
    rates = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    assert suggest(rates, [5.0, 4.9, 2.0, 1.5, 3.0]) == 1e-1
    assert np.isnan(suggest(rates, [1.0, 0.5, 2.0, 3.0, 4.0]))  # minimum too early


def _sgd_grid(x, y, w, b, rate, *, steps, batch_size, seed=0):
    """Minibatch SGD on the mean squared error at a fixed rate; the training loss after."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(x)) for _ in range(steps * batch_size
                                                                     // len(x) + 1)])
    for i in range(steps):
        rows = order[i * batch_size:(i + 1) * batch_size]
        residual = x[rows] @ w + b - y[rows]
        w = w - rate * 2 * x[rows].T @ residual / len(rows)
        b = b - rate * 2 * residual.mean(axis=0)
        if not np.isfinite(w).all():
            return np.inf
    return float(np.mean((x @ w + b - y) ** 2))


@pytest.mark.slow
def test_the_suggestion_is_within_3x_of_the_best_fixed_rate(make_cfg, tmp_path):
    r = build(make_cfg("data=synthetic", "data.n_samples=2000", "data.noise=0.1",
                       "model.hidden_units=[]", "optimizer=sgd", "optimizer.momentum=0.0",
                       "callbacks=none"), tmp_path)
    w, b = (v.numpy().astype(np.float64) for v in r.models["model"].trainable_variables)
    curve = _find(r, Sweep(min_lr=1e-5, max_lr=10.0, num_steps=100))
    x, y = r.data.x_train.astype(np.float64), np.asarray(r.data.y_train, np.float64)
    grid = np.geomspace(1e-4, 3.0, 31)  # steps of 1.41x
    final = [_sgd_grid(x, y, w, b, rate, steps=100, batch_size=32) for rate in grid]
    best = grid[int(np.argmin(final))]
    assert best / 3 <= curve.suggestion <= best * 3, (curve.suggestion, best)
    # Not the trivial answer: rates a decade either side of the best are worse.
    assert min(final) < 0.5 * final[int(np.argmin(final)) - 7]


def test_the_step_is_left_bit_identical(make_cfg, tmp_path):
    # Dropout (seed generators), Adam slots and iterations, a gradient-penalty regularizer.
    r = build(make_cfg("data=synthetic", "model.hidden_units=[16]", "model.dropout=0.2",
                       "regularizer=param_grad_norm", "callbacks=none"), tmp_path)
    with r.distribution.scope():
        r.step.build()
    variables = [v for m in r.models.values() for v in m.variables]
    variables += [v for o in r.step.optimizers.values() for g in o.optimizers.values()
                  for v in g.variables]
    names = [v.path for v in variables]
    assert any("seed_generator" in n for n in names) and any("iteration" in n for n in names)
    before = [v.numpy().copy() for v in variables]
    optimizer = next(iter(r.step.optimizers.values()))
    rate = float(optimizer.learning_rate)
    curve = _find(r, Sweep(min_lr=1e-4, max_lr=10.0, num_steps=30))
    assert len(curve.rates) > 5  # it trained
    after = [v.numpy() for v in variables]
    changed = [n for n, x, y in zip(names, before, after) if not np.array_equal(x, y)]
    assert not changed
    assert float(optimizer.learning_rate) == rate


def test_a_schedule_and_two_optimizers_are_refused(make_cfg, tmp_path):
    r = build(make_cfg(*LINEAR, "schedule=cosine"), tmp_path)
    with pytest.raises(UserError, match="schedule=null"):
        _find(r, Sweep())
    r = build(make_cfg("+experiment=gan", "callbacks=none"), tmp_path / "gan")
    with pytest.raises(UserError, match=r"has 2 optimizers \(.*\); the finder sweeps the rate"):
        _find(r, Sweep())


def test_the_schema_defaults_are_the_sweep_defaults():
    import dataclasses

    from trainer.driver.schemas import LrFindOptions

    options = LrFindOptions()
    for f in dataclasses.fields(Sweep):
        assert getattr(options, f.name) == f.default, f.name


def _lr_find_cfg(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_module("trainer.configs", version_base="1.3"):
        return compose("lr_find", overrides=list(overrides))


@pytest.mark.parametrize("overrides, expected", [
    (["+lr_find.min_lrr=1e-5"], "config key lr_find.min_lrr does not exist (did you mean "
                                "lr_find.min_lr?)"),
    (["lr_find.min_lr=1", "lr_find.max_lr=0.1"], "lr_find.min_lr=1.0 and lr_find.max_lr=0.1"),
    (["lr_find.num_steps=2"], "lr_find.num_steps=2 must be at least 3"),
    (["lr_find.smoothing=1"], "lr_find.smoothing=1.0 must be within [0, 1)"),
    (["lr_find.diverge_factor=1"], "lr_find.diverge_factor=1.0 must be above 1"),
])
def test_bad_settings_are_one_line_errors(make_cfg, tmp_path, overrides, expected):
    from trainer.driver.lr_sweep import lr_find

    with pytest.raises(UserError) as e:
        lr_find(_lr_find_cfg(*LINEAR, *overrides), tmp_path)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not list(tmp_path.iterdir())  # refused before anything is written


def _command(*args, cwd):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "trainer.lr_find", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_command_writes_the_curve_the_plot_and_prints_the_override(tmp_path):
    p = _command("+experiment=dense", "lr_find.num_steps=60", "hydra.run.dir=out",
                 cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "out"
    result = json.loads((out / "lr_find.json").read_text())
    rows = list(csv.DictReader((out / "lr_find.csv").open()))
    assert len(rows) == len(result["curve"]) > 10
    assert float(rows[-1]["learning_rate"]) == result["curve"][-1]["learning_rate"]
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / ".hydra" / "config.yaml").is_file()
    suggestion = result["suggestion"]
    rates = [row["learning_rate"] for row in result["curve"]]
    assert rates[0] <= suggestion <= rates[-1]
    assert result["override"] == f"optimizer.learning_rate={float(f'{suggestion:.2g}'):g}"
    assert p.stdout.splitlines()[-1].endswith(
        f"(curve and plot in out); train with {result['override']}")


def test_the_command_exits_2_with_one_line(make_cfg, tmp_path, capsys):
    from trainer.lr_find import lr_find_or_exit

    with pytest.raises(SystemExit) as e:
        lr_find_or_exit(_lr_find_cfg(*LINEAR, "lr_find.num_steps=1"))
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: lr_find.num_steps=1 must be at least 3\n"


def test_without_matplotlib_the_command_stops_first_unless_plot_is_off(make_cfg, tmp_path,
                                                                       monkeypatch):
    from trainer.driver.lr_sweep import CSV, JSON, PNG, lr_find, write_outputs

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    with pytest.raises(UserError, match=r"pip install 'tape-trainer\[plot\]'"):
        lr_find(_lr_find_cfg(*LINEAR), tmp_path)
    assert not list(tmp_path.iterdir())
    row = {"step": 0, "learning_rate": 1e-3, "loss": 1.0, "running_loss": 1.0,
           "smoothed_loss": 1.0}
    write_outputs(tmp_path, {"curve": [row], "suggestion": 1e-3}, plot=False)
    assert (tmp_path / JSON).is_file() and (tmp_path / CSV).is_file()
    assert not (tmp_path / PNG).exists()
