"""Learning-rate schedules as a config group (``schedule=cosine``), shaped around the
optimizer's own ``learning_rate``.

A schedule is its own choice, apart from the optimizer: ``optimizer.learning_rate`` (which
an experiment may set) stays the peak rate, and the schedule gives it a shape over the
run. So ``+experiment=finetune schedule=cosine`` warms up to the experiment's rate and
decays from it: no config replaces another's choice, whatever order Hydra merges them in.
"""

from __future__ import annotations

from trainer.common.errors import UserError


def cosine(*, peak: float, total_steps: int, warmup_steps: int = 100, alpha: float = 0.0,
           decay_steps: int | None = None):
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps`` updates, then a cosine decay
    to ``alpha * peak`` over ``decay_steps`` (default: the rest of the run's
    ``total_steps``). A ``keras.optimizers.schedules.CosineDecay``."""
    import keras

    if warmup_steps < 0 or not 0.0 <= alpha <= 1.0:
        raise UserError(f"schedule: warmup_steps={warmup_steps} must be >= 0 and "
                        f"alpha={alpha} within [0, 1]")
    if decay_steps is None:
        decay_steps = max(1, total_steps - warmup_steps)
    if decay_steps < 1:
        raise UserError(f"schedule.decay_steps={decay_steps} must be at least 1")
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else peak, decay_steps=int(decay_steps),
        alpha=alpha, warmup_target=peak if warmup_steps else None,
        warmup_steps=int(warmup_steps))


def apply_schedule(optimizer_spec: dict, factory, *, total_steps: int, where: str = "optimizer"
                   ) -> dict:
    """``optimizer_spec`` (a resolved optimizer node, or a dict of them) with each
    ``learning_rate`` replaced by ``factory(peak=learning_rate, total_steps=...)``."""
    if optimizer_spec.get("_target_", "builtins.dict") == "builtins.dict":
        # Several optimizers by name (a GAN's generator and critic).
        return {name: spec if name == "_target_" else apply_schedule(
                    spec, factory, total_steps=total_steps, where=f"{where}.{name}")
                for name, spec in optimizer_spec.items()}
    peak = optimizer_spec.get("learning_rate")
    if not isinstance(peak, int | float) or isinstance(peak, bool):
        raise UserError(f"a schedule shapes {where}.learning_rate, its peak, which must be a "
                        f"number (found {peak!r}); set {where}.learning_rate=1e-3, or drop "
                        "the schedule group (schedule=null) to keep this one")
    return {**optimizer_spec, "learning_rate": factory(peak=float(peak),
                                                       total_steps=total_steps)}
