"""Callbacks: TensorBoard, checkpoints, progress, early stopping."""

from trainer.callbacks.base import Callback
from trainer.callbacks.checkpoint import CheckpointCallback
from trainer.callbacks.early_stopping import EarlyStopping
from trainer.callbacks.freeze import FreezeSchedule
from trainer.callbacks.progress import ProgressCallback
from trainer.callbacks.tensorboard import TensorBoardCallback

__all__ = [
    "Callback",
    "CheckpointCallback",
    "EarlyStopping",
    "FreezeSchedule",
    "ProgressCallback",
    "TensorBoardCallback",
]
