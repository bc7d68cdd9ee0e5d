"""The training layer: the Trainer, its training state, resume, preemption, the run-dir lock
and Periodic."""
