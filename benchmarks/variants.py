"""The contestants: model.fit, minimal hand-written loops, and the trainer, on one workload.

Every variant runs whole epochs, so all of them pay the same per-epoch costs (a
reshuffle, and for the trainer its one-batch evaluation) and are timed the same
way: from the start of a window's first epoch to the end of its last one. The
set-up of each ``fit`` call (Keras' data adapter, the trainer's ``on_fit_start``)
is outside the timed span, as it is paid once per run, not per window.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from trainer.callbacks import Callback


@dataclass
class Workload:
    """A model, its data and its step: an MLP on random data, optionally with the
    input-gradient penalty (double backpropagation) every ``gp_every`` steps."""

    name: str
    task: str  # "regression" or "classification"
    n_features: int
    hidden: list = field(default_factory=list)
    n_out: int = 1
    batch_size: int = 64
    n_train: int = 65536
    gp_every: int = 0  # 0: no penalty
    gp_weight: float = 0.01
    sam_rho: float = 0.0  # above 0: the trainer's step is SamStep with this rho (step=sam)

    def arrays(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(self.n_train, self.n_features)).astype(np.float32)
        if self.task == "regression":
            y = (x[:, :4].sum(axis=1, keepdims=True) * 0.5).astype(np.float32)
        else:
            y = rng.integers(0, self.n_out, size=self.n_train).astype(np.int32)
        return x, y

    @property
    def steps_per_epoch(self) -> int:
        return self.n_train // self.batch_size

    def model(self):
        keras.utils.set_random_seed(0)
        layers = [keras.Input((self.n_features,))]
        layers += [keras.layers.Dense(u, activation="relu") for u in self.hidden]
        return keras.Sequential([*layers, keras.layers.Dense(self.n_out)])

    def loss(self):
        if self.task == "regression":
            return keras.losses.MeanSquaredError()
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def flops_per_step(self) -> float:
        """Matmul FLOPs of one plain training step: forward, weight gradients, and input
        gradients of every layer but the first."""
        sizes = [self.n_features, *self.hidden, self.n_out]
        macs = [a * b for a, b in itertools.pairwise(sizes)]
        return 2.0 * self.batch_size * (2 * sum(macs) + sum(macs[1:]))


def _gp_total(workload, loss_fn, model, x, y, iteration):
    """The hand-written double-backprop step's objective, as TapeStep + InputGradientPenalty
    computes it (lazy: ``every * weight`` on due steps, in a ``tf.cond``)."""
    with tf.GradientTape(watch_accessed_variables=False) as itape:
        itape.watch(x)
        loss = loss_fn(y, model(x, training=True))

    def penalty():
        g = itape.gradient(loss, x) * tf.cast(tf.shape(x)[0], tf.float32)
        return tf.reduce_mean(tf.reduce_sum(tf.square(g), axis=1))

    every = workload.gp_every
    if not every:
        return loss, loss
    if every == 1:
        return loss, loss + workload.gp_weight * penalty()
    due = tf.equal(iteration % every, 0)
    extra = tf.cond(due, lambda: every * workload.gp_weight * penalty(), lambda: 0.0)
    return loss, loss + extra


class Variant:
    """One contestant. ``setup()`` builds and compiles it (and runs a warm-up epoch);
    ``run(epochs)`` trains that many epochs and returns ``(steps, seconds)``."""

    kind = "?"

    def __init__(self, name: str, workload: Workload, spe, **meta):
        self.name, self.workload, self.spe = name, workload, spe
        self.meta = {"kind": self.kind, "steps_per_execution": spe, **meta}

    def setup(self):
        raise NotImplementedError

    def run(self, epochs: int):
        raise NotImplementedError


class _EpochClock(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.start = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.start is None:
            self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.end = time.perf_counter()


class _GPModel(keras.Sequential):
    """``model.fit`` with the input-gradient penalty: Keras' way, an overridden train_step."""

    workload: Workload = None

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            loss, total = _gp_total(self.workload, self.loss, self, x, y,
                                    self.optimizer.iterations)
        grads = tape.gradient(total, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return {"loss": loss}


class FitVariant(Variant):
    """``model.fit`` on NumPy arrays (Keras' own shuffled pipeline), ``verbose=0``."""

    kind = "fit"

    def __init__(self, name, workload, spe, *, xla: bool):
        super().__init__(name, workload, spe, xla=xla, source="keras")
        self.xla = xla

    def setup(self):
        w = self.workload
        self.x, self.y = w.arrays()
        model = w.model()
        if w.gp_every:
            model = _GPModel(model.layers, name="gp_mlp")
            model.workload = w
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=w.loss(),
                      steps_per_execution=self.spe, jit_compile=self.xla)
        self.model, self.clock = model, _EpochClock()
        self.run(1)

    def run(self, epochs):
        self.model.fit(self.x, self.y, batch_size=self.workload.batch_size, epochs=epochs,
                       shuffle=True, verbose=0, callbacks=[self.clock])
        return epochs * self.workload.steps_per_epoch, self.clock.end - self.clock.start


class HandVariant(Variant):
    """A minimal hand-written ``tf.function`` + ``tf.GradientTape`` loop of ``spe`` steps.

    ``source="iterator"``: over ``from_tensor_slices.shuffle.batch.repeat.prefetch``;
    ``"memory"``: tensors in memory, a permutation drawn per epoch on the host, batches
    gathered by index inside the function; ``xla``: the whole function under XLA.
    """

    kind = "hand"

    def __init__(self, name, workload, spe, *, source: str, xla: bool = False):
        super().__init__(name, workload, spe, source=source, xla=xla)
        self.source, self.xla = source, xla

    def setup(self):
        w = self.workload
        x, y = w.arrays()
        model, loss_fn = w.model(), w.loss()
        opt = keras.optimizers.Adam(1e-3)
        opt.build(model.trainable_variables)
        b = w.batch_size
        if self.source == "iterator":
            ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0)
            it = iter(ds.batch(b, drop_remainder=True).repeat().prefetch(tf.data.AUTOTUNE))

            def batch():
                return next(it)
        else:
            xt, yt = tf.constant(x), tf.constant(y)
            self.order = tf.Variable(tf.range(len(x), dtype=tf.int32))
            self.pos = tf.Variable(0, dtype=tf.int32)

            def batch():
                idx = tf.gather(self.order, self.pos * b + tf.range(b))
                self.pos.assign_add(1)
                return tf.gather(xt, idx), tf.gather(yt, idx)

        def step():
            xb, yb = batch()
            with tf.GradientTape() as tape:
                loss, total = _gp_total(w, loss_fn, model, xb, yb, opt.iterations)
            grads = tape.gradient(total, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
            return loss

        def train(n):
            total = tf.zeros([])
            i = tf.constant(0)
            while i < n:
                total += step()
                i += 1
            return total / tf.cast(n, tf.float32)

        self.train = tf.function(train, jit_compile=self.xla)
        self.n = tf.constant(self.spe)
        self.epoch = 0
        self.run(1)

    def run(self, epochs):
        w = self.workload
        start = time.perf_counter()
        for _ in range(epochs):
            if self.source == "memory":
                seed = tf.constant([0, self.epoch], tf.int64)
                self.order.assign(tf.random.experimental.stateless_shuffle(
                    tf.range(w.n_train, dtype=tf.int32), seed))
                self.pos.assign(0)
            self.epoch += 1
            for _ in range(w.steps_per_epoch // self.spe):
                loss = self.train(self.n)
            float(loss)  # what a hand-written loop prints once per epoch
        return epochs * w.steps_per_epoch, time.perf_counter() - start


class _TrainerClock(Callback):
    """Times a fit from its first epoch start to its last epoch end, and stops it after
    ``epochs`` epochs (the trainer is built for a long run, as ``jit_compile=auto`` and
    ``steps_per_execution=auto`` would see in practice)."""

    epochs = 1

    def on_fit_start(self, trainer):
        self.start, self.done = None, 0

    def on_epoch_start(self, trainer, epoch):
        if self.start is None:
            self.start, self.first_step = time.perf_counter(), trainer.current_step

    def on_epoch_end(self, trainer, epoch, logs):
        self.end, self.last_step = time.perf_counter(), logs["step"]
        self.done += 1
        trainer.stop_training = self.done >= self.epochs


class TrainerVariant(Variant):
    """``trainer.Trainer`` + ``TapeStep`` (with ``InputGradientPenalty`` when the workload
    has one), repeated ``fit`` calls continuing the same run.

    ``source``: ``"memory"``, ``"iterator"`` or ``"auto"`` (the data module's default);
    ``xla``: ``trainer.jit_compile`` (None: its default); ``callbacks``: factories of
    extra callbacks.
    The validation split is one batch (the trainer always evaluates each epoch).
    """

    kind = "trainer"

    def __init__(self, name, workload, spe, *, source="auto", xla=None, eager=False,
                 callbacks=(), run_dir=None, label=""):
        super().__init__(name, workload, spe, source=source, xla=xla, eager=eager,
                         default=label == "default")
        self.source, self.xla, self.eager = source, xla, eager
        self.callback_factories, self.run_dir = list(callbacks), run_dir

    def setup(self):
        from trainer import TapeStep, Trainer
        from trainer.data import Batching, DataModule
        from trainer.regularizers import InputGradientPenalty

        w = self.workload
        x, y = w.arrays()
        in_memory = {"memory": True, "iterator": False}.get(self.source, "auto")
        self.data = DataModule(
            train=(x, y), val=(x[: w.batch_size], y[: w.batch_size]), task=w.task,
            batching=Batching(batch_size=w.batch_size, in_memory=in_memory),
        )
        regs = [InputGradientPenalty(weight=w.gp_weight, every=w.gp_every)] if w.gp_every else []
        factory = TapeStep
        if w.sam_rho:
            from functools import partial

            from trainer.step.sam import SamStep

            factory = partial(SamStep, rho=w.sam_rho)
        self.step = factory(model=w.model(), optimizer=keras.optimizers.Adam(1e-3),
                            task=w.task, regularizers=regs)
        kwargs = {} if self.xla is None else {"jit_compile": self.xla}
        self.clock = _TrainerClock()
        callbacks = [factory() for factory in self.callback_factories] + [self.clock]
        self.trainer = Trainer(epochs=10**9, steps_per_execution=self.spe, run_eagerly=self.eager,
                               callbacks=callbacks, run_dir=self.run_dir or ".", **kwargs)
        self.run(1)
        self.meta["xla"] = self.trainer.xla
        self.meta["source"] = "memory" if self.data.holds_in_memory() else "iterator"

    def run(self, epochs):
        self.clock.epochs = epochs
        self.trainer.fit(self.step, self.data)
        c = self.clock
        return c.last_step - c.first_step, c.end - c.start


class MatmulPeak(Variant):
    """The machine's float32 matmul rate: ``n x n`` products in a compiled loop.
    Its "steps" are matmuls; ``flops`` converts them to GFLOP/s."""

    kind = "peak"

    def __init__(self, name, n: int, per_epoch: int = 8):
        super().__init__(name, None, 1, n=n)
        self.n, self.per_epoch = n, per_epoch
        self.flops = 2.0 * n**3

    def setup(self):
        a = tf.random.stateless_normal([self.n, self.n], seed=[1, 2])
        b = tf.random.stateless_normal([self.n, self.n], seed=[3, 4])

        @tf.function
        def products(k):
            acc = tf.zeros([])
            for _ in tf.range(k):
                acc += tf.reduce_sum(tf.matmul(a, b)[0, :1])
            return acc

        self.products = products
        self.run(1)

    def run(self, epochs):
        start = time.perf_counter()
        float(self.products(tf.constant(epochs * self.per_epoch)))
        return epochs * self.per_epoch, time.perf_counter() - start
