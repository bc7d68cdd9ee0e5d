"""Images: the digits as 8x8x1 images, the cnn model and experiment, and data=images over a
folder of class sub-folders of PNGs (memory and streaming, the split, errors)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import cli
from trainer.common.errors import UserError
from trainer.data import Batching, DataModule, ImageFolderData, Split, digits, images
from trainer.driver.run import build, run
from trainer.models import cnn

PATTERNS = ("horizontal", "vertical", "diagonal")


def pattern(kind: int, rng, size: int = 8) -> np.ndarray:
    """A noisy stripe image (uint8, size x size) of one kind (0: horizontal, 1: vertical,
    2: diagonal stripes), at a random phase."""
    i, j = np.mgrid[:size, :size]
    phase = rng.integers(4)
    line = (i, j, i + j)[kind % 3]
    image = np.where((line + phase) % 4 < 2, 200.0, 40.0) + rng.normal(0, 20, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_png(path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = image[..., None] if image.ndim == 2 else image
    path.write_bytes(tf.io.encode_png(image).numpy())


def write_folder(root, *, classes=PATTERNS, per_class: int = 12, size: int = 8, seed: int = 0):
    """``root/<class>/<i>.png``: ``per_class`` grayscale stripe images of each class."""
    rng = np.random.default_rng(seed)
    for kind, name in enumerate(classes):
        for k in range(per_class):
            write_png(root / name / f"{k:03d}.png", pattern(kind, rng, size))
    return root


@pytest.fixture
def folder(tmp_path):
    return write_folder(tmp_path / "stripes", per_class=20)


# --- the digits as images, the model, the experiment ---------------------------------------
def test_digits_as_images_are_the_same_pixels_and_split():
    flat, square = digits(), digits(images=True)
    assert square.input_shape == (8, 8, 1) and flat.input_shape == (64,)
    np.testing.assert_array_equal(square.x_train.reshape(len(square.x_train), 64), flat.x_train)
    np.testing.assert_array_equal(square.y_val, flat.y_val)


def test_cnn_needs_images():
    with pytest.raises(UserError, match=r"data\.images=true"):
        cnn(input_shape=(64,), num_outputs=10)


def test_cnn_experiment_builds_a_conv2d_model(make_cfg, tmp_path):
    r = build(make_cfg("+experiment=cnn"), run_dir=tmp_path)
    model = r.models["model"]
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [32, 64]
    assert model.input_shape == (None, 8, 8, 1) and model.output_shape == (None, 10)
    assert r.data.input_shape == (8, 8, 1)


@pytest.mark.slow
def test_cnn_experiment_reaches_its_accuracy(tmp_path):
    """The shipped defaults through the real CLI (about 15 s): at least 0.98."""
    run_dir = tmp_path / "run"
    p = cli("+experiment=cnn", "callbacks=none", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["val/accuracy"] >= 0.98, metrics


# --- data=images ----------------------------------------------------------------------------
def test_a_cnn_learns_a_folder_of_pngs(make_cfg, tmp_path, folder):
    cfg = make_cfg("data=images", f"data.path={folder}", "data.color_mode=grayscale",
                   "data.batch_size=8", "model=cnn", "trainer.epochs=12", "callbacks=none")
    metrics = run(cfg, run_dir=tmp_path / "run")
    assert metrics["val/accuracy"] >= 0.9, metrics  # chance: 1/3
    assert keras.models.load_model(tmp_path / "run" / "model.keras").input_shape == (None, 8, 8, 1)


def test_the_split_and_pixels_are_keras_own(folder):
    data = images(path=str(folder), color_mode="grayscale", batching=Batching(batch_size=8))
    assert data.class_names == sorted(PATTERNS) and data.num_outputs == 3
    assert data.input_shape == (8, 8, 1) and isinstance(data.module, DataModule)
    _, val = keras.utils.image_dataset_from_directory(
        folder, color_mode="grayscale", image_size=(8, 8), batch_size=None, seed=0,
        validation_split=0.2, subset="both", verbose=False)
    x, y = (np.stack(a) for a in zip(*[(x.numpy(), y.numpy()) for x, y in val]))
    arrays = data.module
    np.testing.assert_array_equal(arrays.x_val, x / 255.0)
    np.testing.assert_array_equal(arrays.y_val, y)
    assert len(arrays.x_train) == 48 and 0.0 <= arrays.x_train.min() < arrays.x_train.max() <= 1


def test_streaming_gives_the_in_memory_batches(folder):
    kw = {"path": str(folder), "color_mode": "grayscale"}
    memory = images(**kw, batching=Batching(batch_size=7, seed=3))
    stream = images(**kw, batching=Batching(batch_size=7, seed=3, in_memory=False))
    assert stream.input_shape == memory.input_shape == (8, 8, 1)
    assert stream.module is None and memory.module is not None
    assert stream.steps_per_epoch() == memory.steps_per_epoch() == 7  # 48 = 6 x 7 + 6
    # Two epochs: the per-epoch orders and the short last batch agree.
    pairs = zip(memory.train_dataset().take(14), stream.train_dataset().take(14))
    for (xa, ya), (xb, yb) in pairs:
        np.testing.assert_allclose(xa.numpy(), xb.numpy(), atol=1e-7)
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())
    for (xa, ya), (xb, yb) in zip(memory.validation_batches(), stream.validation_batches(),
                                  strict=True):
        np.testing.assert_allclose(xa, xb, atol=1e-7)
        np.testing.assert_array_equal(ya, yb)


def test_a_streamed_iterator_resumes_exactly(tmp_path, folder):
    data = images(path=str(folder), color_mode="grayscale",
                  batching=Batching(batch_size=8, in_memory=False))
    source = data.train_source()
    for _ in range(4):
        source.next()
    ckpt = tf.train.Checkpoint(**source.state())
    saved = ckpt.write(str(tmp_path / "ckpt"))
    expected = [source.next()[1].numpy() for _ in range(5)]  # crosses the epoch's end
    restored = data.train_source()
    tf.train.Checkpoint(**restored.state()).read(saved).assert_consumed()
    for labels in expected:
        np.testing.assert_array_equal(restored.next()[1].numpy(), labels)


def test_a_cnn_trains_on_streamed_images(make_cfg, tmp_path, folder):
    cfg = make_cfg("data=images", f"data.path={folder}", "data.in_memory=false",
                   "data.batch_size=8", "model=cnn", "trainer.epochs=2", "callbacks=none")
    r = build(cfg, run_dir=tmp_path)
    assert isinstance(r.data, ImageFolderData) and r.data.module is None
    assert r.data.input_shape == (8, 8, 3)  # rgb by default
    logs = r.trainer.fit(r.step, r.data)
    assert logs["step"] == 12 and np.isfinite(logs["val/loss"])


@pytest.mark.slow
@pytest.mark.parametrize("in_memory", ["auto", "false"])
def test_images_train_on_two_replicas(tmp_path, folder, in_memory):
    """Building the data runs no TensorFlow: the strategy's logical devices come after it."""
    run_dir = tmp_path / "run"
    p = cli("data=images", f"data.path={folder}", f"data.in_memory={in_memory}",
            "data.batch_size=8", "model=cnn", "trainer.epochs=2", "callbacks=none",
            "distribute=mirrored", "distribute.cpu_replicas=2", f"hydra.run.dir={run_dir}",
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == 12


def test_train_and_val_folders_are_the_split(tmp_path):
    write_folder(tmp_path / "d" / "train", per_class=5, seed=1)
    write_folder(tmp_path / "d" / "val", per_class=2, seed=2)
    data = images(path=str(tmp_path / "d"), color_mode="grayscale",
                  batching=Batching(batch_size=4))
    assert data.steps_per_epoch("train") == 4 and data.steps_per_epoch("val") == 2
    assert len(data.module.x_train) == 15 and len(data.module.x_val) == 6
    assert list(data.module.y_val) == [0, 0, 1, 1, 2, 2]  # in file order: the sorted class folders


def test_image_size_resizes_and_color_mode_sets_channels(tmp_path):
    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    for kind in ("a", "b"):
        for k in range(5):
            image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
            write_png(root / kind / f"{k}.png", image)
    (root / "b" / "5.jpg").write_bytes(tf.io.encode_jpeg(image).numpy())
    assert images(path=str(root),  # the first image's size
                  batching=Batching(batch_size=2)).input_shape == (12, 10, 3)
    data = images(path=str(root), image_size=[6, 4], color_mode="grayscale",
                  batching=Batching(batch_size=2))
    assert data.input_shape == (6, 4, 1)
    assert len(data.module.x_train) + len(data.module.x_val) == 11


# --- errors: one line naming the culprit and the fix ----------------------------------------
def _error(**kw) -> str:
    with pytest.raises(UserError) as e:
        batching = Batching(batch_size=kw.pop("batch_size", 4),
                            in_memory=kw.pop("in_memory", "auto"))
        split = Split(val_fraction=kw.pop("val_fraction", 0.2))
        images(**kw, batching=batching, split=split).input_shape  # noqa: B018 (the first use reads)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_a_missing_folder_or_a_file_is_named(tmp_path):
    assert "does not exist" in _error(path=str(tmp_path / "nope"))
    (tmp_path / "f.png").write_bytes(b"x")
    assert "is a file" in _error(path=str(tmp_path / "f.png"))
    assert "data.path is not set" in _error(path="???")


def test_images_outside_class_folders_are_named(tmp_path):
    write_png(tmp_path / "d" / "loose.png", np.zeros((8, 8), np.uint8))
    message = _error(path=str(tmp_path / "d"))
    assert "no class sub-folders but 1 image directly in it" in message


def test_class_folders_without_images_are_named(tmp_path):
    for kind in ("a", "b"):
        (tmp_path / "d" / kind).mkdir(parents=True)
    (tmp_path / "d" / "a" / "notes.txt").write_text("not an image")
    assert "no images" in _error(path=str(tmp_path / "d"))
    write_folder(tmp_path / "d", classes=("a",), per_class=4)
    message = _error(path=str(tmp_path / "d"))
    assert f"{tmp_path / 'd' / 'b'}: no images" in message and "remove the folder" in message


def test_one_class_is_not_enough(tmp_path):
    write_folder(tmp_path / "d", classes=("only",), per_class=6)
    assert "only one class sub-folder (only)" in _error(path=str(tmp_path / "d"))


def test_an_unreadable_image_is_named(tmp_path):
    root = write_folder(tmp_path / "d", per_class=6)
    bad = root / "vertical" / "003.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"truncated")  # a PNG header, then garbage
    message = _error(path=str(root), color_mode="grayscale")
    assert message.startswith(f"{bad}: not a readable image") and "remove the file" in message
    bad.write_bytes(b"plain text")
    message = _error(path=str(root), in_memory=False)  # streaming checks each file's header
    assert message.startswith(f"{bad}: not a PNG, JPEG, GIF or BMP image")


def test_split_problems_are_named(tmp_path):
    root = write_folder(tmp_path / "d", per_class=1)
    assert "leaves no validation image" in _error(path=str(root), val_fraction=0.1)
    write_folder(tmp_path / "s" / "train", per_class=3)
    write_folder(tmp_path / "s" / "val", classes=PATTERNS[:2], per_class=1)
    message = _error(path=str(tmp_path / "s"))
    assert "differ" in message and "missing: ['diagonal']" in message
    assert "larger than the 29 training images" in _error(
        path=str(write_folder(tmp_path / "b")), batch_size=64)
