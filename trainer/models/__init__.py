"""Small model builders used by the configs."""

from trainer.models.mlp import mlp

__all__ = ["mlp"]
