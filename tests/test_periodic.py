"""Periodic: when an action is due, on a fake clock."""

import ast
from pathlib import Path

import pytest

from trainer.training.periodic import Periodic


class Clock:
    """A settable clock: ``clock.t += 5`` passes five seconds."""

    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def fired(when, steps, **kw):
    return [s for s in steps if when.due(s, **kw)]


def test_every_n_steps_fires_at_the_first_boundary_at_or_past_each_multiple():
    when = Periodic(every_n_steps=20, clock=Clock())
    # Executions of 10, 10, 3, ...: boundaries rarely land on multiples of 20.
    assert fired(when, [10, 20, 23, 33, 43, 46, 59, 61]) == [20, 43, 61]
    assert when.last_step == 61


def test_several_multiples_in_one_execution_fire_once():
    when = Periodic(every_n_steps=5, clock=Clock())
    assert fired(when, [3, 17, 18, 19, 20]) == [17, 20]


def test_on_steps_fire_at_the_first_boundary_at_or_past_each_listed_step_one_per_firing():
    # Boundaries every 4 steps: 2 is served at 4; 3 was passed then too, but waits for 8.
    assert fired(Periodic(on_steps=[3, 2]), [0, 4, 8, 12]) == [4, 8]
    assert fired(Periodic(on_steps=[5, 9]), [0, 4, 8, 12, 16]) == [8, 12]
    when = Periodic(on_steps=[2])
    when.reset(100)  # listed steps are not skipped by a reset: a passed one is still due
    assert when.due(104) and not when.due(108)


def test_nothing_is_due_when_every_trigger_is_off():
    when = Periodic(clock=Clock())
    assert fired(when, range(0, 1000, 7)) == []
    assert not when.due(1000, epoch_end=3, start=True, end=True)
    assert when.last_step is None


def test_reset_counts_from_a_resumed_step():
    when = Periodic(every_n_steps=100, clock=Clock())
    when.reset(1050)
    assert fired(when, [1060, 1099, 1100, 1150, 1210]) == [1100, 1210]


def test_without_reset_counting_starts_at_step_zero():
    when = Periodic(every_n_steps=100, clock=Clock())
    assert fired(when, [1050]) == [1050]  # the buckets passed since step 0 are due


def test_at_start_and_at_end():
    when = Periodic(every_n_steps=10, at_start=True, at_end=True, clock=Clock())
    when.reset(0)
    assert when.due(0, start=True)
    assert fired(when, [4, 8, 12, 16]) == [12]
    assert when.due(17, end=True)
    # Asked without the flag, neither is due.
    other = Periodic(at_start=True, at_end=True, clock=Clock())
    assert not other.due(5) and other.due(5, start=True) and other.due(6, end=True)
    plain = Periodic(every_n_steps=10, clock=Clock())
    assert not plain.due(3, start=True) and not plain.due(4, end=True)


def test_never_twice_at_the_same_global_step():
    when = Periodic(every_n_steps=10, at_end=True, clock=Clock())
    assert when.due(10)
    assert not when.due(10, end=True)  # the end at a step just served
    assert not when.due(10)
    assert when.due(11, end=True)


def test_a_trigger_due_at_the_step_of_the_last_firing_is_served_by_it():
    when = Periodic(every_n_steps=10, at_start=True, clock=Clock())
    when.reset(5)
    assert when.due(25, start=True)  # e.g. a start after a restore past two multiples
    assert not when.due(25)
    assert fired(when, [28, 29, 30]) == [30]


def test_start_of_a_second_fit_at_the_step_of_the_last_firing_is_skipped():
    when = Periodic(every_n_steps=10, at_start=True, at_end=True, clock=Clock())
    when.reset(0)
    assert when.due(0, start=True) and when.due(7, end=True)
    when.reset(7)  # fit again, from where the last one ended
    assert not when.due(7, start=True)
    assert fired(when, [9, 10]) == [10]


def test_min_seconds_holds_step_triggers_back_and_keeps_them_pending():
    clock = Clock()
    when = Periodic(every_n_steps=10, min_seconds=5.0, clock=clock)
    assert when.due(10)
    clock.t += 1
    assert not when.due(20)  # due by steps, too soon
    clock.t += 1
    assert not when.due(25)
    clock.t += 3  # five seconds since the last firing
    assert when.due(27)  # the held-back multiple, at the next boundary
    clock.t += 10
    assert not when.due(29)  # nothing pending: 20 was served at 27
    assert when.due(30)


def test_min_seconds_does_not_hold_back_the_first_firing_the_start_or_the_end():
    clock = Clock()
    when = Periodic(every_n_steps=10, min_seconds=60.0, at_start=True, at_end=True, clock=clock)
    assert when.due(10)  # no firing yet, nothing to be too close to
    assert when.due(11, start=True)
    assert not when.due(20)
    assert when.due(21, end=True)


def test_every_n_epochs_fires_at_epoch_ends_only():
    when = Periodic(every_n_epochs=2, clock=Clock())
    when.reset(0, epoch=0)
    # Epoch ends (0-based epoch, global step) of 7-step epochs; execution boundaries between.
    assert not when.due(4)  # an execution boundary: the epoch trigger is not asked
    ends = [(e, 7 * (e + 1)) for e in range(6)]
    assert [e for e, s in ends if when.due(s, epoch_end=e)] == [1, 3, 5]


def test_every_n_epochs_counts_from_a_resumed_epoch():
    when = Periodic(every_n_epochs=3, clock=Clock())
    when.reset(28, epoch=4)  # resumed with 4 epochs done
    ends = [(e, 7 * (e + 1)) for e in range(4, 10)]
    assert [e for e, s in ends if when.due(s, epoch_end=e)] == [5, 8]  # 6 and 9 epochs done


def test_min_seconds_holds_epoch_triggers_back_until_an_epoch_end_after_the_interval():
    clock = Clock()
    when = Periodic(every_n_epochs=1, min_seconds=30.0, at_end=True, clock=clock)
    out = []
    for epoch in range(5):
        clock.t += 10  # ten-second epochs
        if when.due(7 * (epoch + 1), epoch_end=epoch):
            out.append(epoch)
    assert out == [0, 3]
    assert when.due(35, end=True)


def test_every_seconds_fires_independently_of_steps():
    clock = Clock()
    when = Periodic(every_seconds=10.0, clock=clock)
    when.reset(0)
    out = []
    for step in range(1, 30):
        clock.t += 1.5
        if when.due(step):
            out.append(step)
    assert out == [7, 14, 21, 28]  # 10.5 s after the reset, then after each firing


def test_every_seconds_is_not_held_back_by_min_seconds_and_counts_from_any_firing():
    clock = Clock()
    when = Periodic(every_n_steps=10, every_seconds=3.0, min_seconds=5.0, clock=clock)
    when.reset(0)
    clock.t += 3
    assert when.due(4)  # by time
    clock.t += 1
    assert not when.due(10)  # by steps, but held back
    clock.t += 2
    assert when.due(12)  # by time (3 s since the last firing), which also serves step 10
    clock.t += 5
    assert when.due(20)  # by steps, five seconds after the last firing


def test_every_seconds_counts_from_the_first_question_without_reset():
    clock = Clock()
    when = Periodic(every_seconds=2.0, clock=clock)
    assert not when.due(1)
    clock.t += 2
    assert when.due(2)


def test_combined_step_and_epoch_triggers_share_a_firing_at_one_step():
    when = Periodic(every_n_steps=7, every_n_epochs=1, clock=Clock())
    when.reset(0)
    assert when.due(7)  # the execution boundary that ends epoch 0
    assert not when.due(7, epoch_end=0)  # the epoch end at the same step: already served
    assert not when.due(10)
    assert when.due(14, epoch_end=1)


def test_bad_intervals_are_rejected():
    for kw in ({"every_n_steps": -1}, {"every_n_epochs": -2}, {"every_seconds": -1.0},
               {"min_seconds": -0.5}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            Periodic(**kw)


def test_repr_names_the_triggers_that_are_on():
    assert repr(Periodic(every_n_steps=5, at_end=True)) == "Periodic(every_n_steps=5, at_end=True)"


def test_the_module_does_not_import_tensorflow():
    source = Path(__file__).parents[1] / "trainer" / "training" / "periodic.py"
    tree = ast.parse(source.read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= {"__future__", "time", "collections"}
