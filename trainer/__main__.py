"""``python -m trainer``: the Hydra entry point, nothing else."""

import os

from trainer.training.preemption import catch_from_start

# First: a stop signal during the seconds of start-up (imports, composing, building,
# restoring) ends the run with its documented status and one line, not a traceback.
catch_from_start()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hydra  # noqa: E402

from trainer.driver.schemas import register_configs  # noqa: E402

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://trainer.configs", config_name="config")
def main(cfg):
    """Train with the composed config; returns the sweep objective (``optimized_metric``)."""
    from trainer.driver.run import run_or_exit

    return run_or_exit(cfg)


if __name__ == "__main__":
    main()
