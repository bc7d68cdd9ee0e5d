"""Writing a configured data set into TFRecord shards (``python -m trainer.export_data``).

The config is the training run's (``configs/export_data.yaml`` composes ``config.yaml``
and adds ``out``, ``shards`` and ``overwrite``); the data node is built as training
would build it, and its train and validation arrays (prepared, as training sees them)
are written by ``write_shards`` into a temporary directory beside ``out``, renamed to
``out`` once complete: ``out`` is never half written. ``meta.json`` records the
preparation, so a run on the shards prepares new inputs as the data set does. The
format is ``trainer.data.tfrecord``'s.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from trainer.common.atomic import default_mode
from trainer.common.errors import UserError
from trainer.data.base import TASKS
from trainer.data.preparation import describe
from trainer.data.tfrecord_meta import FORMAT, META, VERSION, shard_name, write_meta

#: The root keys of this command, beside a training run's.
EXPORT_KEYS = ("out", "shards", "overwrite")



def _run_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` without the export's keys: the config a training run would validate."""
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k not in EXPORT_KEYS])



# --- writing the shards ------------------------------------------------------------------
def _example(x_row, y_row, task: str) -> bytes:
    import tensorflow as tf

    example = tf.train.Example()
    feature = example.features.feature
    feature["x"].float_list.value.extend(x_row.ravel().tolist())
    if task == "classification":
        feature["y"].int64_list.value.append(int(y_row))
    else:
        feature["y"].float_list.value.extend(np.ravel(y_row).tolist())
    return example.SerializeToString()



def write_shards(directory, *, x_train, y_train, x_val, y_val, task: str, num_outputs: int,
                 shards: int, name: str = "data", shuffle_seed: int = 0,
                 preparation: dict | None = None) -> dict:
    """Write both splits into ``directory`` (which must exist) as TFRecord shards, and the
    metadata last; returns the metadata.

    Each split is cut into up to ``shards`` shards of near-equal size (never an empty
    one). The training rows are written in a fixed random order (``shuffle_seed``), so
    that a small shuffle buffer still mixes a source sorted by class; the validation
    rows in their own order. Features are written as float32, as given: ``preparation``
    (``Scaling.to_json()``, or None) records what was done to them beforehand.
    """
    import tensorflow as tf

    directory = Path(directory)
    if task not in TASKS:
        raise UserError(f"task={task!r} is not one of {TASKS}")
    if shards < 1:
        raise UserError(f"shards={shards} must be at least 1")
    x_train, x_val = np.asarray(x_train, np.float32), np.asarray(x_val, np.float32)
    if x_train.ndim < 2:
        raise UserError(f"{name}: features are one number per example (shape {x_train.shape})"
                        "; give them a feature axis, shape (examples, 1)")
    if x_train.shape[1:] != x_val.shape[1:]:
        raise UserError(f"{name}: train features have shape {x_train.shape[1:]}, validation "
                        f"features {x_val.shape[1:]}")
    order = np.random.default_rng(shuffle_seed).permutation(len(x_train))
    rows = {"train": (x_train, np.asarray(y_train), order),
            "val": (x_val, np.asarray(y_val), np.arange(len(x_val)))}
    splits = {}
    for split, (x, y, order) in rows.items():
        parts = [p for p in np.array_split(order, min(shards, len(order))) if len(p)]
        entries = []
        for i, part in enumerate(parts):
            filename = shard_name(split, i, len(parts))
            with tf.io.TFRecordWriter(str(directory / filename)) as writer:
                for row in part:
                    writer.write(_example(x[row], y[row], task))
            entries.append({"file": filename, "examples": len(part),
                            "bytes": (directory / filename).stat().st_size})
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        splits[split] = {"examples": len(x), "nonfinite_examples": int((~finite).sum()),
                         "shards": entries}
    meta = {"format": FORMAT, "version": VERSION, "name": name, "task": task,
            "x_key": "x", "y_key": "y", "feature_shape": list(x_train.shape[1:]),
            "feature_dtype": "float32", "num_outputs": int(num_outputs),
            "preparation": preparation, "splits": splits}
    write_meta(directory, meta)
    return meta



# --- the command ---------------------------------------------------------------------------
def export(cfg: DictConfig) -> dict:
    """Build ``cfg.data`` and write it as shards into ``cfg.out``; return the metadata.

    Refuses a non-empty ``out`` unless ``cfg.overwrite``. The shards are written into a
    temporary directory that replaces ``out`` only when complete.
    """
    from trainer.driver.run import instantiate_data
    from trainer.driver.validation import validate

    out = cfg.get("out")
    if OmegaConf.is_missing(cfg, "out") or not out:
        raise UserError("out is not set; pass out=DIR, the directory to write the shards into")
    if cfg.shards < 1:
        raise UserError(f"shards={cfg.shards} must be at least 1")
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file; pass a directory")
    if out.is_dir() and any(out.iterdir()):
        if not cfg.overwrite:
            raise UserError(f"out={out} is not empty; choose another directory or pass "
                            "overwrite=true to replace it")
        if not (out / META).is_file():
            # overwrite=true deletes the old directory: only ever an earlier export.
            raise UserError(f"out={out} holds files but no {META}: not an earlier export, so "
                            "overwrite=true will not delete it; choose another directory")
    validate(_run_config(cfg))
    data = instantiate_data(cfg.data)
    arrays = [getattr(data, k, None) for k in ("x_train", "y_train", "x_val", "y_val")]
    if any(a is None for a in arrays):
        raise UserError(f"data {type(data).__name__} holds no x_train/y_train/x_val/y_val "
                        "arrays to export; export a data set built on trainer.data.DataModule")
    if getattr(data, "weighted", False):
        # The shards hold x and y only: dropping the weights silently would change what a
        # run on them learns.
        raise UserError("the data is weighted, but TFRecord shards hold no per-example "
                        "weights; export it without data.class_weight, data.w_key or "
                        "data.weight")
    preparation = _preparation(data)
    x_train, y_train, x_val, y_val = arrays
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        meta = write_shards(tmp, x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val,
                            task=data.task, num_outputs=data.num_outputs, shards=cfg.shards,
                            name=getattr(data, "name", type(data).__name__),
                            preparation=preparation)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta



def _preparation(data) -> dict | None:
    """What ``data`` did to its raw features, as ``meta.json`` records it: the arrays are
    written prepared, and a run on the shards must prepare new inputs the same way."""
    from trainer.data.base import Data, DataModule

    name = getattr(data, "name", type(data).__name__)
    if type(data).prepare not in (Data.prepare, DataModule.prepare):
        raise UserError(f"data {name}: {type(data).__name__} overrides prepare, which "
                        f"{META} cannot record; pass its preparation as preprocess="
                        "trainer.data.Scaling(...) instead")
    try:
        return describe(getattr(data, "preprocess", None))
    except ValueError as e:
        raise UserError(f"data {name}: its preprocess {e} that {META} cannot record; pass "
                        "preprocess=trainer.data.Scaling(divide_by=..., subtract=...) "
                        "instead") from None



def _replace(new: Path, out: Path) -> None:
    """Move the complete directory ``new`` to ``out``, replacing what ``out`` held.

    A rename is atomic, but cannot replace a non-empty directory: the old one is first
    renamed aside (so ``out`` is always either the old export or the new one, or for
    an instant absent) and deleted once the new one is in place.
    """
    new.chmod(default_mode(directory=True))  # mkdtemp makes it private to the user
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "out")
    os.replace(new, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
