"""Distribution: strategies from config (``strategies``) and the per-replica helpers steps
use (``replicas``, also importable as ``trainer.replicas`` and from here)."""

from trainer.distribute.replicas import (
    any_replica,
    batch_mean,
    global_batch_size,
    global_mean,
    in_replicas,
    local_rows,
    micro_batch,
    share,
    step_variable,
    sum_over_replicas,
)
from trainer.distribute.strategies import (
    Distribution,
    Mirrored,
    MultiWorker,
    NoDistribution,
    split_cpu,
)

__all__ = [
    "Distribution",
    "Mirrored",
    "MultiWorker",
    "NoDistribution",
    "any_replica",
    "batch_mean",
    "global_batch_size",
    "global_mean",
    "in_replicas",
    "local_rows",
    "micro_batch",
    "share",
    "split_cpu",
    "step_variable",
    "sum_over_replicas",
]
