"""``python -m trainer``: the Hydra entry point, nothing else."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra

from trainer.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://trainer.configs", config_name="config")
def main(cfg):
    """Train with the composed config; returns the sweep objective (``optimized_metric``)."""
    from trainer.run import run_or_exit

    return run_or_exit(cfg)


if __name__ == "__main__":
    main()
