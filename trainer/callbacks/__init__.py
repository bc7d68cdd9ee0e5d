"""Callbacks: TensorBoard, the MLflow and CSV loggers, per-layer health, checkpoints, progress,
early stopping, profiling, sharpness, the serving export of the best epoch, Keras callbacks."""

from trainer.callbacks.base import Callback
from trainer.callbacks.checkpoint import CheckpointCallback
from trainer.callbacks.csv_logger import CsvLogger
from trainer.callbacks.early_stopping import EarlyStopping
from trainer.callbacks.export_best import ExportCallback
from trainer.callbacks.freeze_schedule import FreezeSchedule
from trainer.callbacks.health import HealthCallback
from trainer.callbacks.keras_adapter import KerasCallbacks
from trainer.callbacks.mlflow_logger import MlflowLogger
from trainer.callbacks.profile import ProfileCallback
from trainer.callbacks.progress import ProgressCallback
from trainer.callbacks.sharpness import SharpnessCallback
from trainer.callbacks.tensorboard import TensorBoardCallback

__all__ = [
    "Callback",
    "CheckpointCallback",
    "CsvLogger",
    "EarlyStopping",
    "ExportCallback",
    "FreezeSchedule",
    "HealthCallback",
    "KerasCallbacks",
    "MlflowLogger",
    "ProfileCallback",
    "ProgressCallback",
    "SharpnessCallback",
    "TensorBoardCallback",
]
