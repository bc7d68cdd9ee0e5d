"""tf.distribute: a mirrored run over two logical CPUs is the one-device run, step for step.

The same global batches reach one device and two replicas (each takes its rows of the
batch); the framework scales each replica's gradients by its share of the batch, reduces
the logs, agrees on skipped updates and counts the global step once. The comparisons run
compiled (eager debugging is for one device), with odd batch splits (an epoch's short
last batch).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from trainer import TapeStep
from trainer.common.errors import UserError
from trainer.distribute import Mirrored, NoDistribution, batch_mean
from trainer.distribute.replicas import replicated
from trainer.driver.run import build

MIRRORED = ["distribute=mirrored", "distribute.cpu_replicas=2"]
# 1437 training digits at batch 64: 22 full batches and a short one of 29 (split 14/15).
DENSE = ["+experiment=dense", "model.dropout=0.0", "callbacks=none", "data.batch_size=64",
         "trainer.steps_per_execution=7"]


def _train(make_cfg, tmp_path, name, *overrides):
    r = build(make_cfg(*overrides), tmp_path / name)
    logs = r.trainer.fit(r.step, r.data)
    weights = [v.numpy() for m in r.models.values() for v in m.weights]
    return r, logs, weights


def _compare(make_cfg, tmp_path, overrides, *, atol=1e-5, log_keys=("train/loss", "val/loss")):
    one, one_logs, one_w = _train(make_cfg, tmp_path, "one", *overrides)
    two, two_logs, two_w = _train(make_cfg, tmp_path, "two", *overrides, *MIRRORED)
    assert two.distribution.num_replicas == 2 and one.distribution.num_replicas == 1
    assert two.trainer.current_step == one.trainer.current_step
    for a, b in zip(one_w, two_w):
        np.testing.assert_allclose(b, a, atol=atol, rtol=0)
    for key in log_keys:
        assert two_logs[key] == pytest.approx(one_logs[key], abs=atol), key
    return one, two, one_logs, two_logs


def test_the_default_step_mirrored_equals_one_device(make_cfg, tmp_path):
    _, two, _, _ = _compare(
        make_cfg, tmp_path, [*DENSE, "trainer.max_steps=50"],
        log_keys=("train/loss", "train/accuracy", "train/grad_norm", "val/loss",
                  "val/accuracy"))
    # The global step advanced once per step, the optimizer applied once per step.
    assert two.trainer.current_step == 50
    assert int(two.step.optimizer.iterations.numpy()) == 50


def test_a_tf_data_source_feeds_the_replicas_as_well(make_cfg, tmp_path):
    # The streaming path (an iterator of global batches) instead of the in-memory slices.
    _compare(make_cfg, tmp_path, [*DENSE, "trainer.max_steps=30", "data.in_memory=false"])


def test_eager_debugging_is_for_one_device(make_cfg, tmp_path):
    r = build(make_cfg(*DENSE, "trainer.max_steps=2", "trainer.run_eagerly=true", *MIRRORED),
              tmp_path)
    with pytest.raises(UserError, match="run_eagerly=true is for debugging on one device"):
        r.trainer.fit(r.step, r.data)


def test_the_short_last_batch_splits_unevenly_and_still_matches(make_cfg, tmp_path):
    # 1437 examples at batch 100: the epoch ends with 37 examples, 18 and 19 per replica.
    _compare(make_cfg, tmp_path, [*DENSE, "data.batch_size=100", "trainer.epochs=2"])


@pytest.mark.parametrize("regularizer", [
    ["regularizer=input_gradient", "regularizer.input_gradient.every=3"],
    ["regularizer=jacobian_norm"],
    ["regularizer=hessian_trace"],
    ["regularizer=param_grad_norm", "regularizer.param_grad_norm.every=2"],
], ids=["input_gradient_lazy", "jacobian_norm", "hessian_trace", "param_grad_norm_lazy"])
@pytest.mark.slow
def test_a_regularizer_mirrored_equals_one_device(make_cfg, tmp_path, regularizer):
    # Per-example penalties: each replica's penalty is its rows' mean, and the share-weighted
    # sum is the global mean; random projections and probes of the inputs are drawn for the
    # global batch and sliced, so each example gets the draw one device gives it. The
    # parameter-gradient norm is of the global batch's gradient (all-reduced).
    name = regularizer[0].split("=")[1]
    _, _, one_logs, _ = _compare(make_cfg, tmp_path, [*DENSE, "trainer.max_steps=50",
                                                      *regularizer],
                                 log_keys=("train/loss", f"train/reg/{name}"))
    assert one_logs[f"train/reg/{name}"] != 0


@pytest.mark.slow
def test_a_skip_decided_on_one_replica_is_taken_by_all(make_cfg, tmp_path):
    # A tight spike rule resets some steps: the decision is made on the global batch's loss,
    # so both replicas skip (or retry) together and the run stays the one-device run.
    one, two, _, two_logs = _compare(
        make_cfg, tmp_path, [*DENSE, "trainer.max_steps=50", "tape.reset.when=[spike]",
                             "tape.reset.spike_z=0.5", "tape.reset.spike_window=5",
                             "tape.reset.action=retry"],
        log_keys=("train/loss", "train/tape/resets"))
    assert two_logs["train/tape/resets"] >= 1
    assert int(two.step.optimizer.iterations.numpy()) == int(one.step.optimizer.iterations.numpy())


@pytest.mark.slow
def test_the_gan_step_mirrored_equals_one_device(make_cfg, tmp_path):
    # Two models, two optimizers, 5 critic updates and a WGAN gradient penalty per step:
    # the generator's noise and the penalty's interpolation weights are drawn for the
    # global batch and sliced per replica. 10 steps: a WGAN-GP amplifies float rounding
    # (on one device, XLA against no XLA differ by 1e-2 after 10 steps).
    _compare(make_cfg, tmp_path, ["+experiment=gan", "callbacks=none", "trainer.max_steps=10",
                                  "trainer.steps_per_execution=5"],
             log_keys=("train/loss", "train/generator_loss", "train/grad_norm", "val/loss"))


@pytest.mark.slow
def test_jit_compile_under_a_strategy_compiles_forward_and_gradients(make_cfg, tmp_path,
                                                                      caplog):
    # A compiled update cannot reach the other replica's variables: XLA compiles the
    # forward pass and the gradients, the update runs outside it, and the log says so.
    with caplog.at_level("INFO"):
        _, two, _, _ = _compare(make_cfg, tmp_path, [*DENSE, "trainer.max_steps=20",
                                                     "trainer.jit_compile=true"])
    assert two.trainer.xla is False and two.step._jit_cache  # compiled, per step
    assert "XLA for the forward pass and gradients, the update without" in caplog.text


def test_a_step_built_outside_the_scope_is_an_error_naming_a_variable(make_cfg, tmp_path):
    # Built on one device (no scope), then given to a mirrored trainer: its replicas would
    # silently diverge, so the trainer refuses it.
    r = build(make_cfg(*DENSE, "trainer.max_steps=2"), tmp_path / "one")
    r.trainer.distribution = Mirrored(cpu_replicas=2)
    with pytest.raises(UserError, match="outside the mirrored strategy's scope"):
        r.trainer.fit(r.step, r.data)


def test_batch_mean_undoes_the_keras_division_by_the_replica_count():
    strategy = Mirrored(cpu_replicas=2).strategy
    y = tf.constant([0, 1, 2, 1])
    logits = tf.constant([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 0.0, 0.0]])
    import keras

    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    expected = float(keras_loss(y, logits))  # one device
    ours = batch_mean(keras_loss)

    def losses(batch):
        local_y, local_logits = batch
        return {"keras": keras_loss(local_y, local_logits), "ours": ours(local_y, local_logits)}

    logs = tf.function(replicated(strategy, losses))((y, logits))
    assert float(logs["ours"]) == pytest.approx(expected, rel=1e-6)
    # Keras' own value is the replica's share: half of it with two replicas.
    assert float(logs["keras"]) == pytest.approx(expected / 2, rel=1e-6)


def test_one_device_has_no_scope_and_one_replica():
    d = NoDistribution()
    assert d.num_replicas == 1 and d.is_chief and not d.distributed
    assert d.agree([7], [False]) == ([7], [False])


def test_bad_distribute_settings_are_errors(monkeypatch):
    from trainer.distribute import MultiWorker

    with pytest.raises(UserError, match="cpu_replicas=0"):
        Mirrored(cpu_replicas=0)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UserError, match="needs TF_CONFIG"):
        MultiWorker()
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(UserError, match="TF_CONFIG is not valid"):
        MultiWorker()
    with pytest.raises(UserError, match=r"distribute\.cluster"):
        MultiWorker(cluster="mpi")


def test_the_worker_index_is_read_before_tensorflow_starts(monkeypatch):
    from trainer.training.lock import worker_index_from_env

    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["a:1", "b:2", "c:3"]}, "task": {"type": "worker", "index": 2}}))
    assert worker_index_from_env() == 2
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"chief": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker",
                                                                   "index": 0}}))
    assert worker_index_from_env() == 1  # after the chief
    monkeypatch.setenv("SLURM_PROCID", "3")
    assert worker_index_from_env("slurm") == 3


def test_a_task_index_outside_the_cluster_is_an_error(monkeypatch):
    from trainer.distribute import MultiWorker

    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
         "task": {"type": "worker", "index": 5}}))
    with pytest.raises(UserError, match=r"task\.index=5 is not one of the 2 workers"):
        MultiWorker()


class ShadowMetricStep(TapeStep):
    """The default step, logging the norm of a trainable variable its loss never reads (an
    EMA-style shadow copy); it keeps what its tape watched when the gradients were taken,
    on every replica, and whether the loop asked for ``StepInfo.jit_gradients``."""

    def __init__(self, **kw):
        super().__init__(**kw)
        # Made with the step, in the strategy's scope: mirrored like the model's variables.
        self.shadow = tf.Variable([3.0, 4.0], trainable=True, name="metric_shadow")
        self.watched, self.jit_gradients = [], set()

    def train_step(self, batch, info=None):
        self.jit_gradients.add(info.jit_gradients)
        return super().train_step(batch, info)

    def compute_metrics(self, y, y_pred):
        return {**super().compute_metrics(y, y_pred), "shadow_norm": tf.norm(self.shadow)}

    def gradients(self, tape, loss, variables):
        # A mirrored variable's copies are named <name>:0 and <name>/replica_<i>:0.
        self.watched.append(sorted(v.name.split(":")[0].split("/replica_")[0]
                                   for v in tape.watched_variables()))
        return super().gradients(tape, loss, variables)


def test_jit_gradients_under_a_strategy_do_not_record_the_metrics_on_the_tape(make_cfg,
                                                                              tmp_path):
    """``jit_compile=true`` under a strategy compiles the step's forward pass and gradients on
    their own (``StepInfo.jit_gradients``): a second recording of the step's tape, whose
    metrics must be computed under ``tape.stop_recording()`` as on the step's usual path.
    Recorded, they would change no gradient; what shows is the tape watching a trainable
    variable that only a metric reads. Every replica's tape, in every trace, must watch the
    model's variables and nothing else (what one device's tape watches)."""
    r, logs, _ = _train(make_cfg, tmp_path, "two", "data=synthetic", "model.hidden_units=[8]",
                        "callbacks=none", "data.batch_size=32", "trainer.max_steps=6",
                        "trainer.steps_per_execution=3", "trainer.jit_compile=true",
                        "step._target_=tests.test_distribute.ShadowMetricStep", *MIRRORED)
    assert r.distribution.num_replicas == 2 and r.step.jit_gradients == {True}
    model = sorted(v.path for v in r.models["model"].trainable_variables)
    # Two replicas, each tracing the sampled step and the others.
    assert len(r.step.watched) >= 2 and all(w == model for w in r.step.watched), r.step.watched
    assert logs["train/shadow_norm"] == pytest.approx(5.0)
    assert r.trainer.current_step == 6
