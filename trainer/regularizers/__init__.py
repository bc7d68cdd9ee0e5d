"""Higher-order gradient regularizers built from nested tapes."""

from trainer.regularizers.base import Regularizer

__all__ = ["Regularizer"]
