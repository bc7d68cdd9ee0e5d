"""The loop: steps counted, callbacks in order, eager equals compiled, no retracing."""

import keras
import numpy as np
import pytest

from tests.helpers import fit_linear, linear_model, regression_data
from trainer import Callback, EarlyStopping, TapeStep, Trainer


def test_steps_and_callback_order(recorder):
    # 100 examples, batch 16 -> 7 steps per epoch (the last one short); 4 steps per execution.
    trainer, _, logs = fit_linear(epochs=2, spe=4, callbacks=[recorder])
    assert trainer.current_step == 14
    assert logs["step"] == 14 and logs["epoch"] == 2
    assert recorder.calls == [
        ("fit_start", 0),
        ("epoch_start", 0), ("execution_end", 4), ("execution_end", 7), ("epoch_end", 0),
        ("epoch_start", 1), ("execution_end", 11), ("execution_end", 14), ("epoch_end", 1),
        ("fit_end", 14),
    ]


def test_max_steps_stops_mid_epoch(recorder):
    trainer, _, logs = fit_linear(epochs=5, spe=4, max_steps=10, callbacks=[recorder])
    assert trainer.current_step == 10
    executions = [s for hook, s in recorder.calls if hook == "execution_end"]
    assert executions == [4, 7, 10]
    assert "val/loss" in logs


def test_eager_equals_compiled_equals_xla():
    runs = {
        mode: fit_linear(run_eagerly=mode == "eager", jit_compile=mode == "xla", epochs=3)
        for mode in ("eager", "compiled", "xla")
    }
    weights = {m: [v.numpy() for v in model.variables] for m, (_, model, _) in runs.items()}
    for mode in ("compiled", "xla"):
        for a, b in zip(weights["eager"], weights[mode]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert runs[mode][2]["val/loss"] == pytest.approx(runs["eager"][2]["val/loss"], rel=1e-5)
    assert runs["compiled"][2]["train/loss"] < 0.3  # it actually learned: ~3 -> ~0.1


@pytest.mark.parametrize("jit_compile", [False, True])
def test_no_retracing_across_epochs_or_on_the_short_last_batch(jit_compile):
    # 7 steps per epoch with 4 per execution: executions of 4 and 3 steps, a short last batch.
    trainer, _, _ = fit_linear(epochs=1, jit_compile=jit_compile)
    after_first_epoch = trainer.trace_count
    # The train and eval executions, and under XLA each one's short last batch, once each.
    assert after_first_epoch == (4 if jit_compile else 2)
    trainer, _, _ = fit_linear(epochs=4, jit_compile=jit_compile)
    assert trainer.trace_count == after_first_epoch


def test_epoch_train_metrics_are_example_weighted_means():
    data = regression_data(n=100, batch_size=16)
    trainer, _, logs = fit_linear(epochs=1, spe=1, data=data)
    assert trainer.current_step == 7
    # Evaluation over the validation set equals a direct computation on the final weights.
    model = trainer.step.model
    pred = model(data.x_val).numpy()
    assert logs["val/loss"] == pytest.approx(float(np.mean((pred - data.y_val) ** 2)), rel=1e-5)


def test_early_stopping_sets_stop_training():
    stopper = EarlyStopping(monitor="val/loss", patience=1, min_delta=1e9)
    _, _, logs = fit_linear(epochs=10, callbacks=[stopper])
    assert stopper.stopped_epoch == 1
    assert logs["epoch"] == 2


def test_nan_loss_stops_with_a_clear_error():
    data = regression_data()
    data.y_train[:] = 1e30
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        fit_linear(epochs=1, data=data)


class _ExecutionLogs(Callback):
    """Keeps the logs of every execution."""

    def __init__(self):
        self.logs = []

    def on_execution_end(self, trainer, step, logs):
        self.logs.append(dict(logs))


@pytest.mark.parametrize("mode", ["eager", "compiled", "xla"])
def test_epoch_train_logs_are_example_weighted_means_over_the_whole_epoch(mode):
    """The epoch's ``train/*`` is the mean over every example of the epoch: not the last
    execution's, and not the plain mean of batch means (the short last batch weighs less).

    With learning rate 0 the weights never change, so the expectation is the per-example
    loss on the fixed weights averaged over the whole training set, whatever the order.
    """
    data = regression_data(n=100, batch_size=16)  # 6 full batches and a short one of 4
    model = linear_model()
    step = TapeStep(model=model, optimizer=keras.optimizers.SGD(0.0), task="regression")
    executions = _ExecutionLogs()
    trainer = Trainer(epochs=1, steps_per_execution=3, run_eagerly=mode == "eager",
                      jit_compile=mode == "xla", callbacks=[executions])
    logs = trainer.fit(step, data)
    assert trainer.current_step == 7 and len(executions.logs) == 3  # 3 + 3 + 1 steps
    err = model(data.x_train).numpy().astype("float64") - data.y_train
    expected = {"train/loss": np.mean(err**2), "train/mae": np.mean(np.abs(err))}
    for key, value in expected.items():
        assert logs[key] == pytest.approx(value, rel=1e-6), key
    # The test can tell: the last execution alone (the short batch) is far from the mean.
    assert executions.logs[-1]["train/loss"] != pytest.approx(expected["train/loss"], rel=1e-2)
