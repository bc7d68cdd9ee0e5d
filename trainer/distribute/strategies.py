"""Strategies: the ``tf.distribute`` strategy from config and its scope.

A run is spread over devices by a ``Distribution`` (the ``distribute`` config group):
``NoDistribution`` (one device), ``Mirrored`` (the local GPUs, or the CPU split into
logical devices) and ``MultiWorker`` (``tf.distribute.MultiWorkerMirroredStrategy``).

Steps are written as for one device: a loss is the mean over the batch the step sees.
The helpers that make that right under a strategy (``share``, ``local_rows``,
``global_mean``, ``batch_mean``, ...) live in ``trainer.distribute.replicas``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import tensorflow as tf

from trainer.common.errors import UserError

log = logging.getLogger(__name__)

CLUSTERS = ("tf_config", "slurm")
COMMUNICATIONS = ("auto", "ring", "nccl")


class Distribution:
    """One device: TensorFlow's default strategy, a no-op scope. Base of the others.

    Attributes:
        kind: ``"none"``, ``"mirrored"`` or ``"multi_worker"`` (the config names).
    """

    kind = "none"

    def __init__(self):
        self._strategy = None

    @property
    def strategy(self) -> tf.distribute.Strategy:
        """The ``tf.distribute`` strategy, created on first use."""
        if self._strategy is None:
            self._strategy = self._make()
        return self._strategy

    def _make(self):
        return tf.distribute.get_strategy()

    @property
    def distributed(self) -> bool:
        """Whether steps run through ``strategy.run`` (not the default strategy)."""
        return False

    def scope(self):
        """Where models, optimizers and every variable of a step are created."""
        return self.strategy.scope() if self.distributed else contextlib.nullcontext()

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    @property
    def num_workers(self) -> int:
        return 1

    @property
    def worker_index(self) -> int:
        return 0

    @property
    def is_chief(self) -> bool:
        """Whether this process writes the run's files (TensorBoard, checkpoints, outputs)."""
        return self.worker_index == 0

    def agree(self, chief_values, any_flags):
        """The chief's ``chief_values`` and, for each of ``any_flags``, whether any worker
        set it: what every worker must decide alike (the steps of the next execution,
        whether to stop). One process decides alone."""
        return list(chief_values), [bool(f) for f in any_flags]

    def check_variables(self, named: dict) -> None:
        """Raise if a variable of ``named`` (path -> variable) was created outside the scope:
        its replicas would silently diverge."""
        if not self.distributed:
            return
        extended = self.strategy.extended
        for path, v in named.items():
            v = getattr(v, "value", v)  # a Keras variable wraps the tf.Variable
            if isinstance(v, tf.Variable) and not extended.variable_created_in_scope(v):
                raise UserError(
                    f"variable {path} was created outside the {self.kind} strategy's scope, so "
                    "its replicas would diverge; create every variable of a step in its "
                    "__init__ or build() (the driver builds steps in the scope), or build it "
                    "inside `with distribution.scope():`")

    def describe(self) -> str:
        return "one device"


class NoDistribution(Distribution):
    """``distribute=none``: one device (the default)."""


class Mirrored(Distribution):
    """``distribute=mirrored``: ``tf.distribute.MirroredStrategy`` over local devices.

    Args:
        cpu_replicas: on a host without GPUs, split the CPU into this many logical
            devices, one replica each (how the tests run it; it must be set before
            TensorFlow starts, which the driver does). None: all local GPUs, else
            the CPU as one replica.
    """

    kind = "mirrored"

    def __init__(self, *, cpu_replicas: int | None = None):
        super().__init__()
        if cpu_replicas is not None and cpu_replicas < 1:
            raise UserError(f"distribute.cpu_replicas={cpu_replicas} must be at least 1 "
                            "(or null for the local GPUs)")
        self.cpu_replicas = cpu_replicas

    @property
    def distributed(self) -> bool:
        return True

    def _make(self):
        devices = None if self.cpu_replicas is None else tuple(split_cpu(self.cpu_replicas))
        # One strategy per device set and process: a second one would number its collective
        # ops from the start again, and the runtime remembers the first one's under those
        # numbers (a later run in the same process would abort on a shape mismatch).
        if devices not in _MIRRORED:
            _MIRRORED[devices] = tf.distribute.MirroredStrategy(
                devices=list(devices) if devices else None)
        return _MIRRORED[devices]

    def describe(self) -> str:
        return f"MirroredStrategy over {self.num_replicas} replicas"


_MIRRORED: dict = {}


def split_cpu(replicas: int) -> list[str]:
    """The names of ``replicas`` logical CPU devices, made if TensorFlow has not started.

    TensorFlow fixes its devices when it first runs an op; a process that already
    has at least ``replicas`` logical CPUs uses the first ones.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        existing = tf.config.get_logical_device_configuration(cpu) or []
        if len(existing) < replicas:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)])
    except RuntimeError:
        pass  # initialized already: use what exists, checked below
    found = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(found) < replicas:
        raise UserError(
            f"distribute.cpu_replicas={replicas}: TensorFlow already started with "
            f"{len(found)} CPU device(s) in this process; set it before anything runs "
            "TensorFlow (a fresh `python -m trainer` process does)")
    return found[:replicas]


class MultiWorker(Distribution):
    """``distribute=multi_worker``: ``tf.distribute.MultiWorkerMirroredStrategy``.

    Every worker runs the same command; the cluster comes from ``TF_CONFIG``
    (``cluster="tf_config"``, what ``python -m trainer.launch`` sets) or from the
    SLURM job's environment (``cluster="slurm"``, TensorFlow's
    ``SlurmClusterResolver``). Worker 0 is the chief: it alone keeps checkpoints
    and writes TensorBoard and the run's outputs.

    Args:
        cluster: ``tf_config`` or ``slurm``.
        communication: collective implementation: ``auto``, ``ring`` (CPU hosts) or
            ``nccl`` (GPUs).
        port_base: with ``cluster=slurm``, the first port of each node's workers (a
            node's tasks take consecutive ports from it).
    """

    kind = "multi_worker"

    def __init__(self, *, cluster: str = "tf_config", communication: str = "auto",
                 port_base: int = 8888):
        super().__init__()
        if cluster not in CLUSTERS:
            raise UserError(f"distribute.cluster={cluster!r} must be one of {CLUSTERS}")
        if communication not in COMMUNICATIONS:
            raise UserError(f"distribute.communication={communication!r} must be one of "
                            f"{COMMUNICATIONS}")
        if cluster == "tf_config":
            _check_tf_config()
        self.cluster = cluster
        self.communication = communication
        self.port_base = int(port_base)
        self._agree_fn = None

    @property
    def distributed(self) -> bool:
        return True

    def _make(self):
        impl = {"auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
                "ring": tf.distribute.experimental.CommunicationImplementation.RING,
                "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL}
        options = tf.distribute.experimental.CommunicationOptions(
            implementation=impl[self.communication])
        resolver = None
        if self.cluster == "slurm":
            # The GPU count given, not asked of nvidia-smi, which CPU nodes do not have. On a
            # CPU node there are no GPUs to hand out: the resolver still divides by its
            # GPUs per task, so it gets a nominal one each and leaves the devices alone.
            gpus = len(tf.config.list_physical_devices("GPU"))
            devices = ({"gpus_per_node": gpus} if gpus else
                       {"gpus_per_node": 1 << 16, "gpus_per_task": 1, "auto_set_gpu": False})
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
                port_base=self.port_base, **devices)
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver,
                                                         communication_options=options)

    @property
    def num_workers(self) -> int:
        spec = self.strategy.cluster_resolver.cluster_spec().as_dict()
        return len(spec.get("worker", [])) + len(spec.get("chief", []))

    @property
    def worker_index(self) -> int:
        resolver = self.strategy.cluster_resolver
        if resolver.task_type == "chief":
            return 0
        offset = len(resolver.cluster_spec().as_dict().get("chief", []))
        return offset + int(resolver.task_id)

    def agree(self, chief_values, any_flags):
        chief_values, any_flags = list(chief_values), list(any_flags)
        mine = [v if self.is_chief else 0.0 for v in chief_values] + [float(bool(f))
                                                                        for f in any_flags]
        if self._agree_fn is None:
            strategy = self.strategy

            @tf.function
            def agree(values):
                # Each worker contributes its vector once (its first replica): a sum then
                # gives the chief's values and, for flags, how many workers set them.
                def replica(values):
                    first = tf.distribute.get_replica_context().replica_id_in_sync_group
                    local = strategy.extended.worker_devices
                    keep = tf.cast(first % len(local) == 0, values.dtype)
                    return values * keep

                per_replica = strategy.run(replica, args=(values,))
                return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

            self._agree_fn = agree
        out = self._agree_fn(tf.constant(mine, tf.float64)).numpy().tolist()
        n = len(chief_values)
        return out[:n], [v > 0 for v in out[n:]]

    def describe(self) -> str:
        return (f"MultiWorkerMirroredStrategy: worker {self.worker_index} of "
                f"{self.num_workers}, {self.num_replicas} replicas in all")


def _check_tf_config() -> None:
    text = os.environ.get("TF_CONFIG")
    if not text:
        raise UserError("distribute=multi_worker needs TF_CONFIG (the cluster and this "
                        "worker's index); start the workers with python -m trainer.launch "
                        "--workers N, set TF_CONFIG on each machine, or use "
                        "distribute.cluster=slurm under SLURM")
    try:
        config = json.loads(text)
        workers = config["cluster"]["worker"]
        config["task"]["type"], int(config["task"]["index"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"TF_CONFIG is not valid ({e!r}); expected "
                        '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": '
                        '"worker", "index": i}}') from None
    if not workers:
        raise UserError("TF_CONFIG lists no workers in cluster.worker")
    task = config["task"]
    if task["type"] == "worker" and not 0 <= int(task["index"]) < len(workers):
        raise UserError(f"TF_CONFIG task.index={task['index']} is not one of the "
                        f"{len(workers)} workers in cluster.worker (0..{len(workers) - 1})")
