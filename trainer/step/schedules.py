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


def _each_optimizer(spec: dict, fn, where: str) -> dict:
    """``fn(spec, where)`` on an optimizer node, or on each of a dict of them by name (a
    GAN's generator and critic)."""
    if spec.get("_target_", "builtins.dict") == "builtins.dict":
        return {name: sub if name == "_target_" else _each_optimizer(sub, fn, f"{where}.{name}")
                for name, sub in spec.items()}
    return fn(spec, where)


def apply_schedule(optimizer_spec: dict, factory, *, total_steps: int, where: str = "optimizer"
                   ) -> dict:
    """``optimizer_spec`` (a resolved optimizer node, or a dict of them) with each
    ``learning_rate`` replaced by ``factory(peak=learning_rate, total_steps=...)``."""

    def shaped(spec, where):
        peak = spec.get("learning_rate")
        if not isinstance(peak, int | float) or isinstance(peak, bool):
            raise UserError(f"a schedule shapes {where}.learning_rate, its peak, which must be "
                            f"a number (found {peak!r}); set {where}.learning_rate=1e-3, or "
                            "drop the schedule group (schedule=null) to keep this one")
        return {**spec, "learning_rate": factory(peak=float(peak), total_steps=total_steps)}

    return _each_optimizer(optimizer_spec, shaped, where)


def apply_swa(optimizer_spec: dict, swa: dict, *, steps_per_epoch: int, build) -> dict:
    """``optimizer_spec`` with each ``learning_rate`` (a number, a schedule, or a schedule
    node, which ``build`` instantiates) followed by SWA's from ``swa["start_epoch"]`` on
    (``trainer.step.averaging.SwaLearningRate``); unchanged without ``swa["lr"]``."""
    if swa.get("start_epoch") is None or swa.get("lr") is None:
        return optimizer_spec
    from trainer.step.averaging import SwaLearningRate

    def followed(spec, where):
        rate = spec.get("learning_rate")
        if isinstance(rate, dict):
            rate = build(rate)
        return {**spec, "learning_rate": SwaLearningRate(
            rate, start_step=swa["start_epoch"] * steps_per_epoch, lr=swa["lr"],
            lr_min=swa.get("lr_min"), cycle_steps=swa.get("cycle_epochs", 1) * steps_per_epoch)}

    return _each_optimizer(optimizer_spec, followed, "optimizer")
