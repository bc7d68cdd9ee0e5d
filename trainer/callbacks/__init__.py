"""Callbacks: TensorBoard, checkpoints, progress, early stopping, profiling."""

from trainer.callbacks.base import Callback
from trainer.callbacks.checkpoint import CheckpointCallback
from trainer.callbacks.early_stopping import EarlyStopping
from trainer.callbacks.freeze import FreezeSchedule
from trainer.callbacks.profile import ProfileCallback
from trainer.callbacks.progress import ProgressCallback
from trainer.callbacks.tensorboard import TensorBoardCallback

__all__ = [
    "Callback",
    "CheckpointCallback",
    "EarlyStopping",
    "FreezeSchedule",
    "ProfileCallback",
    "ProgressCallback",
    "TensorBoardCallback",
]
