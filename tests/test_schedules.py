"""Learning-rate schedules: the schedule group shapes the optimizer's rate, logged per execution."""

from __future__ import annotations

import keras
import pytest

from trainer.callbacks import Callback
from trainer.common.errors import UserError
from trainer.driver.run import build


class Rates(Callback):
    def __init__(self):
        self.seen = []

    def on_execution_end(self, trainer, global_step, logs):
        self.seen.append((global_step, logs["train/learning_rate"]))


def test_cosine_warms_up_to_the_optimizers_rate_and_decays_over_the_run(make_cfg, tmp_path):
    r = build(make_cfg("+experiment=dense", "callbacks=none", "schedule=cosine",
                       "schedule.warmup_steps=40", "trainer.max_steps=200",
                       "trainer.steps_per_execution=10", "optimizer.learning_rate=3e-3"),
              tmp_path)
    rates = Rates()
    r.trainer.callbacks.append(rates)
    r.trainer.fit(r.step, r.data)
    expected = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, warmup_target=3e-3, warmup_steps=40, decay_steps=160)
    assert len(rates.seen) >= 20  # executions of 10 steps, cut at epoch ends
    for step, rate in rates.seen:
        assert rate == pytest.approx(float(expected(step)), rel=1e-5, abs=1e-9), step
    peak = max(rate for _, rate in rates.seen)  # read at execution ends, near step 40
    assert 2.9e-3 < peak <= 3e-3 and rates.seen[-1][1] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("eager", [False, True])
def test_tensorboard_draws_the_scheduled_rate_at_every_step(make_cfg, tmp_path, eager):
    # A 10-step warm-up inside executions of 16 steps: TensorBoard still gets the ramp, one
    # point per step, the rate each step's update used (the schedule at its iteration).
    from tests.tb_reader import load, scalars

    r = build(make_cfg("+experiment=dense", "~callbacks.checkpoint", "schedule=cosine",
                       "schedule.warmup_steps=10", "trainer.epochs=2",
                       "trainer.steps_per_execution=16", "optimizer.learning_rate=3e-3",
                       f"trainer.run_eagerly={str(eager).lower()}"), tmp_path)
    r.trainer.fit(r.step, r.data)
    expected = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, warmup_target=3e-3, warmup_steps=10, decay_steps=36)
    points = scalars(load(tmp_path / "tb" / "train"), "learning_rate")
    assert [s for s, _ in points] == list(range(1, 47))
    for step, rate in points:
        assert rate == pytest.approx(float(expected(step - 1)), rel=1e-5, abs=1e-9), step
    assert max(rate for _, rate in points[:10]) < 3e-3 and points[10][1] == pytest.approx(3e-3)


def test_an_experiments_rate_is_the_peak_of_the_users_schedule(make_cfg, tmp_path):
    # finetune sets optimizer.learning_rate=1e-2 and parameter groups; the schedule the user
    # chooses shapes that rate instead of being replaced by it, groups included.
    r = build(make_cfg("+experiment=finetune", "schedule=cosine", "callbacks=none"), tmp_path)
    base = r.step.optimizers["optimizer"]
    r.step.build()
    lr = base.optimizers["base"]._learning_rate
    assert isinstance(lr, keras.optimizers.schedules.CosineDecay)
    assert lr.warmup_target == pytest.approx(1e-2)
    assert lr.decay_steps == 20 * r.data.steps_per_epoch("train") - 100


def test_a_schedule_node_as_the_learning_rate_still_works(make_cfg, tmp_path):
    r = build(make_cfg(
        "+experiment=dense", "callbacks=none",
        "optimizer.learning_rate={_target_: keras.optimizers.schedules.ExponentialDecay, "
        "initial_learning_rate: 0.01, decay_steps: 10, decay_rate: 0.5}"), tmp_path)
    r.step.build()
    assert isinstance(r.step.optimizers["optimizer"].optimizers["base"]._learning_rate,
                      keras.optimizers.schedules.ExponentialDecay)


def test_a_schedule_group_over_a_schedule_node_is_an_error(make_cfg, tmp_path):
    with pytest.raises(UserError, match=r"optimizer\.learning_rate, its peak, which must be a "
                                        "number"):
        build(make_cfg("+experiment=pinn", "schedule=cosine"), tmp_path)


def test_gan_optimizers_each_get_the_schedule(make_cfg, tmp_path):
    r = build(make_cfg("+experiment=gan", "schedule=cosine", "callbacks=none"), tmp_path)
    for name in ("generator", "critic"):
        opt = r.step.optimizers[name]
        r.step.build()
        assert isinstance(opt.optimizers["base"]._learning_rate,
                          keras.optimizers.schedules.CosineDecay), name
