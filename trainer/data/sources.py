"""Batch sources the compiled loop pulls from, one ``next()`` per step, inside the graph."""

from __future__ import annotations

import tensorflow as tf

from trainer.common.errors import UserError


class Source:
    """What the compiled loop needs of a batch source.

    ``next()`` runs inside the compiled execution (once per batch); the other
    members run on the host. Its state (``state()``) is part of the trainer's
    checkpoint: the data order and the position in it.
    """

    #: Whether ``next()`` can run inside an XLA program (then a whole execution can be one).
    xla_loop = False
    #: Examples in an epoch's short last batch when ``next()`` yields only full batches and
    #: ``next_any()`` the short one (see ``make_source_execution`` in
    #: ``trainer.compile.executions``); else 0.
    tail = 0

    def next(self):
        """The next batch (inside the compiled loop)."""
        raise NotImplementedError

    def next_any(self):
        """The next batch, full or short (a source with ``tail`` overrides this)."""
        return self.next()

    def start_epoch(self, epoch: int) -> None:
        """Called on the host before the first batch of ``epoch`` (0-based)."""

    def state(self) -> dict:
        """Trackable state a restart needs, by name (order, position, iterator)."""
        return {}

    def check_restored(self) -> None:
        """After a restore: raise a ``UserError`` if the restored state belongs to
        another data order (another shuffle seed)."""


class IteratorSource(Source):
    """Batches from an endless ``tf.data`` pipeline, through one long-lived iterator.

    The iterator is created once, outside any tf.function, and captured by the
    compiled loop, so epochs neither retrace nor rebuild the pipeline. Its
    position (and the pipeline's shuffle state) is checkpointed with it.
    """

    def __init__(self, dataset: tf.data.Dataset):
        self.dataset = dataset
        self.iterator = iter(dataset)

    def next(self):
        return next(self.iterator)

    def start_epoch(self, epoch: int) -> None:
        """Nothing to do: the pipeline reshuffles by itself at the end of each pass."""

    def state(self) -> dict:
        """The iterator: tf.data saves its position and buffers."""
        return {"iterator": self.iterator}


def epoch_permutation(num_examples: int, seed: int, epoch) -> tf.Tensor:
    """The order of the training examples in ``epoch``: a stateless function of seed and epoch.

    Both sources draw their order here (the iterator inside its tf.data graph,
    the in-memory source at each epoch start), so the same seed gives the same
    batches whichever path runs, and a resumed run reproduces the order.
    """
    seed = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
    return tf.random.experimental.stateless_shuffle(tf.range(num_examples, dtype=tf.int32), seed)


def epoch_batches(num_examples: int, batch_size: int, seed: int, shuffle: bool):
    """An endless ``tf.data`` pipeline of index vectors, one per training batch: epoch
    ``e``'s examples in ``epoch_permutation`` order (the order the in-memory source uses),
    batched within the epoch, the last batch short if the batch size does not divide the set.
    Map it to the batch's tensors by gathering those indices."""
    n, size = num_examples, batch_size
    if shuffle:
        orders = tf.data.Dataset.counter().map(lambda e: epoch_permutation(n, seed, e))
    else:
        orders = tf.data.Dataset.from_tensors(tf.range(n, dtype=tf.int32)).repeat()
    full, tail = divmod(n, size)

    def batches_of(order):
        # The epoch's full batches as rows of one reshape (half the CPU of .batch() per
        # batch, and a static shape when the batch size divides the set, which the step's
        # graph folds), then the short last batch, if any.
        rows = tf.data.Dataset.from_tensor_slices(tf.reshape(order[: full * size], [full, size]))
        if tail:
            rows = rows.concatenate(tf.data.Dataset.from_tensors(order[full * size:]))
        return rows

    return orders.flat_map(batches_of)


class TensorSource(Source):
    """Batches sliced by index from tensors held in memory, inside the compiled loop.

    Holds ``x`` and ``y`` (and the per-example weights ``w``, if given) as tensors, the
    epoch's order of the examples and the position in it (both ``tf.Variable``, created
    here, outside any tf.function).
    ``next()`` gathers the next full batch by index, so the whole multi-step
    execution (``steps_per_execution`` steps) can be one XLA program.

    The order of each epoch is ``epoch_permutation(n, seed, epoch)`` (identity
    without shuffle), set by ``start_epoch`` on the host between executions: an
    execution never crosses an epoch boundary, so drawing it there costs one op
    per epoch instead of a branch per step, and eager, compiled and XLA runs see
    the same order.

    The short last batch (``n % batch_size`` examples, when not zero) is neither
    dropped nor padded, so every epoch sees every example once, exactly as the
    ``tf.data`` path does. ``next_any()`` draws it (any batch, dynamic shape):
    under XLA, which needs static shapes, in a second small call at the end of
    the epoch; without XLA for every step. See ``trainer.compile.executions.make_source_execution``.

    With ``tape.reset.action=retry``, a retried step takes the next batch of the
    epoch's order; a retry in the fused loop that runs past the last full batch
    wraps to the epoch's first batch.

    Batches are ``(x, y)``, or ``(x, y, w)`` when ``w`` is given, its rows gathered
    with the same indices as theirs.
    """

    xla_loop = True

    def __init__(self, x, y, *, batch_size: int, seed: int = 0, shuffle: bool = True, w=None):
        self.x = tf.convert_to_tensor(x)
        self.y = tf.convert_to_tensor(y)
        self.w = None if w is None else tf.convert_to_tensor(w, tf.float32)
        self.num_examples = int(self.x.shape[0])
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.full_batches = self.num_examples // self.batch_size
        #: Examples in the epoch's short last batch; 0 when the batch size divides the set.
        self.tail = self.num_examples % self.batch_size
        self.steps_per_epoch = self.full_batches + (1 if self.tail else 0)
        self.order = tf.Variable(tf.range(self.num_examples, dtype=tf.int32), trainable=False,
                                 name="source_order")
        #: Batches drawn in this epoch (retried steps draw more than one).
        self.position = tf.Variable(0, dtype=tf.int32, trainable=False, name="source_position")
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="source_epoch")
        # The seed is saved so that a restart can tell a checkpoint of another order.
        self.seed_variable = tf.Variable(self.seed, dtype=tf.int64, trainable=False,
                                         name="source_seed")

    def start_epoch(self, epoch: int) -> None:
        """Draw the order of ``epoch`` and rewind to its first batch."""
        if self.shuffle:
            self.order.assign(epoch_permutation(self.num_examples, self.seed, epoch))
        self.position.assign(0)
        self.epoch.assign(epoch)

    def state(self) -> dict:
        """Epoch, position in it, the epoch's order of the examples and the seed it came from."""
        return {"epoch": self.epoch, "position": self.position, "order": self.order,
                "seed": self.seed_variable}

    def check_restored(self) -> None:
        restored = int(self.seed_variable.numpy())
        if restored != self.seed:
            raise UserError(f"the checkpoint's data order comes from seed {restored}, this run's "
                            f"from seed {self.seed}: set seed={restored} (or data.seed) to "
                            "resume it, or start fresh with trainer.resume=never")

    def _gather(self, indices):
        if self.w is None:
            return tf.gather(self.x, indices), tf.gather(self.y, indices)
        return tf.gather(self.x, indices), tf.gather(self.y, indices), tf.gather(self.w, indices)

    def next(self):
        """The next full batch (static shape ``[batch_size, ...]``)."""
        # Modulo the epoch (after next_any() drew the short last batch, the position is
        # one past it), then the full batches (a retry past the last full batch wraps).
        # Without a short last batch the epoch's steps are its full batches: one modulus.
        position = (self.position % self.steps_per_epoch if self.tail else self.position)
        position = position % max(self.full_batches, 1)
        # assign_add, not assign(position + 1): every later stateful op of the step (the
        # weight reads) waits for this write, and an increment needs no read and modulus
        # first; that chain is a tenth of a tiny model's step without XLA. The position
        # may pass the end (retries); it is taken modulo at the read above.
        self.position.assign_add(1)
        # Indices by gather, not tf.slice: XLA treats a slice start read from a variable
        # as a compile-time constant and would recompile for every position.
        indices = tf.gather(self.order, position * self.batch_size + tf.range(self.batch_size))
        return self._gather(indices)

    def next_any(self):
        """The next batch, full or the short last one (dynamic shape)."""
        position = self.position % self.steps_per_epoch
        self.position.assign_add(1)  # see next()
        start = position * self.batch_size
        stop = tf.minimum(start + self.batch_size, self.num_examples)
        return self._gather(self.order[start:stop])


class FixedBatches(Source):
    """The same few batches, in the same order, every epoch (``trainer.overfit_batches``).

    Holds ``count`` batches stacked into tensors of ``[count, batch, ...]`` (any nest of
    tensors: ``(x, y)``, ``(x, y, w)``, dicts) and a position; ``next()`` gathers batch
    ``position % count``, inside the compiled loop (under XLA too: static shapes, the
    index by gather). ``start_epoch`` rewinds to the first batch: nothing is shuffled.
    """

    xla_loop = True

    def __init__(self, batches: list):
        if not batches:
            raise ValueError("FixedBatches needs at least one batch")
        self.count = len(batches)
        self.steps_per_epoch = self.count
        self.batches = tf.nest.map_structure(lambda *b: tf.stack(b), *batches)
        self.position = tf.Variable(0, dtype=tf.int32, trainable=False, name="source_position")

    @classmethod
    def take(cls, source: Source, count: int, setting: str) -> FixedBatches:
        """The first ``count`` batches ``source`` yields; all must be of one shape (full
        batches), or a ``UserError`` names ``setting`` (the config key and value that asked
        for them, ``trainer.overfit_batches=4``)."""
        # An in-memory source wraps around after its last full batch (next() never draws
        # the short one): more would repeat batches silently.
        batches = [source.next() for _ in range(min(count, getattr(source, "full_batches",
                                                                    count)))]
        shape = [t.shape for t in tf.nest.flatten(batches[0])]
        full = next((i for i, batch in enumerate(batches)
                     if [t.shape for t in tf.nest.flatten(batch)] != shape), len(batches))
        if full < count:
            raise UserError(f"{setting}: the training set has {full} full batches; use at "
                            f"most {full}")
        return cls(batches)

    def again(self) -> FixedBatches:
        """The same batches with a position of its own (validation on the training batches)."""
        return FixedBatches([self.batch(i) for i in range(self.count)])

    def batch(self, index: int):
        """Batch ``index`` as numpy arrays, on the host."""
        return tf.nest.map_structure(lambda t: t[index].numpy(), self.batches)

    def next(self):
        index = self.position % self.count
        self.position.assign_add(1)  # see TensorSource.next
        return tf.nest.map_structure(lambda t: tf.gather(t, index), self.batches)

    def start_epoch(self, epoch: int) -> None:
        """Rewind to the first batch: every epoch runs the same batches in the same order."""
        self.position.assign(0)

    def state(self) -> dict:
        """The position among the batches (the batches are the data set's first ones)."""
        return {"position": self.position}
