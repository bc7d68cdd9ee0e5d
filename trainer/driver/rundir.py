"""The run directory's record of a run: ``.hydra/`` and the job log, written only once the
run is accepted.

Hydra would write ``.hydra/config.yaml`` and open its job log before the task starts, so a
start that is then refused (the run dir is in use, the checkpoint is of another model)
would leave the run dir describing settings its weights were never trained with. The
shipped Hydra config turns its own writing off (``hydra.output_subdir: null``) and holds
the job log back (``HeldFileHandler``); the driver calls ``accept`` once the lock is held
and the checkpoint has been read back, and only then are both written.
"""

from __future__ import annotations

import logging
from pathlib import Path

from trainer.common.atomic import atomic_write

#: Where the run's composed config goes, as Hydra would put it.
CONFIG_DIR = ".hydra"


class HeldFileHandler(logging.FileHandler):
    """A log file that keeps its records in memory until the run is accepted.

    Used as Hydra's job log handler (``configs/hydra/default.yaml``). Records before
    ``accept_logs()`` are kept; on acceptance they are written and the file is written
    to from then on. A process that never accepts its run (refused, failed at start)
    leaves no file and no line in an existing one: the console has its lines.
    """

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None):
        super().__init__(filename, mode, encoding, delay=True)
        self._held: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self._held is not None:
            self._held.append(record)
        else:
            super().emit(record)

    def open_file(self) -> None:
        """Write the held records and every later one to the file."""
        held, self._held = self._held, None
        for record in held or ():
            super().emit(record)


def accept_logs() -> None:
    """Open every ``HeldFileHandler`` of the root logger (the job log)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, HeldFileHandler):
            handler.open_file()


def save_config(run_dir: Path, cfg) -> None:
    """Write ``.hydra/config.yaml`` (``cfg`` as composed, unresolved), ``hydra.yaml`` and
    ``overrides.yaml`` as Hydra would, each written atomically; nothing
    for ``cfg`` None (a worker other than the chief) or outside a Hydra job (a run built
    from a config in code)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    if cfg is None or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.instance().cfg  # {"hydra": ...}, as Hydra saves it
    directory = Path(run_dir) / CONFIG_DIR
    directory.mkdir(exist_ok=True)
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg),
                       ("overrides.yaml", hydra_cfg.hydra.overrides.task)):
        text = OmegaConf.to_yaml(node)
        atomic_write(directory / name, lambda path, text=text: Path(path).write_text(text))


def accept(run_dir: Path, cfg) -> None:
    """The run is this process's: write its config and open its job log."""
    save_config(run_dir, cfg)
    accept_logs()
