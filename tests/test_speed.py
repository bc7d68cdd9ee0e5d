"""The speed features: in-memory fused loop, auto steps per execution, XLA, profiling, and
the cheap summaries and checkpoints. Behaviour only: speed is measured in benchmarks/."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import fit_linear, linear_model, regression_data
from trainer import CheckpointCallback, ProfileCallback, TapeStep, Trainer
from trainer.common.errors import UserError
from trainer.compile.executions import make_execution, train_step_functions
from trainer.compile.pacing import BAND_SECONDS, FIRST_STEPS, Pacing, check_steps_per_execution
from trainer.compile.plan import CompilePlan
from trainer.data import Batching, DataModule
from trainer.data import base as data_base
from trainer.data.sources import IteratorSource, TensorSource, epoch_permutation
from trainer.step.tape import global_norm


# --- the sampled gradient norm ----------------------------------------------------------
class _FlagStep(TapeStep):
    """Records ``info.sampled`` at every call (eager) or trace (compiled)."""

    flags: list

    def train_step(self, batch, info=None):
        self.flags.append(info.sampled)
        return super().train_step(batch, info)


@pytest.mark.parametrize("mode", ["eager", "compiled", "xla"])
def test_grad_norm_is_the_first_step_of_each_execution_and_only_computed_there(mode):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = rng.normal(size=(32, 1)).astype("float32")
    model = linear_model()
    step = _FlagStep(model=model, optimizer=keras.optimizers.SGD(0.1), task="regression")
    step.flags = []
    step.build()
    source = TensorSource(x, y, batch_size=8, shuffle=False)
    global_step = tf.Variable(0, dtype=tf.int64)
    options = CompilePlan(run_eagerly=mode == "eager", update_xla=mode == "xla")
    run = make_execution(train_step_functions(step, global_step), source.next, options,
                         xla_loop=mode == "xla")
    for first in (0, 3):  # two executions of 3 steps: batches 0-2, then 3, 0, 1
        w, b = (v.numpy() for v in model.trainable_variables)
        xb, yb = x[first * 8:(first + 1) * 8], y[first * 8:(first + 1) * 8]
        r = xb @ w + b - yb
        expected = np.sqrt(((2 / 8 * xb.T @ r) ** 2).sum() + ((2 / 8 * r.sum(0)) ** 2).sum())
        means, state = run(3)
        assert "grad_norm" not in means
        assert state["grad_norm"] == pytest.approx(expected, rel=1e-4)
    # Eagerly the flag is read at each of the 6 steps; compiled, at the two traces.
    assert step.flags == ([True, False, False] * 2 if mode == "eager" else [True, False])


# --- the in-memory source ---------------------------------------------------------------
def _iterator_batches(data, epochs):
    it = iter(data.train_dataset())
    return [next(it) for _ in range(epochs * data.steps_per_epoch("train"))]


def _tensor_batches(data, epochs):
    src = data.train_source()
    assert isinstance(src, TensorSource)
    out = []
    for epoch in range(epochs):
        src.start_epoch(epoch)
        out += [src.next() for _ in range(src.full_batches)]
        if src.tail:
            out.append(src.next_any())
    return out


@pytest.mark.parametrize("shuffle", [True, False])
def test_both_sources_give_the_same_batches_in_the_same_order(shuffle):
    data = regression_data(n=50, batch_size=16, seed=3, shuffle=shuffle)  # 3 full + 2 short
    a, b = _iterator_batches(data, 3), _tensor_batches(data, 3)
    assert len(a) == len(b) == 12
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())
    sizes = [len(x) for x, _ in b]
    assert sizes == [16, 16, 16, 2] * 3  # the short last batch is kept, not dropped or padded
    epoch = np.concatenate([x.numpy() for x, _ in b[:4]])
    np.testing.assert_array_equal(np.sort(epoch, axis=0), np.sort(data.x_train, axis=0))


def test_permutation_is_a_function_of_seed_and_epoch():
    p = epoch_permutation(20, 1, 0).numpy()
    np.testing.assert_array_equal(p, epoch_permutation(20, 1, 0).numpy())
    assert sorted(p) == list(range(20))
    assert not np.array_equal(p, epoch_permutation(20, 1, 1).numpy())
    assert not np.array_equal(p, epoch_permutation(20, 2, 0).numpy())
    graph = tf.function(lambda e: epoch_permutation(20, 1, e))
    np.testing.assert_array_equal(p, graph(tf.constant(0, tf.int64)).numpy())


@pytest.mark.parametrize("mode", ["compiled", "xla", "eager"])
def test_in_memory_and_streaming_give_the_same_training(mode):
    kw = dict(run_eagerly=mode == "eager", jit_compile=mode == "xla", epochs=3)
    runs = {}
    for in_memory in (True, False):
        data = regression_data(n=100, batch_size=16, in_memory=in_memory)  # short last batch
        trainer, model, logs = fit_linear(data=data, **kw)
        kind = type(trainer.data_plan.train)
        assert kind is (TensorSource if in_memory else IteratorSource)
        runs[in_memory] = ([v.numpy() for v in model.weights], logs)
    (w_mem, logs_mem), (w_it, logs_it) = runs[True], runs[False]
    for a, b in zip(w_mem, w_it):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key in ("train/loss", "val/loss", "step"):
        assert logs_mem[key] == pytest.approx(logs_it[key], rel=1e-5)


def test_in_memory_auto_follows_the_size_bound_and_overrides(monkeypatch):
    data = regression_data()
    assert data.in_memory == "auto" and isinstance(data.train_source(), TensorSource)
    assert isinstance(data.val_source(), TensorSource)
    monkeypatch.setattr(data_base, "IN_MEMORY_MAX_BYTES", 100)
    assert isinstance(data.train_source(), IteratorSource)
    assert isinstance(regression_data(in_memory=True).train_source(), TensorSource)

    class Streamed(DataModule):
        def train_dataset(self):  # a custom pipeline: auto must not bypass it
            return super().train_dataset()

    monkeypatch.setattr(data_base, "IN_MEMORY_MAX_BYTES", 1 << 30)
    x = np.zeros((8, 2), "float32")
    custom = Streamed(train=(x, x[:, :1]), val=(x, x[:, :1]), task="regression",
                      batching=Batching(batch_size=4))
    assert isinstance(custom.train_source(), IteratorSource)
    with pytest.raises(UserError, match=r"data\.in_memory='yes' must be auto, true or false"):
        regression_data(in_memory="yes")


# --- no retracing -----------------------------------------------------------------------
@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("spe", [4, "auto"])
def test_trace_count_stays_constant_after_the_first_epoch(in_memory, jit_compile, spe):
    def traces(epochs):
        data = regression_data(n=100, batch_size=16, in_memory=in_memory)
        trainer, _, _ = fit_linear(data=data, epochs=epochs, spe=spe, jit_compile=jit_compile)
        return trainer.trace_count

    first = traces(1)
    # Train and eval; in memory under XLA also each one's short last batch.
    assert first == (4 if in_memory and jit_compile else 2)
    assert traces(5) == first


@pytest.mark.parametrize("jit_compile", [False, True])
def test_executions_call_their_traced_graph_without_the_tf_function_dispatch(
        monkeypatch, jit_compile):
    # A tf.function's own dispatch (binding the arguments, looking up the trace) costs about
    # as much as a few steps of a small model; an execution pays it on its first call only.
    from tensorflow.python.eager.polymorphic_function import polymorphic_function

    calls = []
    dispatch = polymorphic_function.Function.__call__

    def counted(self, *args, **kwargs):
        calls.append(self._name)
        return dispatch(self, *args, **kwargs)

    monkeypatch.setattr(polymorphic_function.Function, "__call__", counted)
    data = regression_data(n=100, batch_size=16, in_memory=True)
    trainer, _, _ = fit_linear(data=data, epochs=1, spe=2, jit_compile=jit_compile)
    first = len(calls)
    assert first > 0  # the first calls trace through the tf.function
    trainer.epochs = 6
    trainer.fit(trainer.step, data)
    # Five more epochs of executions and evaluations: no dispatch at all.
    assert trainer.current_step == 6 * trainer.steps_per_epoch
    assert len(calls) == first, calls[first:]


def test_fit_again_continues_with_the_compiled_functions(recorder):
    trainer, _, _ = fit_linear(epochs=2, spe=4)
    traces = trainer.trace_count
    trainer.epochs = 4
    trainer.callbacks = [recorder]
    logs = trainer.fit(trainer.step, trainer.data)
    assert trainer.trace_count == traces and logs["step"] == 28 and logs["epoch"] == 4
    assert ("epoch_start", 2) in recorder.calls and ("epoch_start", 1) not in recorder.calls


# --- steps_per_execution=auto -----------------------------------------------------------
def test_pacing_ramps_up_to_the_target_and_retunes_out_of_band():
    pace = Pacing("auto")
    assert pace.steps == FIRST_STEPS
    pace.observe(FIRST_STEPS, 1.0, traced=True)  # tracing time says nothing about speed
    assert pace.steps == FIRST_STEPS
    rate = 20_000.0  # steps/s
    for _ in range(5):
        pace.observe(pace.steps, pace.steps / rate, traced=False)
    assert BAND_SECONDS[0] <= pace.steps / rate <= BAND_SECONDS[1]
    settled = pace.steps
    pace.observe(100, 100 / (rate * 1.2), traced=False)  # a bit faster: still in band
    assert pace.steps == settled
    pace.observe(100, 100 / (rate / 10), traced=False)  # ten times slower (e.g. unfrozen)
    assert BAND_SECONDS[0] <= pace.steps / (rate / 10) <= BAND_SECONDS[1]
    fixed = Pacing(8)
    fixed.observe(8, 1e-6, traced=False)
    assert fixed.steps == 8


@pytest.mark.parametrize("bad", [0, -3, "many", True, 2.5, None])
def test_steps_per_execution_rejects_bad_values(bad):
    with pytest.raises(UserError, match=r"trainer\.steps_per_execution=.* must be auto or an "):
        check_steps_per_execution(bad)
    with pytest.raises(UserError):
        Trainer(steps_per_execution=bad)
    assert check_steps_per_execution("16") == 16


def test_auto_steps_keep_callbacks_at_execution_and_epoch_boundaries(recorder):
    trainer, _, logs = fit_linear(epochs=3, spe="auto", callbacks=[recorder])
    assert trainer.current_step == 21 and logs["step"] == 21
    # 7 steps per epoch: the first execution may be short, later ones end at epoch ends.
    ends = [s for hook, s in recorder.calls if hook == "execution_end"]
    assert ends == sorted(ends) and {7, 14, 21} <= set(ends)
    epochs = [s for hook, s in recorder.calls if hook == "epoch_end"]
    assert epochs == [0, 1, 2]


# --- XLA ----------------------------------------------------------------------------------
class _PyStep(TapeStep):
    """A step with an op XLA has no kernel for."""

    def compute_loss(self, x, y, training):
        loss, y_pred = super().compute_loss(x, y, training)
        return loss + tf.numpy_function(lambda a: a * 0, [loss], tf.float32), y_pred


def _long_trainer(**kw):
    class StopAfterOne(ProfileCallback):
        def on_epoch_end(self, trainer, epoch, logs):
            trainer.stop_training = True

    return Trainer(epochs=5000, steps_per_execution=4, callbacks=[StopAfterOne()], **kw)


def test_jit_compile_auto_uses_xla_for_long_in_memory_runs_only():
    step = TapeStep(model=linear_model(), optimizer=keras.optimizers.SGD(0.05), task="regression")
    long = _long_trainer()
    long.fit(step, regression_data())
    assert long.jit_compile == "auto" and long.xla
    short, _, _ = fit_linear(epochs=2, spe=4, jit_compile="auto")
    assert not short.xla
    streamed = _long_trainer()
    streamed.fit(TapeStep(model=linear_model(), optimizer=keras.optimizers.SGD(0.05),
                          task="regression"), regression_data(in_memory=False))
    assert not streamed.xla
    with pytest.raises(UserError, match=r"trainer\.jit_compile='yes' must be auto, true or false"):
        Trainer(jit_compile="yes")


def test_xla_failure_falls_back_under_auto_and_names_the_op_under_true(caplog):
    def step():
        return _PyStep(model=linear_model(), optimizer=keras.optimizers.SGD(0.05),
                       task="regression")

    trainer = _long_trainer()
    with caplog.at_level(logging.WARNING, logger="trainer.compile.executions"):
        logs = trainer.fit(step(), regression_data())
    assert np.isfinite(logs["val/loss"]) and logs["step"] == 7
    assert any("XLA cannot compile" in r.getMessage() and "PyFunc" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(UserError, match=r"XLA cannot compile the training step \(no XLA kernel "
                                        r"for PyFunc, created at .*test_speed.py"):
        Trainer(epochs=1, steps_per_execution=4, jit_compile=True).fit(step(), regression_data())


# --- profiling, summaries, checkpoints --------------------------------------------------------
def test_profile_callback_records_a_trace_for_the_profile_tab(tmp_path):
    cb = ProfileCallback(steps=[2, 6])
    fit_linear(epochs=2, spe=4, callbacks=[cb], run_dir=str(tmp_path))
    assert cb.recorded == (4, 7)  # the execution boundaries around steps 2-6
    traces = list((tmp_path / "tb" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert traces
    off = ProfileCallback()
    fit_linear(epochs=1, spe=4, callbacks=[off], run_dir=str(tmp_path / "off"))
    assert off.recorded is None and not (tmp_path / "off" / "tb").exists()
    with pytest.raises(UserError, match=r"callbacks\.profile\.steps"):
        ProfileCallback(steps=[5, 2])


def test_compiled_histogram_matches_tensorboards(monkeypatch):
    from tensorboard.plugins.histogram.summary_v2 import _buckets

    import trainer.callbacks.tensorboard as tb

    written = {}
    monkeypatch.setattr(tb.tf.summary, "write",
                        lambda tag, tensor, step, metadata: written.update({tag: tensor}))
    rng = np.random.default_rng(0)
    for data in (rng.normal(size=(64, 32)), np.zeros(7), np.array([2.5]), rng.random(100) * 1e-4):
        data = tf.constant(data, tf.float32)
        tb._histogram("h", data, 0)
        np.testing.assert_array_equal(written["h"].numpy(), _buckets(data, tf.constant(30)))


def test_checkpoints_skip_saves_closer_than_the_interval_but_keep_the_end(tmp_path):
    cb = CheckpointCallback(directory="ckpt")  # default interval: 30 s
    fit_linear(epochs=5, spe=4, max_steps=24, callbacks=[cb], run_dir=str(tmp_path))
    saved = [int(p.rsplit("-", 1)[1]) for p in cb.manager.checkpoints]
    assert saved == [7, 24]  # the first epoch, then the end of the run (stopped by max_steps)


@pytest.mark.parametrize("shapes", [[(3, 4), (4,), (1,)], [(700, 100)]])
def test_global_norm_equals_tensorflows(shapes):
    grads = [tf.random.stateless_normal(s, seed=[1, i]) for i, s in enumerate(shapes)]
    expected = tf.linalg.global_norm(grads).numpy()
    assert global_norm([*grads, None]).numpy() == pytest.approx(expected, rel=1e-5)
    assert global_norm([None]).numpy() == 0.0


# --- configs ----------------------------------------------------------------------------------
def test_config_keys_for_the_speed_features(make_cfg, tmp_path):
    from trainer.driver.run import instantiate_data, instantiate_node

    def trainer_of(cfg):  # as the driver builds it: without its own keys (resume, ...)
        driver_keys = ("resume", "deterministic", "checkpoint_dir")
        node = {k: v for k, v in cfg.trainer.items() if k not in driver_keys}
        return instantiate_node(node)(run_dir=str(tmp_path))

    cfg = make_cfg("data=synthetic", "data.in_memory=false", "trainer.steps_per_execution=16",
                   "trainer.jit_compile=true", "callbacks.profile.steps=[1,3]")
    assert instantiate_data(cfg.data).holds_in_memory() is False
    trainer = trainer_of(cfg)
    assert trainer.steps_per_execution == 16 and trainer.jit_compile is True
    assert instantiate_node(cfg.callbacks.profile).steps == [1, 3]
    defaults = make_cfg()
    assert defaults.trainer.steps_per_execution == "auto"
    assert defaults.trainer.jit_compile == "auto" and defaults.data.in_memory == "auto"
    assert list(defaults.callbacks.profile.steps) == []
    with pytest.raises(UserError, match="steps_per_execution=0"):
        trainer_of(make_cfg("trainer.steps_per_execution=0"))
