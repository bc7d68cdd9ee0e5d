"""Folders of images, one sub-folder per class, indexed and split by Keras'
``image_dataset_from_directory``; held in memory when small, else streamed from disk.

``DIR/<class>/*.png`` (or .jpg, .jpeg, .bmp, .gif, in nested folders too): the class
names are the sub-folders' names in sorted order, as Keras infers them. The validation
set is Keras' ``validation_split`` of ``DIR`` by ``split_seed`` (the same files
``image_dataset_from_directory(DIR, validation_split=..., subset="both",
seed=split_seed)`` gives), unless ``DIR/train`` and ``DIR/val`` both exist: then they
are the two splits, each a folder of the same class sub-folders.

Every image is decoded to ``color_mode``'s channels, resized to ``image_size`` and
scaled to [0, 1] (divided by 255) by one function, Keras' loader plus the scaling, for
training and validation alike. Small folders (decoded arrays within
``trainer.data.base.IN_MEMORY_MAX_BYTES``) are decoded once into a ``DataModule``: the
fused in-memory loop, resumed exactly from its order and position. Larger ones, or any
with ``in_memory=false``, stream from disk, each batch decoded when it is needed, in the
same per-epoch order. Either way ``ImageFolderData`` checks the folder when it is built
and touches TensorFlow only when first used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import os
import re
from functools import partial
from pathlib import Path

from trainer.common.errors import UserError
from trainer.data.base import IN_MEMORY_MAX_BYTES, Data
from trainer.data.options import Batching, Split

log = logging.getLogger(__name__)

#: The file types Keras indexes (its ``ALLOWLIST_FORMATS``), matched case-insensitively.
FORMATS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
#: Channels of each ``color_mode``.
CHANNELS = {"grayscale": 1, "rgb": 3, "rgba": 4}
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5",
                  "gaussian", "mitchellcubic")
#: The first bytes of each format ``tf.io.decode_image`` reads.
MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
LAYOUT = "DIR/<class>/*.png, one sub-folder per class"


# --- the folder, checked before TensorFlow starts -----------------------------------------
def _class_folders(directory: Path) -> dict[str, list[str]]:
    """``{class: its image files}``, found as Keras finds them: non-hidden sub-folders in
    sorted order, image files anywhere below each, sorted."""
    classes = {}
    for name in sorted(os.listdir(directory)):
        if name.startswith(".") or not (directory / name).is_dir():
            continue
        files = []
        for root, _, names in sorted(os.walk(directory / name), key=lambda w: w[0]):
            files += [os.path.join(root, f) for f in sorted(names) if f.lower().endswith(FORMATS)]
        classes[name] = files
    return classes


def _check_classes(directory: Path, classes: dict[str, list[str]]) -> None:
    if not classes:
        loose = [f for f in os.listdir(directory) if f.lower().endswith(FORMATS)]
        found = f" but {_count(len(loose), 'image')} directly in it" if loose else ""
        raise UserError(f"{directory}: no class sub-folders{found}; put each class's images in "
                        f"its own sub-folder ({LAYOUT})")
    if not any(classes.values()):
        raise UserError(f"{directory}: no images ({', '.join(FORMATS)}) in its class sub-folders "
                        f"{sorted(classes)}; add images ({LAYOUT})")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise UserError(f"{directory / empty[0]}: no images ({', '.join(FORMATS)}) in this class "
                        "sub-folder; add images of the class or remove the folder")
    if len(classes) < 2:
        raise UserError(f"{directory}: only one class sub-folder ({next(iter(classes))}); a "
                        "classifier needs at least 2: add a sub-folder of images per class")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _find(path) -> tuple[Path, dict[str, Path]]:
    """The folder and where each split comes from: ``{"train": DIR/train, "val":
    DIR/val}`` when both exist, else ``{"all": DIR}`` (split by ``val_fraction``)."""
    if not path or path == "???":
        raise UserError(f"data.path is not set; pass data.path=DIR, a folder of images in class "
                        f"sub-folders ({LAYOUT})")
    directory = Path(os.path.expanduser(str(path)))
    if not directory.is_dir():
        what = "is a file, not a folder" if directory.exists() else "does not exist"
        raise UserError(f"data.path={path} {what}; point it at a folder of images in class "
                        f"sub-folders ({LAYOUT})")
    if (directory / "train").is_dir() and (directory / "val").is_dir():
        return directory, {"train": directory / "train", "val": directory / "val"}
    return directory, {"all": directory}


def _check_options(color_mode, interpolation, image_size) -> None:
    if color_mode not in CHANNELS:
        raise UserError(f"data.color_mode={color_mode!r} must be one of {', '.join(CHANNELS)}")
    if interpolation not in INTERPOLATIONS:
        raise UserError(f"data.interpolation={interpolation!r} must be one of "
                        f"{', '.join(INTERPOLATIONS)}")
    if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
        raise UserError(f"data.image_size={list(image_size)} must be [height, width] in pixels, "
                        "e.g. [64,64], or null for the first image's size")


def _check_folder(path, val_fraction: float):
    """The folder, where each split comes from and ``{split: {class: files}}``, checked
    (``val_fraction``: a ``Split``'s, checked by it)."""
    directory, sources = _find(path)
    found = {split: _class_folders(d) for split, d in sources.items()}
    for split, d in sources.items():
        _check_classes(d, found[split])
    if "val" in found and list(found["val"]) != list(found["train"]):
        missing = sorted(set(found["train"]) - set(found["val"]))
        extra = sorted(set(found["val"]) - set(found["train"]))
        raise UserError(f"{sources['val']}: its class sub-folders differ from {sources['train']}'s "
                        f"(missing: {missing or 'none'}, extra: {extra or 'none'}); give both "
                        "splits the same class sub-folders")
    if "all" in found:
        total = sum(len(f) for f in found["all"].values())
        if int(val_fraction * total) == 0:
            raise UserError(f"{directory}: data.val_fraction={val_fraction} of "
                            f"{_count(total, 'image')} leaves no validation image; raise "
                            "data.val_fraction or add images")
    return directory, sources, found


def _check_header(file: str) -> None:
    try:
        with open(file, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise UserError(f"{file}: cannot be read ({e.strerror}); fix its permissions or remove "
                        "it") from None
    if not head.startswith(MAGIC):
        raise UserError(f"{file}: not a PNG, JPEG, GIF or BMP image; replace or remove the file")


# --- decoding -----------------------------------------------------------------------------
def loader(image_size, channels: int, interpolation: str):
    """``path -> image``: decoded to ``channels``, resized to ``image_size`` (as Keras'
    ``image_dataset_from_directory`` does), float32 in [0, 1]. The one decoding of both
    splits and both paths (memory and streaming)."""
    import tensorflow as tf

    height, width = image_size

    def load(path):
        image = tf.io.decode_image(tf.io.read_file(path), channels=channels,
                                   expand_animations=False)
        image = tf.image.resize(image, [height, width], method=interpolation)
        image = tf.cast(image, tf.float32) / 255.0  # "nearest" keeps uint8
        image.set_shape([height, width, channels])
        return image

    return load


def _decode_all(files: list[str], load) -> object:
    """Every file decoded, as one float32 array; a file TensorFlow cannot decode is a
    ``UserError`` naming it."""
    import numpy as np
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(files).map(load, num_parallel_calls=tf.data.AUTOTUNE)
    try:
        return np.concatenate([b.numpy() for b in ds.batch(256)])
    except tf.errors.OpError:
        pass
    for file in files:  # find the culprit: decode one at a time
        try:
            load(tf.constant(file))
        except tf.errors.OpError as e:
            raise _unreadable(file, e) from None
    raise AssertionError("a batch failed to decode but every file decodes alone")


def _first_size(file: str) -> list[int]:
    """Height and width of one image, to size every image like it (``image_size=null``)."""
    import tensorflow as tf

    try:
        shape = tf.io.decode_image(tf.io.read_file(file), expand_animations=False).shape
    except tf.errors.OpError as e:
        raise _unreadable(file, e) from None
    return [int(shape[0]), int(shape[1])]


def _unreadable(file: str, error) -> UserError:
    """``file`` named with TensorFlow's reason, without its op and device decorations."""
    reason = (getattr(error, "message", None) or str(error)).strip().splitlines()[0]
    reason = re.sub(r"\{\{[^}]*\}\}\s*|\s*\[Op:.*$", "", reason)
    return UserError(f"{file}: not a readable image ({reason}); replace or remove the file")


# --- the data set -------------------------------------------------------------------------
class ImageFolderData(Data):
    """A folder of class sub-folders of images (see ``images``), read when first used.

    Building it checks the folder without TensorFlow: the driver builds the data first,
    and a strategy over several devices can only be set up before TensorFlow starts. The
    first use (``input_shape``, when the driver builds the model) lists and splits the
    files with Keras' ``image_dataset_from_directory`` and then either decodes every
    image into a ``DataModule`` (``module``: the fused in-memory loop) or leaves them on
    disk to stream through tf.data (``module`` is None). Streaming, epoch ``e`` visits
    the training files in ``epoch_permutation(n, seed, e)`` order (the in-memory
    order), batched within the epoch (the last batch may be short), each batch decoded
    when the pipeline reaches it; the checkpoint holds the iterator (epoch and position,
    no images). Validation files are read in a fixed order.

    Args:
        directory: the folder; ``sources``: where each split comes from (``_find``).
        classes: ``{class: its image files}`` in class order (of ``DIR/train`` if split).
        image_size, color_mode, interpolation: as ``images``'s.
        batching: a ``trainer.data.Batching``; ``split``: a ``trainer.data.Split``
            (unused with ``DIR/train`` and ``DIR/val``).
    """

    task = "classification"

    def prepare(self, x):
        """Raw pixels (0-255, already at ``image_size``) scaled as training saw them."""
        import numpy as np

        return np.asarray(x, np.float32) / 255.0

    @property
    def preparation(self):
        """``prepare`` as a ``Scaling``: pixels divided by 255."""
        from trainer.data.preparation import Scaling

        return Scaling(divide_by=255)

    def __init__(self, *, directory: Path, sources: dict, classes: dict[str, list[str]],
                 image_size, color_mode: str, interpolation: str,
                 batching: Batching = Batching(), split: Split = Split()):
        super().__init__(batching=batching)
        self.directory, self.name, self.sources = directory, str(directory), sources
        #: The class names, and the first image (its size is ``image_size=None``'s).
        self.class_names = list(classes)
        self.first = next(files[0] for files in classes.values())
        self.image_size = None if image_size is None else [int(v) for v in image_size]
        self.channels, self.color_mode, self.interpolation = (CHANNELS[color_mode], color_mode,
                                                              interpolation)
        self.split = split
        #: By split: file paths and class indices (read at the first use).
        self.files: dict = {}
        self.labels: dict = {}
        #: The decoded images when held in memory, else None (read at the first use).
        self.module = None

    def _prepare(self) -> None:
        """List, split and (in memory) decode the images, once."""
        if self.files:
            return
        if self.image_size is None:
            self.image_size = _first_size(self.first)
        files, labels = _index(self.sources, self.image_size, self.color_mode,
                               self.split.val_fraction, self.split.split_seed, self.class_names)
        self.load = loader(self.image_size, self.channels, self.interpolation)
        nbytes = 4 * math.prod(self.image_shape) * (len(files["train"]) + len(files["val"]))
        memory = (self.in_memory if isinstance(self.in_memory, bool)
                  else nbytes <= IN_MEMORY_MAX_BYTES)
        if memory:
            from trainer.data.base import DataModule

            self.module = DataModule(
                train=(_decode_all(files["train"], self.load), labels["train"]),
                val=(_decode_all(files["val"], self.load), labels["val"]),
                task="classification", name=self.name,
                batching=dataclasses.replace(self.batching, in_memory=True))
        else:
            for file in files["train"] + files["val"]:
                _check_header(file)
        log.info("%s: %d classes, %d training and %d validation images, %dx%dx%d, %s",
                 self.name, len(self.class_names), len(files["train"]), len(files["val"]),
                 *self.image_shape, "decoded into memory" if memory else "streamed from disk")
        self.files, self.labels = files, labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (*self.image_size, self.channels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(height, width, channels)``."""
        self._prepare()
        return self.image_shape

    @property
    def num_outputs(self) -> int:
        """The number of classes."""
        return len(self.class_names)

    def steps_per_epoch(self, split: str = "train") -> int:
        """Batches in one pass over a split (the last one may be short)."""
        self._prepare()
        return -(-len(self.files["train" if split == "train" else "val"]) // self.batch_size)

    def _decode_batch(self, split: str):
        import tensorflow as tf

        paths = tf.constant(self.files[split])
        labels = tf.constant(self.labels[split], tf.int32)
        spec = tf.TensorSpec(self.image_shape, tf.float32)

        def decode(indices):
            images = tf.map_fn(self.load, tf.gather(paths, indices), fn_output_signature=spec)
            return images, tf.gather(labels, indices)

        return decode

    def train_dataset(self):
        """Endless tf.data pipeline of training batches, reshuffled each epoch from the seed."""
        import tensorflow as tf

        from trainer.data.sources import epoch_batches

        self._prepare()
        if self.module is not None:
            return self.module.train_dataset()
        batches = epoch_batches(len(self.files["train"]), self.batch_size, self.seed,
                                self.shuffle)
        ds = batches.map(self._decode_batch("train"), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    def _val_pass(self):
        import tensorflow as tf

        n = len(self.files["val"])
        ds = tf.data.Dataset.range(n).map(lambda i: tf.cast(i, tf.int32)).batch(self.batch_size)
        return ds.map(self._decode_batch("val"), num_parallel_calls=tf.data.AUTOTUNE)

    def val_dataset(self):
        """Endless tf.data pipeline of validation batches, in a fixed order."""
        import tensorflow as tf

        self._prepare()
        if self.module is not None:
            return self.module.val_dataset()
        return self._val_pass().repeat().prefetch(tf.data.AUTOTUNE)

    def train_source(self):
        """In memory, the ``DataModule``'s; streaming, an ``IteratorSource`` over
        ``train_dataset()`` (the checkpoint holds its position)."""
        from trainer.data.sources import IteratorSource

        self._prepare()
        if self.module is not None:
            return self.module.train_source()
        return IteratorSource(self.train_dataset())

    def val_source(self):
        """In memory, the ``DataModule``'s; streaming, an ``IteratorSource``."""
        from trainer.data.sources import IteratorSource

        self._prepare()
        if self.module is not None:
            return self.module.val_source()
        return IteratorSource(self.val_dataset())

    def probe_batch(self):
        """The first training batch of epoch 0 (a tensor pair)."""
        return next(iter(self.train_dataset().take(1)))

    def validation_batches(self) -> list:
        """The validation set once, as ``(x, y)`` numpy batches (streaming, held in memory:
        callbacks that ask for it need it whole)."""
        self._prepare()
        if self.module is not None:
            return self.module.validation_batches()
        return [(x.numpy(), y.numpy()) for x, y in self._val_pass()]


# --- the data config's target -------------------------------------------------------------
def images(
    *,
    path: str,
    image_size: list[int] | None = None,
    color_mode: str = "rgb",
    interpolation: str = "bilinear",
    batching: Batching = Batching(),
    split: Split = Split(),
) -> ImageFolderData:
    """A classification data set from ``path``, a folder of class sub-folders of images.

    Args:
        path: ``DIR`` with ``DIR/<class>/*.png`` (any of ``FORMATS``), or ``DIR/train``
            and ``DIR/val`` each holding the same class sub-folders.
        image_size: ``[height, width]`` every image is resized to; ``None``: the size
            of the first image (in sorted path order; of ``DIR/train`` if split).
        color_mode: ``grayscale`` (1 channel), ``rgb`` (3) or ``rgba`` (4).
        interpolation: the resize method (``tf.image.resize``'s, as Keras').
        batching: a ``trainer.data.Batching``: ``batch_size``, examples per batch, over
            all replicas (the global batch); ``seed``, ``shuffle``: the per-epoch
            shuffle of the training set; ``in_memory``: ``auto`` decodes every image
            once into memory when the arrays take at most ``IN_MEMORY_MAX_BYTES``, else
            streams them from disk; ``true`` always decodes into memory, ``false``
            always streams.
        split: a ``trainer.data.Split``: Keras' ``validation_split`` and ``seed``: the
            files are shuffled by ``split_seed`` and the last ``val_fraction``
            validate. Unused with ``DIR/train`` and ``DIR/val``.

    Checked here, without TensorFlow: the options, the folder, its class sub-folders
    (at least 2, each with an image), the split and the batch size. Checked at the first
    use: every image decodes (in memory) or starts like an image file (streaming).
    """
    _check_options(color_mode, interpolation, image_size)
    directory, sources, found = _check_folder(path, split.val_fraction)
    if "all" in found:
        total = sum(len(f) for f in found["all"].values())
        train = total - int(split.val_fraction * total)  # as Keras splits
    else:
        train = sum(len(f) for f in found["train"].values())
    batching.check_fits(train, str(directory), "training image")
    return ImageFolderData(
        directory=directory, sources=sources, classes=next(iter(found.values())),
        image_size=image_size, color_mode=color_mode, interpolation=interpolation,
        batching=batching, split=split)


def _index(sources: dict[str, Path], image_size, color_mode: str, val_fraction: float,
           split_seed: int, class_names: list[str]):
    """File paths and labels by split from Keras' ``image_dataset_from_directory`` (its
    file list and split; nothing is decoded)."""
    import keras
    import numpy as np

    load = partial(keras.utils.image_dataset_from_directory, labels="inferred",
                   label_mode="int", color_mode=color_mode, batch_size=None,
                   image_size=tuple(image_size), class_names=class_names, verbose=False)
    # Keras prints "Using N files for training." whatever verbose says; the run logs it once.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            if "all" in sources:
                train, val = load(str(sources["all"]), shuffle=True, seed=split_seed,
                                  validation_split=val_fraction, subset="both")
                roots = {"train": sources["all"], "val": sources["all"]}
            else:
                train = load(str(sources["train"]), shuffle=False)
                val = load(str(sources["val"]), shuffle=False)
                roots = sources
        except ValueError as e:  # the folder's checks leave Keras nothing to reject
            raise UserError(f"{next(iter(sources.values()))}: {e}") from None
    index = {name: i for i, name in enumerate(class_names)}
    files = {"train": list(train.file_paths), "val": list(val.file_paths)}
    # A file's class is its first folder below the split's root, as Keras labels it.
    labels = {split: np.array([index[Path(os.path.relpath(f, roots[split])).parts[0]]
                               for f in files[split]], np.int32) for split in files}
    return files, labels
