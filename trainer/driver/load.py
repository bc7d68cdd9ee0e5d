"""A trained run, back from its directory: the config it ran with, its data, its step with
the trained weights. Used by ``python -m trainer.evaluate`` and ``python -m trainer.predict``.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.common.errors import UserError


@dataclass
class TrainedRun:
    """``cfg`` (the run's resolved config, overrides applied), ``data``, ``step`` (its
    models hold the trained weights) and ``weights`` (where they came from)."""

    cfg: Any
    data: Any
    step: Any
    weights: str


def run_parser(prog: str, description: str):
    """The arguments both commands take: the run dir, ``key=value`` overrides, --checkpoint."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a directory python -m trainer wrote")
    p.add_argument("overrides", nargs="*", help="key=value changes to the run's config")
    p.add_argument("--checkpoint", help="latest, best or a checkpoint path (default: the "
                                        "run's model.keras)")
    return p


def load_run(run_dir: str, *, checkpoint: str | None = None, overrides=()) -> TrainedRun:
    """Rebuild the run in ``run_dir`` from its ``.hydra/config.yaml`` (plus ``overrides``,
    ``key=value`` strings: another ``data.path``) and load its trained weights: the
    models' ``.keras`` files, or with ``checkpoint`` (``latest``, ``best`` or a path)
    a checkpoint of the run. The model is built by the run's own config (its module
    imported by ``_target_``), so custom models need no registration by hand, and the
    data set applies its own preprocessing.
    """
    from omegaconf import OmegaConf

    root = Path(run_dir)
    config = root / ".hydra" / "config.yaml"
    if not root.is_dir():
        raise UserError(f"{root}: no such run directory; pass the directory a training run "
                        "wrote (hydra.run.dir)")
    if not config.is_file():
        raise UserError(f"{root}: not a run directory (no .hydra/config.yaml); pass the "
                        "directory python -m trainer wrote")
    cfg = OmegaConf.load(config)
    for override in overrides:
        if "=" not in override:
            raise UserError(f"{override!r}: overrides are key=value (data.path=new.csv)")
        key, value = override.split("=", 1)
        OmegaConf.update(cfg, key.lstrip("+"), _parse(value), force_add=key.startswith("+"))
    from trainer.driver.run import build
    from trainer.driver.schemas import register_configs

    register_configs()
    with tempfile.TemporaryDirectory(prefix="trainer-inference-") as scratch:
        # Callbacks would write into the run dir: a built run trains nothing, so none are
        # needed, and the trainer's directory is a throwaway.
        cfg.callbacks = {}
        r = build(cfg, scratch)
    source = _load_weights(root, r.step, checkpoint)
    if checkpoint and r.trainer.ships_average:
        _load_average(source, r)
    return TrainedRun(cfg=r.cfg, data=r.data, step=r.step, weights=source)


def _parse(value: str):
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _load_weights(root: Path, step, checkpoint: str | None) -> str:
    import tensorflow as tf

    if checkpoint:
        path = _checkpoint_path(root, checkpoint)
        fix = "pass a checkpoint of this run, without overrides that change the model"
        try:
            status = tf.train.Checkpoint(models=step.models).read(path).expect_partial()
            # Reading is lenient: a variable the checkpoint lacks would keep its random
            # initial value, and the run would be evaluated on it without a word.
            status.assert_existing_objects_matched()
        except AssertionError as e:
            missing = str(e).strip().splitlines()[0][:160]
            raise UserError(f"{path}: holds no weights for some of this model's variables "
                            f"({missing}); {fix}") from None
        except ValueError as e:  # a variable of another shape
            raise UserError(f"{path}: {str(e).strip().splitlines()[0]}; {fix}") from None
        return path
    for name, model in step.models.items():
        archive = root / ("model.keras" if name == "model" else f"{name}.keras")
        if not archive.is_file():
            raise UserError(f"{archive}: missing (the run did not finish?); pass "
                            "--checkpoint latest to use its last checkpoint")
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(archive) as z:
            z.extract("model.weights.h5", tmp)
            model.load_weights(os.path.join(tmp, "model.weights.h5"))
    return str(root / "model.keras")


def _load_average(path: str, r) -> None:
    """Give the models the weight average held in checkpoint ``path`` (``trainer.ema`` or
    ``trainer.swa`` with ``weights: averaged``): the weights the run ships."""
    import tensorflow as tf

    average = r.trainer.make_average(r.step.models)
    status = tf.train.Checkpoint(averages=average).read(path).expect_partial()
    try:
        status.assert_existing_objects_matched()
    except AssertionError:
        raise UserError(f"{path}: holds no weight average (trainer.ema, trainer.swa); pass a "
                        "checkpoint of this run, or set trainer.ema.weights=trained "
                        "(trainer.swa.weights=trained)") from None
    average.copy_to_models()
    average.ready(r.data)


def _checkpoint_path(root: Path, checkpoint: str) -> str:
    import tensorflow as tf

    if checkpoint in ("latest", "best"):
        directory = root / "checkpoints" / ("best" if checkpoint == "best" else "")
        path = tf.train.latest_checkpoint(str(directory))
        if path is None:
            raise UserError(f"{directory}: no checkpoint; train with checkpoints (and "
                            "callbacks.checkpoint.monitor for best), or drop --checkpoint")
        return path
    if not Path(checkpoint + ".index").is_file():
        raise UserError(f"{checkpoint}: not a checkpoint (no {checkpoint}.index)")
    return checkpoint
