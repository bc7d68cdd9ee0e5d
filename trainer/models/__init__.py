"""Small model builders used by the configs."""

from trainer.models.cnn import cnn
from trainer.models.mlp import mlp

__all__ = ["cnn", "mlp"]
