"""Data, the base every data set shares (how it draws batches: its ``batching``), and
DataModule: validated in-memory arrays and the tf.data pipelines built from them."""

from __future__ import annotations

import dataclasses

import numpy as np

from trainer.common.errors import UserError
from trainer.data.options import Arrays, Batching
from trainer.data.weights import check_sample_weights, class_weight_table

TASKS = ("classification", "regression")
#: ``in_memory="auto"`` holds the data as tensors up to this many bytes (train + validation).
IN_MEMORY_MAX_BYTES = 512 * 2**20


class _FromBatching:
    """A data set's ``batch_size`` (``seed``, ``shuffle``, ``in_memory``): read from its
    ``batching``; setting it replaces ``batching`` with a copy holding the new value."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, data, owner=None):
        return self if data is None else getattr(data.batching, self.name)

    def __set__(self, data, value):
        data.batching = dataclasses.replace(data.batching, **{self.name: value})


class Data:
    """What the trainer and the driver need of a data set; subclass it for your own.

    ``DataModule`` implements it for arrays in memory. A subclass provides the
    task and shapes (the driver builds the model from them), the training and
    validation sources the compiled loop pulls batches from, the number of
    steps in one pass, a fixed probe batch and the validation batches.

    Every data set draws its batches as its ``batching`` (a ``trainer.data.Batching``)
    says; ``batch_size``, ``seed``, ``shuffle`` and ``in_memory`` read it.
    """

    #: ``"classification"`` or ``"regression"``: picks the default loss and metrics.
    task: str = "classification"
    #: Whether every batch (from both sources, ``probe_batch`` and ``validation_batches``)
    #: is ``(x, y, w)`` with per-example weights ``w`` (float32, ``[batch]``), not ``(x, y)``.
    weighted: bool = False
    #: How batches are drawn (a subclass that does not call ``Data.__init__`` gets the
    #: defaults).
    batching: Batching = Batching()
    #: Examples per batch: ``batching.batch_size``.
    batch_size = _FromBatching()
    #: The seed of the per-epoch shuffle: ``batching.seed``.
    seed = _FromBatching()
    #: Whether the training set is shuffled every epoch: ``batching.shuffle``.
    shuffle = _FromBatching()
    #: ``True``, ``False`` or ``"auto"``: ``batching.in_memory``.
    in_memory = _FromBatching()

    def __init__(self, *, batching: Batching = Batching()):
        if not isinstance(batching, Batching):
            raise TypeError(f"batching={batching!r} is not a trainer.data.Batching")
        self.batching = batching

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example's features."""
        raise NotImplementedError

    @property
    def num_outputs(self) -> int:
        """Width of the model's output layer."""
        raise NotImplementedError

    def prepare(self, x):
        """Raw features (as the data set's files hold them) prepared as training saw them:
        the data set's own preprocessing (the digits' scaling to [0, 1]), for
        ``python -m trainer.predict`` on new inputs. Default: unchanged."""
        return x

    @property
    def preparation(self):
        """What ``prepare`` does, as an object a serving signature can hold: None (nothing),
        a ``trainer.data.Scaling``, or any callable with an ``in_graph(x)`` method of
        TensorFlow ops (``python -m trainer.export`` puts it in the exported graph). A data
        set that overrides ``prepare`` overrides this too."""
        if type(self).prepare is not Data.prepare:
            raise NotImplementedError(f"{type(self).__name__} overrides prepare but not "
                                      "preparation")
        return None

    def steps_per_epoch(self, split: str = "train") -> int:
        """Batches in one pass over ``split`` (``"train"`` or ``"val"``)."""
        raise NotImplementedError

    def train_source(self):
        """A ``trainer.data.sources.Source`` of training batches, shuffled per epoch."""
        raise NotImplementedError

    def val_source(self):
        """A ``Source`` of validation batches in a fixed order, endlessly repeated."""
        raise NotImplementedError

    def probe_batch(self):
        """A fixed training batch ``(x, y)`` (``(x, y, w)`` when ``weighted``): gradient
        histograms are taken on it."""
        raise NotImplementedError

    def validation_batches(self) -> list:
        """The validation set once, as ``(x, y)`` (``(x, y, w)`` when ``weighted``) numpy
        batches in a fixed order."""
        raise NotImplementedError


class DataModule(Data):
    """Train and validation arrays plus how to batch them.

    Every data config builds one of these. The arrays are checked once here
    (shapes, emptiness, non-finite values, batch size), so the loop can trust them.

    Args:
        train, val: the training and validation arrays, each ``(x, y)`` or ``(x, y, w)``
            (a ``trainer.data.Arrays``): features ``x`` are cast to float32,
            classification targets ``y`` to int32, regression targets to float32;
            ``w`` holds per-example sample weights (finite, >= 0, not all zero), or
            None: every example weighs 1.
        task: ``"classification"`` or ``"regression"``.
        batching: a ``trainer.data.Batching``: batch size, the seed of the per-epoch
            shuffle, whether to shuffle, and ``in_memory``: ``True`` holds the arrays
            as tensors and slices batches by index inside the compiled loop
            (``TensorSource``: the whole execution can be one XLA program); ``False``
            streams them through ``tf.data`` (``IteratorSource``); ``"auto"``
            (default) holds them in memory when they take at most
            ``IN_MEMORY_MAX_BYTES`` and ``train_dataset`` is not overridden. Both
            give the same batches for the same seed.
        class_weight: ``"balanced"`` (scikit-learn's ``n / (n_classes * count)`` over the
            training labels) or a mapping class id -> positive weight, unlisted classes
            weighing 1.0; classification only. It multiplies the training sample weights
            and, as in Keras, leaves the validation weights alone.
        allow_nonfinite: accept NaN or infinity in the features (for runs that
            rely on the tape-reset policy to skip such batches).
        name: shown in error messages (a file path, or the data set's name).
        preprocess: what the builder did to the raw features (``Scaling(divide_by=16)``
            for the digits), applied by ``prepare`` to new inputs at prediction time. A
            ``trainer.data.Scaling`` is recorded by ``python -m trainer.export_data`` in
            the shards' ``meta.json`` and held in the graph of an exported model
            (``python -m trainer.export``); a plain function can be neither.

    Given sample weights or a class weight, the data is ``weighted``: ``w_train`` and
    ``w_val`` hold every example's weight (ones where none was given) and every batch
    is ``(x, y, w)``. Otherwise both are None and batches are ``(x, y)``.
    """

    def __init__(
        self,
        *,
        train,
        val,
        task: str = "classification",
        batching: Batching = Batching(),
        class_weight=None,
        allow_nonfinite: bool = False,
        name: str = "data",
        preprocess=None,
    ):
        super().__init__(batching=batching)
        if task not in TASKS:
            raise UserError(f"data.task={task!r} is not one of {TASKS}; set data.task accordingly")
        self.task = task
        self.name = name
        self._preprocess = preprocess
        train, val = Arrays(*train), Arrays(*val)
        self.x_train, self.y_train = self._check("train", train.x, train.y, allow_nonfinite)
        self.x_val, self.y_val = self._check("validation", val.x, val.y, allow_nonfinite)
        self.batching.check_fits(len(self.x_train), name)
        if task == "classification":
            self.num_classes = int(max(self.y_train.max(), self.y_val.max())) + 1
        else:
            self.num_classes = 0
        self.w_train, self.w_val = self._weights(train.w, val.w, class_weight)

    def _check(self, split, x, y, allow_nonfinite):
        x = np.asarray(x)
        y = np.asarray(y)
        if len(x) == 0:
            raise UserError(f"{self.name}: the {split} set is empty; provide at least one example")
        if len(x) != len(y):
            raise UserError(
                f"{self.name}: {split} features have {len(x)} rows but targets have {len(y)}"
            )
        if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.number):
            raise UserError(f"{self.name}: {split} features and targets must be numeric")
        x = x.astype(np.float32)
        if not allow_nonfinite and not np.isfinite(x).all():
            row = int(np.argwhere((~np.isfinite(x.reshape(len(x), -1))).any(axis=1))[0, 0])
            raise UserError(
                f"{self.name}: {split} features hold NaN or infinity (first at {split} row {row}); "
                "clean the data or set data.allow_nonfinite=true"
            )
        if not np.isfinite(y.astype(np.float64)).all():
            raise UserError(f"{self.name}: {split} targets hold NaN or infinity; clean the data")
        if self.task == "classification":
            if np.any(np.mod(y, 1) != 0) or y.min() < 0:
                raise UserError(
                    f"{self.name}: classification targets must be non-negative integers; "
                    "set data.task=regression for continuous targets"
                )
            y = y.astype(np.int32)
        else:
            y = y.astype(np.float32)
            if y.ndim == 1:
                y = y[:, None]
        return x, y

    def _weights(self, w_train, w_val, class_weight):
        """Every example's training and validation weight, or ``(None, None)`` if none given."""
        if w_train is None and w_val is None and class_weight is None:
            return None, None
        train, val = (
            np.ones(len(x), np.float32) if w is None
            else check_sample_weights(w, rows=len(x), where=f"{self.name} ({split} set)")
            for split, x, w in (("train", self.x_train, w_train),
                                ("validation", self.x_val, w_val)))
        if class_weight is not None:
            labels = self.y_train.reshape(len(self.y_train), -1)
            if self.task != "classification":
                raise UserError(
                    f"data.class_weight is set but {self.name} is a {self.task} task; class "
                    "weights need class labels: remove data.class_weight (per-example "
                    "weights: data.w_key for npz, data.weight for csv)")
            if labels.shape[1] != 1:
                raise UserError(
                    f"data.class_weight is set but {self.name}'s targets have "
                    f"{labels.shape[1]} columns; class weights need one class label per example")
            table = class_weight_table(class_weight, labels[:, 0], name=self.name,
                                       num_classes=self.num_classes)
            # Training only, as Keras: validation measures the unweighted task.
            with np.errstate(over="ignore"):  # reported below
                train = train * table[labels[:, 0]].astype(np.float32)
            if not np.isfinite(train).all():
                row = int(np.argmax(~np.isfinite(train)))
                raise UserError(f"{self.name}: train row {row}'s sample weight times its class "
                                "weight overflows float32; use smaller weights")
            if not (train > 0).any():
                raise UserError(f"{self.name}: data.class_weight gives every training example "
                                "weight 0; give some class a positive weight")
        return train, val

    @property
    def weighted(self) -> bool:
        """Whether batches carry per-example weights: ``(x, y, w)``."""
        return self.w_train is not None

    @property
    def preprocess(self):
        """What the builder did to the raw features (a ``Scaling``, a function, or None)."""
        return self._preprocess

    @property
    def preparation(self):
        """``preprocess``: what ``prepare`` applies after reshaping rows."""
        return self._preprocess

    def prepare(self, x):
        """Raw features through ``preprocess`` (given by the data set's builder), as float32;
        rows of flat values (a CSV's) are first reshaped to ``input_shape``."""
        from trainer.data.preparation import reshape_rows

        x = reshape_rows(x, self.input_shape)
        return x if self._preprocess is None else np.asarray(self._preprocess(x), np.float32)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example's features."""
        return tuple(self.x_train.shape[1:])

    @property
    def num_outputs(self) -> int:
        """Width of the model's output layer: classes, or regression targets."""
        return self.num_classes if self.task == "classification" else int(self.y_train.shape[1])

    def steps_per_epoch(self, split: str = "train") -> int:
        """Batches in one pass over a split (the last one may be short)."""
        n = len(self.x_train if split == "train" else self.x_val)
        return -(-n // self.batch_size)

    def train_dataset(self):
        """Endless tf.data pipeline over the training set, reshuffled each epoch from the seed.

        Epoch ``e`` visits the examples in ``epoch_permutation(n, seed, e)`` order,
        the order the in-memory source uses, batched within the epoch (the last
        batch may be short); each batch is gathered by index.
        """
        import tensorflow as tf

        from trainer.data.sources import epoch_batches

        x, y = tf.constant(self.x_train), tf.constant(self.y_train)
        batches = epoch_batches(len(self.x_train), self.batch_size, self.seed, self.shuffle)
        if self.w_train is None:
            ds = batches.map(lambda i: (tf.gather(x, i), tf.gather(y, i)))
        else:  # the weights gathered with the same indices stay with their rows
            w = tf.constant(self.w_train)
            ds = batches.map(lambda i: (tf.gather(x, i), tf.gather(y, i), tf.gather(w, i)))
        return ds.prefetch(tf.data.AUTOTUNE)

    def val_dataset(self):
        """Endless tf.data pipeline over the validation set, in a fixed order."""
        import tensorflow as tf

        arrays = (self.x_val, self.y_val) if self.w_val is None else (
            self.x_val, self.y_val, self.w_val)
        ds = tf.data.Dataset.from_tensor_slices(arrays)
        return ds.batch(self.batch_size).repeat().prefetch(tf.data.AUTOTUNE)

    def probe_batch(self):
        """The first training batch of epoch 0 (a tensor pair, or triple when weighted)."""
        return next(iter(self.train_dataset().take(1)))

    def validation_batches(self) -> list:
        """The validation arrays in ``batch_size`` slices, in order (with ``w_val`` when
        weighted)."""
        size = self.batch_size
        if self.w_val is not None:
            return [(self.x_val[i:i + size], self.y_val[i:i + size], self.w_val[i:i + size])
                    for i in range(0, len(self.x_val), size)]
        return [(self.x_val[i:i + size], self.y_val[i:i + size])
                for i in range(0, len(self.x_val), size)]

    def holds_in_memory(self) -> bool:
        """Whether the sources hold the arrays as tensors (see ``in_memory``)."""
        if self.in_memory != "auto":
            return bool(self.in_memory)
        arrays = (self.x_train, self.y_train, self.x_val, self.y_val, self.w_train, self.w_val)
        overridden = type(self).train_dataset is not DataModule.train_dataset
        return not overridden and sum(
            a.nbytes for a in arrays if a is not None) <= IN_MEMORY_MAX_BYTES

    def train_source(self):
        """Where the compiled loop gets training batches: in memory or a tf.data iterator."""
        from trainer.data.sources import IteratorSource, TensorSource

        if self.holds_in_memory():
            return TensorSource(self.x_train, self.y_train, batch_size=self.batch_size,
                                seed=self.seed, shuffle=self.shuffle, w=self.w_train)
        return IteratorSource(self.train_dataset())

    def val_source(self):
        """Where evaluation gets its batches, in a fixed order."""
        from trainer.data.sources import IteratorSource, TensorSource

        if self.holds_in_memory():
            return TensorSource(self.x_val, self.y_val, batch_size=self.batch_size, shuffle=False,
                                w=self.w_val)
        return IteratorSource(self.val_dataset())


def split(x, y, *more, val_fraction: float, split_seed: int, stratify: bool, name: str):
    """Split arrays into a fixed train/validation pair; ``split_seed``, not ``seed``, fixes it.

    ``more`` arrays (sample weights) are split with the same rows: ``x_train, x_val,
    y_train, y_val, m_train, m_val, ...``, as ``sklearn``'s ``train_test_split``; the rows
    drawn depend only on the number of examples (and ``y`` when stratified).
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"data.val_fraction={val_fraction} must lie strictly between 0 and 1")
    if len(x) < 2:
        raise UserError(f"{name}: need at least 2 examples to split, found {len(x)}")
    return train_test_split(
        x, y, *more, test_size=val_fraction, random_state=split_seed,
        stratify=y if stratify else None,
    )
