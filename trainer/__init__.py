"""tape-trainer: custom tf.GradientTape steps in a compiled loop, configured by Hydra.

The public API is listed in ``__all__``. Names are imported lazily so that
``python -m trainer`` can validate its config before TensorFlow starts.
"""

from importlib import import_module

__all__ = [
    "Callback",
    "CheckpointCallback",
    "Data",
    "DataModule",
    "EarlyStopping",
    "FreezeSchedule",
    "GroupedOptimizer",
    "KerasCallbacks",
    "Objective",
    "ProfileCallback",
    "ProgressCallback",
    "ResetPolicy",
    "Step",
    "StepContext",
    "StepInfo",
    "TapeStep",
    "TensorBoardCallback",
    "Trainer",
    "UserError",
    "run",
]

_LOCATIONS = {
    "Callback": "trainer.callbacks",
    "CheckpointCallback": "trainer.callbacks",
    "EarlyStopping": "trainer.callbacks",
    "FreezeSchedule": "trainer.callbacks",
    "GroupedOptimizer": "trainer.optim",
    "KerasCallbacks": "trainer.callbacks",
    "Objective": "trainer.step",
    "ResetPolicy": "trainer.tape",
    "Step": "trainer.step",
    "StepContext": "trainer.supervised",
    "StepInfo": "trainer.step",
    "ProfileCallback": "trainer.callbacks",
    "ProgressCallback": "trainer.callbacks",
    "TensorBoardCallback": "trainer.callbacks",
    "Data": "trainer.data",
    "DataModule": "trainer.data",
    "TapeStep": "trainer.supervised",
    "Trainer": "trainer.trainer",
    "UserError": "trainer.errors",
    "run": "trainer.run",
}


def __getattr__(name):
    if name in _LOCATIONS:
        return getattr(import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
