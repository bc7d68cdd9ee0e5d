"""tape-trainer: custom tf.GradientTape steps in a compiled loop, configured by Hydra.

The public API is listed in ``__all__``. Names are imported lazily so that
``python -m trainer`` can validate its config before TensorFlow starts.
"""

import sys
from importlib import import_module
from importlib.abc import Loader, MetaPathFinder
from importlib.util import spec_from_loader

__all__ = [
    "Callback",
    "CheckpointCallback",
    "CsvLogger",
    "Data",
    "DataModule",
    "EarlyStopping",
    "ExportCallback",
    "FreezeSchedule",
    "GroupedOptimizer",
    "HealthCallback",
    "KerasCallbacks",
    "MlflowLogger",
    "Objective",
    "ProfileCallback",
    "ProgressCallback",
    "ResetPolicy",
    "SharpnessCallback",
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
    "CsvLogger": "trainer.callbacks",
    "MlflowLogger": "trainer.callbacks",
    "EarlyStopping": "trainer.callbacks",
    "ExportCallback": "trainer.callbacks",
    "FreezeSchedule": "trainer.callbacks",
    "GroupedOptimizer": "trainer.step.optimizers",
    "HealthCallback": "trainer.callbacks",
    "KerasCallbacks": "trainer.callbacks",
    "Objective": "trainer.step.base",
    "ResetPolicy": "trainer.step.tape",
    "Step": "trainer.step.base",
    "StepContext": "trainer.step.tape_step",
    "StepInfo": "trainer.step.base",
    "ProfileCallback": "trainer.callbacks",
    "ProgressCallback": "trainer.callbacks",
    "SharpnessCallback": "trainer.callbacks",
    "TensorBoardCallback": "trainer.callbacks",
    "Data": "trainer.data",
    "DataModule": "trainer.data",
    "TapeStep": "trainer.step.tape_step",
    "Trainer": "trainer.training.trainer",
    "UserError": "trainer.common.errors",
    "run": "trainer.driver.run",
}


#: Modules importable under an older, shorter name: ``trainer.replicas`` (documented for
#: custom steps) is ``trainer.distribute.replicas``.
_ALIASES = {"trainer.replicas": "trainer.distribute.replicas"}


class _Alias(MetaPathFinder, Loader):
    """Imports an alias as the module it names: the very same module object, so
    ``trainer.replicas.share is trainer.distribute.replicas.share``."""

    def find_spec(self, name, path=None, target=None):
        return spec_from_loader(name, self) if name in _ALIASES else None

    def create_module(self, spec):
        return None  # a placeholder; exec_module puts the real module in its place

    def exec_module(self, module):
        # The import system returns whatever sys.modules holds once this returns.
        sys.modules[module.__name__] = import_module(_ALIASES[module.__name__])


if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
    sys.meta_path.insert(0, _Alias())


def __getattr__(name):
    if name in _LOCATIONS:
        return getattr(import_module(_LOCATIONS[name]), name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
