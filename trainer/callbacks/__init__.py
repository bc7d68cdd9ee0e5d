"""Callbacks: TensorBoard, per-layer health, checkpoints, progress, early stopping, profiling,
sharpness, the serving export of the best epoch, Keras callbacks."""

from trainer.callbacks.base import Callback
from trainer.callbacks.checkpoint import CheckpointCallback
from trainer.callbacks.early_stopping import EarlyStopping
from trainer.callbacks.export_best import ExportCallback
from trainer.callbacks.freeze_schedule import FreezeSchedule
from trainer.callbacks.health import HealthCallback
from trainer.callbacks.keras_adapter import KerasCallbacks
from trainer.callbacks.profile import ProfileCallback
from trainer.callbacks.progress import ProgressCallback
from trainer.callbacks.sharpness import SharpnessCallback
from trainer.callbacks.tensorboard import TensorBoardCallback

__all__ = [
    "Callback",
    "CheckpointCallback",
    "EarlyStopping",
    "ExportCallback",
    "FreezeSchedule",
    "HealthCallback",
    "KerasCallbacks",
    "ProfileCallback",
    "ProgressCallback",
    "SharpnessCallback",
    "TensorBoardCallback",
]
