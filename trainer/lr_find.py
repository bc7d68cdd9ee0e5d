"""``python -m trainer.lr_find``: sweep a run's learning rate and suggest one.

    python -m trainer.lr_find +experiment=dense
    python -m trainer.lr_find +experiment=dense lr_find.max_lr=3 lr_find.num_steps=200

The config is the training run's (``configs/lr_find.yaml`` composes ``config.yaml`` and
adds ``lr_find``); ``trainer.driver.lr_sweep`` builds the run, raises its learning rate
exponentially from its starting weights until the loss diverges, and writes
``lr_find.json``, ``lr_find.csv`` and ``lr_find.png`` into
``outputs/<task_name>/lr_find/<time>/``. Prints the suggested rate and its override.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra
from omegaconf import DictConfig

from trainer.common.errors import UserError
from trainer.driver.schemas import register_configs

register_configs()


def lr_find_or_exit(cfg: DictConfig) -> None:
    """Sweep, and print the suggestion; a user error exits 2 with one line on stderr."""
    from trainer.driver.lr_sweep import lr_find

    try:
        result = lr_find(cfg)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    from hydra.core.hydra_config import HydraConfig

    rows, run_dir = result["curve"], os.path.abspath(HydraConfig.get().runtime.output_dir)
    if run_dir.startswith(os.getcwd() + os.sep):  # outputs/..., as the command was given
        run_dir = os.path.relpath(run_dir)
    print(f"lr_find: {len(rows)} updates from {rows[0]['learning_rate']:.3g} to "
          f"{rows[-1]['learning_rate']:.3g}"
          f"{' (stopped: the loss diverged)' if result['diverged'] else ''}; suggested "
          f"learning rate {result['suggestion']:.3g} (curve and plot in {run_dir}); train with "
          f"{result['override']}")


@hydra.main(version_base="1.3", config_path="pkg://trainer.configs", config_name="lr_find")
def main(cfg):
    """Sweep the learning rate of the composed run."""
    lr_find_or_exit(cfg)


if __name__ == "__main__":
    main()
