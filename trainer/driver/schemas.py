"""Structured-config schemas, registered in Hydra's ConfigStore.

The YAML files under ``configs/`` name these schemas in their defaults lists, so
Hydra rejects unknown keys and wrong types while composing, before TensorFlow is
imported. Config builds objects: every ``_target_`` is a plain function or class
taking keyword arguments.

Each default is written once, here: a YAML file holds only what differs from its
schema, and a target's own signature defaults must agree with its schema's
(``tests/test_config.py`` checks both).
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING


@dataclass
class EmaConfig:
    decay: Optional[float] = None
    warmup: bool = False
    weights: str = "averaged"


@dataclass
class SwaConfig:
    start_epoch: Optional[int] = None
    lr: Optional[float] = None
    lr_min: Optional[float] = None
    cycle_epochs: int = 1
    batch_norm: bool = True
    weights: str = "averaged"


@dataclass
class RecoveryConfig:
    """Rollback on blow-up (``trainer.training.recovery.Recovery``); off by default."""

    _target_: str = "trainer.training.recovery.Recovery"
    enabled: bool = False
    # An in-memory snapshot every this many steps; 0: roll back to the newest checkpoint.
    every_n_steps: int = 100
    # A blow-up: the loss not finite, or above factor x its running mean (null: not finite only).
    factor: Optional[float] = 10.0
    window: int = 20
    lr_scale: float = 0.5
    max_attempts: int = 3
    monitor: str = "loss"


@dataclass
class TrainerConfig:
    _target_: str = "trainer.Trainer"
    _partial_: bool = True
    epochs: int = 10
    max_steps: Optional[int] = None
    # "auto" (about 0.5 s per execution) or an integer >= 1, checked by the Trainer:
    # OmegaConf 2.3 has no str/int unions.
    steps_per_execution: Any = "auto"
    run_eagerly: bool = False
    # auto (XLA for long in-memory runs, falling back if it cannot compile), true or false.
    jit_compile: Any = "auto"
    # auto (continue from the run dir's newest checkpoint, if any), never, or a path to a
    # run dir or a checkpoint.
    resume: str = "auto"
    # Where resume=auto looks: the checkpoint callback's directory.
    checkpoint_dir: str = II("oc.select:callbacks.checkpoint.directory,checkpoints")
    # TensorFlow's op determinism, for ops whose results may vary from run to run.
    deterministic: bool = False
    # Micro-batches per update: each batch of data.batch_size is split into this many and
    # their summed gradients applied once (gradient accumulation).
    accumulate_steps: int = 1
    # An exponential moving average of the weights (trainer.step.averaging): decay (null: none),
    # warmup, and which weights the run ships (averaged or trained).
    ema: EmaConfig = field(default_factory=EmaConfig)
    # Stochastic weight averaging from start_epoch (null: none), with its own rate (lr; a
    # cycle down to lr_min over cycle_epochs), batch-norm statistics recomputed.
    swa: SwaConfig = field(default_factory=SwaConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    # Debugging (docs/debug.md): each epoch's training batches and each evaluation's
    # validation batches, an int (batches) or a fraction in (0, 1] (null: all); and
    # overfit_batches: train and validate on the same first batches every epoch (0: off).
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    overfit_batches: Any = 0
    # Validate also at every multiple of this many global steps (executions end there),
    # between epoch ends; early stopping and the best checkpoint judge every validation.
    val_every_n_steps: Optional[int] = None


@dataclass
class StepConfig:
    _target_: str = "trainer.TapeStep"
    _partial_: bool = True
    loss: Any = None


@dataclass
class SamStepConfig(StepConfig):
    _target_: str = "trainer.step.sam.SamStep"
    rho: float = 0.05
    adaptive: bool = False
    eta: float = 0.01
    # global (the all-reduced gradient's ascent, as one device) or replica (each replica's own).
    perturbation: str = "global"


@dataclass
class ResetConfig:
    _target_: str = "trainer.step.tape.ResetPolicy"
    when: List[str] = field(default_factory=list)
    threshold: Optional[float] = None
    spike_window: int = 50
    spike_z: float = 6.0
    action: str = "skip"
    max_retries: int = 3
    max_consecutive: int = 20


@dataclass
class TapeConfig:
    """How the step uses its tape: unconnected gradients and the reset policy."""

    unconnected_gradients: str = "none"
    reset: ResetConfig = field(default_factory=ResetConfig)


@dataclass
class UnfreezeConfig:
    at_epoch: int = MISSING
    patterns: List[str] = MISSING


@dataclass
class FreezeConfig:
    """Variables frozen at the start (globs on Keras paths) and a schedule to unfreeze them."""

    patterns: List[str] = field(default_factory=list)
    unfreeze: List[UnfreezeConfig] = field(default_factory=list)


@dataclass
class GroupConfig:
    patterns: List[str] = MISSING
    lr_scale: float = 1.0


@dataclass
class MlpConfig:
    _target_: str = "trainer.models.mlp"
    _partial_: bool = True
    hidden_units: List[int] = field(default_factory=lambda: [128, 64])
    activation: str = "relu"
    dropout: float = 0.0
    name: str = "mlp"


@dataclass
class OptimizerConfig:
    _target_: str = "keras.optimizers.Adam"
    # A number, or a Keras schedule node ({_target_: keras.optimizers.schedules...}); with
    # a schedule group (schedule=cosine) the number is the schedule's peak.
    learning_rate: Any = 1e-3
    weight_decay: Optional[float] = None
    clipnorm: Optional[float] = None
    global_clipnorm: Optional[float] = None
    clipvalue: Optional[float] = None
    groups: List[GroupConfig] = field(default_factory=list)


@dataclass
class SgdConfig(OptimizerConfig):
    _target_: str = "keras.optimizers.SGD"
    learning_rate: Any = 1e-2
    momentum: float = 0.9
    nesterov: bool = False


@dataclass
class _DataCommon:
    batch_size: int = 32
    seed: int = II("seed")
    shuffle: bool = True
    # auto (in memory up to trainer.data.base.IN_MEMORY_MAX_BYTES), true or false.
    in_memory: Any = "auto"


@dataclass
class DigitsConfig(_DataCommon):
    _target_: str = "trainer.data.digits"
    val_fraction: float = 0.2
    split_seed: int = 0
    # Keep only these digits, relabelled 0..k-1 (a source or target task for transfer).
    classes: Optional[List[int]] = None
    # Each example as an 8x8x1 image (for model=cnn) instead of 64 flat features.
    images: bool = False
    # balanced, or {class: weight} (unlisted classes 1.0): weighs the training loss only.
    # Any: OmegaConf 2.3 has no str/dict unions.
    class_weight: Any = None


@dataclass
class SyntheticConfig(_DataCommon):
    _target_: str = "trainer.data.synthetic"
    task: str = "regression"
    n_samples: int = 512
    n_features: int = 8
    n_classes: int = 3
    noise: float = 0.1
    data_seed: int = 0
    val_fraction: float = 0.25
    # task=classification only: balanced, or {class: weight}; weighs the training loss.
    class_weight: Any = None


@dataclass
class _FileCommon(_DataCommon):
    path: str = MISSING
    task: str = "classification"
    val_fraction: float = 0.2
    split_seed: int = 0
    allow_nonfinite: bool = False
    # balanced, or {class: weight} (unlisted classes 1.0): weighs the training loss only.
    class_weight: Any = None


@dataclass
class NpzConfig(_FileCommon):
    _target_: str = "trainer.data.npz"
    x_key: str = "x"
    y_key: str = "y"
    # An array of per-example sample weights (and <w_key>_val, if present, the val set's).
    w_key: Optional[str] = None


@dataclass
class CsvConfig(_FileCommon):
    _target_: str = "trainer.data.csv_file"
    target: str = MISSING
    features: Optional[List[str]] = None
    # A column of per-example sample weights; never a feature.
    weight: Optional[str] = None


@dataclass
class TensorBoardConfig:
    _target_: str = "trainer.TensorBoardCallback"
    log_dir: str = "tb"
    histogram_every_n_steps: int = 100
    # A due histogram is skipped this soon after the last one (0: exactly every n steps).
    histogram_min_interval_seconds: float = 10.0


@dataclass
class CheckpointConfig:
    _target_: str = "trainer.CheckpointCallback"
    directory: str = "checkpoints"
    max_to_keep: int = 3
    # Step and epoch saves (0 turns either off), held back while the last save is more
    # recent than min_interval_seconds; every_seconds saves at least that often.
    every_n_steps: int = 0
    every_n_epochs: int = 1
    every_seconds: float = 60.0
    min_interval_seconds: float = 30.0
    # An epoch log (e.g. val/accuracy) to keep the best checkpoint by, and min or max.
    monitor: Optional[str] = None
    mode: str = "min"


@dataclass
class ProgressConfig:
    _target_: str = "trainer.ProgressCallback"
    # auto: a live line on a terminal, log lines otherwise; or bar, log.
    mode: str = "auto"
    # The least time between two redraws of the line (a terminal write per redraw).
    min_interval_seconds: float = 0.1
    # Without a terminal, a progress log line this often inside an epoch (0: epoch ends only).
    log_every_seconds: float = 60.0


@dataclass
class ProfileConfig:
    _target_: str = "trainer.ProfileCallback"
    # [start, stop] global steps to trace; empty records nothing.
    steps: List[int] = field(default_factory=list)
    log_dir: str = "tb"


@dataclass
class HealthConfig:
    _target_: str = "trainer.HealthCallback"
    # Per-layer health on the first step at or past every multiple of this.
    every_n_steps: int = 100
    # A due measurement is held back this soon after the last one (0: exactly every n steps).
    min_interval_seconds: float = 1.0
    log_dir: str = "tb"
    # Alerts: a layer's gradient norm below / above these, a dead fraction at or above
    # dead_fraction, an update ratio this many decades from the layer's running mean
    # (once update_ratio_history measurements were seen).
    vanishing_grad_norm: float = 1e-7
    exploding_grad_norm: float = 1000.0
    dead_fraction: float = 1.0
    update_ratio_decades: float = 2.0
    update_ratio_history: int = 5


@dataclass
class EarlyStoppingConfig:
    _target_: str = "trainer.EarlyStopping"
    monitor: str = "val/loss"
    mode: str = "min"
    patience: int = 5
    min_delta: float = 0.0
    # Give the models the weights of the best epoch at the end of fit (not when preempted).
    restore_best_weights: bool = False


@dataclass
class ExportConfig:
    _target_: str = "trainer.ExportCallback"
    # The serving SavedModel, replaced whenever monitor improves (min or max, by > min_delta).
    directory: str = "export/saved_model"
    monitor: str = "val/loss"
    mode: str = "min"
    min_delta: float = 0.0


@dataclass
class SharpnessConfig:
    _target_: str = "trainer.SharpnessCallback"
    # Measured at the start and every n steps (0: at the start only).
    every_n_steps: int = 100
    # The fixed training examples the loss is averaged over.
    num_examples: int = 256
    # Power iterations at most, stopped once the estimate moves by <= tolerance (relative).
    iterations: int = 20
    tolerance: float = 1e-3
    # Hutchinson probes for the trace (0: no trace).
    trace_probes: int = 10
    seed: int = 0
    log_dir: str = "tb"


@dataclass
class MlflowLoggerConfig:
    _target_: str = "trainer.MlflowLogger"
    # null: an sqlite store in the run directory (a sweep's: in the sweep directory);
    # http://host:port for a tracking server.
    tracking_uri: Optional[str] = None
    experiment_name: str = II("task_name")
    # null: the run directory's name (a sweep's job: its number).
    run_name: Optional[str] = None


@dataclass
class CsvLoggerConfig:
    _target_: str = "trainer.CsvLogger"
    path: str = "metrics.csv"


@dataclass
class NoDistributionConfig:
    _target_: str = "trainer.distribute.strategies.NoDistribution"


@dataclass
class MirroredConfig:
    _target_: str = "trainer.distribute.strategies.Mirrored"
    # On a CPU host: split the CPU into this many logical devices; null: the local GPUs.
    cpu_replicas: Optional[int] = None


@dataclass
class MultiWorkerConfig:
    _target_: str = "trainer.distribute.strategies.MultiWorker"
    cluster: str = "tf_config"
    communication: str = "auto"
    # cluster=slurm: the first port of each node's workers.
    port_base: int = 8888


@dataclass
class CosineScheduleConfig:
    _target_: str = "trainer.step.schedules.cosine"
    _partial_: bool = True
    warmup_steps: int = 100
    alpha: float = 0.0
    # null: the run's planned updates after the warm-up.
    decay_steps: Optional[int] = None


@dataclass
class Config:
    """The root: one node per config group, plus run-wide values."""

    model: Any = MISSING
    data: Any = MISSING
    optimizer: Any = MISSING
    step: Any = MISSING
    trainer: Any = MISSING
    distribute: Any = MISSING
    schedule: Any = None
    callbacks: Dict[str, Any] = field(default_factory=dict)
    # The experiment trackers, by name (logger=[tensorboard,mlflow,csv]; docs/tracking.md).
    logger: Dict[str, Any] = field(default_factory=dict)
    regularizer: Dict[str, Any] = field(default_factory=dict)
    # keras.metrics objects by _target_, besides the task's accuracy or mae: kept over each
    # epoch, logged as train/<name> and val/<name>.
    metrics: List[Any] = field(default_factory=list)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    tape: TapeConfig = field(default_factory=TapeConfig)
    seed: int = 0
    # float32, mixed_bfloat16 (CPUs with bf16 units, TPUs) or mixed_float16 (GPUs; with
    # dynamic loss scaling): the Keras dtype policy the models are built under.
    precision: str = "float32"
    task_name: str = "train"
    optimized_metric: Optional[str] = None


SCHEMAS = {
    (None, "base_config"): Config,
    ("trainer", "base_trainer"): TrainerConfig,
    ("step", "base_step"): StepConfig,
    ("step", "base_sam"): SamStepConfig,
    ("model", "base_mlp"): MlpConfig,
    ("optimizer", "base_adam"): OptimizerConfig,
    ("optimizer", "base_sgd"): SgdConfig,
    ("data", "base_digits"): DigitsConfig,
    ("data", "base_synthetic"): SyntheticConfig,
    ("data", "base_npz"): NpzConfig,
    ("data", "base_csv"): CsvConfig,
    ("schedule", "base_cosine"): CosineScheduleConfig,
    ("distribute", "base_none"): NoDistributionConfig,
    ("distribute", "base_mirrored"): MirroredConfig,
    ("distribute", "base_multi_worker"): MultiWorkerConfig,
    ("schema/callbacks", "tensorboard"): TensorBoardConfig,
    ("schema/callbacks", "checkpoint"): CheckpointConfig,
    ("schema/callbacks", "progress"): ProgressConfig,
    ("schema/callbacks", "profile"): ProfileConfig,
    ("schema/callbacks", "health"): HealthConfig,
    ("schema/callbacks", "early_stopping"): EarlyStoppingConfig,
    ("schema/callbacks", "sharpness"): SharpnessConfig,
    ("schema/callbacks", "export"): ExportConfig,
    ("schema/logger", "mlflow"): MlflowLoggerConfig,
    ("schema/logger", "csv"): CsvLoggerConfig,
}


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for (group, name), node in SCHEMAS.items():
        cs.store(group=group, name=name, node=node)


# --- sharded TFRecord data (data=tfrecord) and its export (python -m trainer.export_data) ---
@dataclass
class TfrecordConfig(_DataCommon):
    _target_: str = "trainer.data.tfrecord"
    path: str = MISSING
    # Examples in the shuffle buffer: memory (and checkpoint size) is that many records.
    shuffle_buffer: int = 10000
    allow_nonfinite: bool = False
    # The shards' task (from meta.json) when null; set, it must agree with meta.json.
    task: Optional[str] = None


@dataclass
class ExportDataConfig(Config):
    """The root of ``python -m trainer.export_data``: a run's config plus where to write."""

    out: str = MISSING
    shards: int = 8
    overwrite: bool = False


SCHEMAS[("data", "base_tfrecord")] = TfrecordConfig
SCHEMAS[(None, "base_export_data")] = ExportDataConfig


# --- images: a Conv2D model (model=cnn) and folders of images (data=images) ----------------
@dataclass
class CnnConfig:
    _target_: str = "trainer.models.cnn"
    _partial_: bool = True
    # One block (conv, batch norm, activation, 2x2 max pooling) per entry.
    filters: List[int] = field(default_factory=lambda: [32, 64])
    kernel_size: int = 3
    # Units of the Dense layer before the head; 0 leaves it out.
    dense_units: int = 128
    activation: str = "relu"
    batch_norm: bool = True
    dropout: float = 0.25
    name: str = "cnn"


@dataclass
class ImagesConfig(_DataCommon):
    _target_: str = "trainer.data.images"
    # DIR/<class>/*.png, or DIR/train and DIR/val holding the same class sub-folders.
    path: str = MISSING
    # [height, width] every image is resized to; null: the first image's size.
    image_size: Optional[List[int]] = None
    # grayscale, rgb or rgba: 1, 3 or 4 channels.
    color_mode: str = "rgb"
    interpolation: str = "bilinear"
    # Keras' validation_split and its seed (unused with DIR/train and DIR/val).
    val_fraction: float = 0.2
    split_seed: int = 0


SCHEMAS[("model", "base_cnn")] = CnnConfig
SCHEMAS[("data", "base_images")] = ImagesConfig


# --- the learning-rate finder (python -m trainer.lr_find) -----------------------------------
@dataclass
class LrFindOptions:
    # The sweep's rates rise exponentially from min_lr to max_lr over num_steps updates.
    min_lr: float = 1e-6
    max_lr: float = 1.0
    num_steps: int = 100
    # The weight of the past in the loss' moving average (0: none).
    smoothing: float = 0.9
    # Stop once the smoothed loss exceeds diverge_factor times its best.
    diverge_factor: float = 4.0
    # The step's log whose curve is drawn and searched.
    monitor: str = "loss"
    # Draw lr_find.png (needs matplotlib: pip install 'tape-trainer[plot]').
    plot: bool = True


@dataclass
class LrFindConfig(Config):
    """The root of ``python -m trainer.lr_find``: a run's config plus the sweep's settings."""

    lr_find: LrFindOptions = field(default_factory=LrFindOptions)


SCHEMAS[(None, "base_lr_find")] = LrFindConfig
