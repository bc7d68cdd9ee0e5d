"""The live progress line: its parts against hand-computed values, the callback on a fake
clock and a fake terminal, and the real CLI under a pseudo-terminal and without one."""

import io
import logging
import os
import pty
import select
import subprocess
import sys

import pytest

from tests.helpers import fit_linear
from trainer import Callback, ProgressCallback
from trainer.callbacks.progress_line import Rate, Snapshot, bar, duration, line, rate_text
from trainer.common.errors import UserError
from trainer.distribute.strategies import NoDistribution


class Terminal(io.StringIO):
    """A terminal for the callback: says it is one, and keeps each write apart."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def isatty(self):
        return True

    def write(self, text):
        self.writes.append(text)
        return super().write(text)


class Ticks:
    """A clock that moves ``step`` seconds at each reading."""

    def __init__(self, step=0.5):
        self.t, self.step = -step, step

    def __call__(self):
        self.t += self.step
        return self.t


class Losses(Callback):
    def __init__(self):
        self.seen = []

    def on_execution_end(self, trainer, global_step, logs):
        self.seen.append((global_step, logs["train/loss"]))


# --- the line's parts ----------------------------------------------------------------------
def test_rate_spans_the_last_window_of_samples():
    r = Rate(window=10.0)
    r.reset(0.0, 0)
    assert r.per_second() is None
    r.add(2.0, 100)  # 50 steps/s
    assert r.per_second() == 50.0
    for t in range(3, 31):  # then 10 steps/s for 28 s
        r.add(float(t), 100 + 10 * (t - 2))
    # The window keeps one sample 10 s or more back: from t=20 (steps 280) to t=30 (380).
    assert r.samples[0] == (20.0, 280) and r.per_second() == 10.0


def test_durations_rates_and_bars():
    assert [duration(s) for s in (0, 7.4, 65, 3723, -3)] == ["0:00", "0:07", "1:05", "1:02:03",
                                                               "0:00"]
    assert rate_text(3412.2) == "3,412 steps/s" and rate_text(12.34) == "12.3 steps/s"
    assert rate_text(0.25) == "4.0 s/step" and rate_text(None) == ""
    assert bar(0, 10, 10) == "[>.........]" and bar(5, 10, 10) == "[=====>....]"
    assert bar(10, 10, 10) == "[==========]" and bar(12, 10, 4) == "[====]"


def test_the_line_fits_the_terminal_and_drops_parts_in_order():
    s = Snapshot(label="Epoch 2/10", done=256, total=1024, rate=128.0, run_eta=300.0,
                 values=(("loss", 0.123456),))
    wide = line(s, 200)
    # ETA: 768 steps left at 128 steps/s = 6 s.
    assert wide == ("Epoch 2/10   256/1024  [=======>......................]  128 steps/s  "
                    "ETA 0:06 (run 5:00)  loss 0.1235")
    rest = len(wide) - 34  # without the bar and its separator
    assert len(line(s, rest + 4 + 20 + 1)) == rest + 24 and "[=====>" in line(s, rest + 25)
    # Too narrow for a 10-wide bar beside the run's ETA: the run's ETA goes first.
    narrow = line(s, rest + 4 + 9 + 1)
    assert "(run" not in narrow and "[" in narrow and len(narrow) <= rest + 13
    assert line(s, 60) == "Epoch 2/10   256/1024  128 steps/s  ETA 0:06  loss 0.1235"
    assert line(s, 45) == "Epoch 2/10   256/1024  ETA 0:06  loss 0.1235"
    assert line(s, 20) == "Epoch 2/10   256/10"  # the end cut: width - 1 characters
    assert line(s, None, graphic=False) == ("Epoch 2/10   256/1024  128 steps/s  ETA 0:06 "
                                            "(run 5:00)  loss 0.1235")


def test_a_stream_of_unknown_length_shows_steps_and_rate_without_eta():
    s = Snapshot(label="Epoch 1", done=512, total=None, rate=3412.0, run_eta=9.0,
                 values=(("loss", 2.0),))
    assert s.eta is None
    assert line(s, 120) == "Epoch 1  512 steps  3,412 steps/s  loss 2"


# --- the callback on a fake clock ----------------------------------------------------------
@pytest.mark.parametrize("eager", [False, True], ids=["compiled", "eager"])
def test_the_line_redraws_with_rate_eta_and_the_last_loss(monkeypatch, eager):
    """7 steps an epoch, one per execution, 0.5 s between the clock's readings: 2 steps/s
    from the second execution on (the first, which traces, is not timed)."""
    monkeypatch.setenv("COLUMNS", "200")
    term, losses = Terminal(), Losses()
    cb = ProgressCallback(mode="bar", min_interval_seconds=0, stream=term, clock=Ticks())
    _, _, logs = fit_linear(epochs=2, spe=1, run_eagerly=eager, callbacks=[cb, losses])
    draws = [w for w in term.writes if w.startswith("\r") and not w.endswith("\n")]
    assert len(draws) == 2 * (1 + 7)  # each epoch's start and each execution
    loss = dict(losses.seen)
    # The first execution: no rate yet, so no ETA.
    assert draws[1].split("  ")[:3] == ["\rEpoch 1/2", "1/7", bar(1, 7, 30)]
    assert "steps/s" not in draws[1] and "ETA" not in draws[1]
    assert draws[1].rstrip().endswith(f"loss {loss[1]:.4g}")
    # Step 4 at 2 steps/s: 3 steps to the epoch's end (1.5 s, shown 0:02), 10 to the
    # run's (5 s; no epoch has been evaluated yet, so that is all).
    assert f"\rEpoch 1/2  4/7  [{'=' * 17}>{'.' * 12}]  2.0 steps/s  ETA 0:02 (run 0:05)  " \
           f"loss {loss[4]:.4g}" == draws[4].rstrip()
    # The last epoch: its own ETA only.
    assert "ETA 0:02  loss" in draws[8 + 1 + 2]  # step 10: 4 steps left
    finals = [w for w in term.writes if w.endswith("\n")]
    assert len(finals) == 2
    # Epoch 2 ran from t=4.5 to its last execution at t=8.0: 7 steps in 3.5 s.
    assert finals[1].startswith("\rEpoch 2/2  7/7  [====") and "  3.5 s, 2.0 steps/s  " in \
        finals[1]
    assert f"train/loss={logs['train/loss']:.4g}" in finals[1]
    assert f"val/loss={logs['val/loss']:.4g}" in finals[1]


def test_redraws_wait_for_the_min_interval(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    term = Terminal()
    cb = ProgressCallback(mode="bar", min_interval_seconds=1.0, stream=term, clock=Ticks())
    fit_linear(epochs=1, spe=1, callbacks=[cb])
    draws = [w.split("  ")[1] for w in term.writes if w.startswith("\r")]
    # The start at t=0, then every other execution (t=1, 2, 3), then the final line.
    assert draws == ["0/7", "2/7", "4/7", "6/7", "7/7"]


def test_run_eta_counts_the_evaluations_at_their_measured_time(monkeypatch):
    """3 epochs: in the second, the steps left at 2 steps/s and two epoch ends left at the
    first one's 0.5 s (from its last execution to its end)."""
    monkeypatch.setenv("COLUMNS", "200")
    term = Terminal()
    cb = ProgressCallback(mode="bar", min_interval_seconds=0, stream=term, clock=Ticks())
    fit_linear(epochs=3, spe=1, callbacks=[cb])
    step9 = next(w for w in term.writes if w.startswith("\rEpoch 2/3  2/7"))
    # Step 9 of 21: 12 steps / 2 steps/s + 2 x 0.5 s = 7 s.
    assert "ETA 0:03 (run 0:07)" in step9


def test_a_continued_epoch_counts_from_its_step(monkeypatch):
    """A second fit that goes on inside an open epoch (as a resumed run does) counts from
    the step it continues at, and times only its own steps."""
    monkeypatch.setenv("COLUMNS", "200")
    term = Terminal()
    cb = ProgressCallback(mode="bar", min_interval_seconds=0, stream=term, clock=Ticks())
    trainer, _, _ = fit_linear(epochs=1, spe=1, max_steps=3, callbacks=[cb])
    term.writes.clear()
    trainer.max_steps = None
    trainer.fit(trainer.step, trainer.data)
    assert term.writes[0].startswith("\rEpoch 1/1  3/7  [")
    assert "  2.0 s, 2.0 steps/s  " in term.writes[-1]  # 4 steps from t=0 to t=2


def test_log_records_clear_the_line_first(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    term = Terminal()
    handler = logging.StreamHandler(term)
    logging.getLogger().addHandler(handler)

    class Says(Callback):
        def on_execution_end(self, trainer, global_step, logs):
            if global_step == 3:
                logging.getLogger("trainer").warning("something to say")

    try:
        cb = ProgressCallback(mode="bar", min_interval_seconds=0, stream=term, clock=Ticks())
        fit_linear(epochs=1, spe=1, callbacks=[cb, Says()])
    finally:
        logging.getLogger().removeHandler(handler)
    text = term.getvalue()
    before, after = text.split("something to say\n")
    drawn = before.rsplit("\r", 2)[0].rsplit("\r", 1)[1]  # the step 3 line
    assert drawn.startswith("Epoch 1/1  3/7") and before.endswith(
        "\r" + " " * len(drawn.rstrip()) + "\r")
    assert after.startswith("\rEpoch 1/1  4/7")  # drawn again after the record
    assert not handler.filters  # taken off at the end of fit


def test_log_lines_without_a_terminal(caplog):
    """A periodic line inside the epoch every log_every_seconds, and one at its end; no
    carriage return."""
    out = io.StringIO()  # not a terminal
    cb = ProgressCallback(log_every_seconds=1.0, stream=out, clock=Ticks())
    with caplog.at_level(logging.INFO, logger="trainer"):
        fit_linear(epochs=1, spe=1, callbacks=[cb])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().lower().startswith(
        "epoch ")]
    assert [x.split("  ")[1] if x.startswith("E") else x[:16] for x in lines] == [
        "2/7", "4/7", "6/7", "epoch 1/1 step 7"]
    assert "2.0 steps/s  ETA 0:02  loss" in lines[1]  # step 4 at t=2: 3 steps left
    assert lines[-1].endswith("(3.5 s, 2.0 steps/s)")
    assert out.getvalue() == ""


def test_only_the_chief_shows_progress(caplog):
    class Worker(NoDistribution):
        worker_index = 1

    term = Terminal()
    with caplog.at_level(logging.INFO, logger="trainer"):
        fit_linear(epochs=1, callbacks=[ProgressCallback(mode="bar", stream=term),
                                        ProgressCallback(mode="log")],
                   distribution=Worker())
    assert term.writes == [] and not any("epoch" in r.getMessage().lower()
                                         for r in caplog.records)


@pytest.mark.parametrize("kw, key", [({"mode": "bars"}, "mode"),
                                     ({"min_interval_seconds": -1}, "min_interval_seconds"),
                                     ({"log_every_seconds": float("nan")}, "log_every_seconds")])
def test_bad_settings_name_the_key(kw, key):
    with pytest.raises(UserError, match=f"callbacks.progress.{key}="):
        ProgressCallback(**kw)


# --- the real CLI ----------------------------------------------------------------------------
RUN = ["+experiment=dense", "trainer.epochs=2", "trainer.steps_per_execution=1",
       "callbacks.tensorboard.histogram_every_n_steps=0", "~callbacks.checkpoint",
       "~callbacks.health"]


def _under_pty(args, cwd, columns=100):
    """``python -m trainer ARGS`` with stdout on a pseudo-terminal ``columns`` wide; its
    output as the terminal received it, and the exit status."""
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    p = subprocess.Popen([sys.executable, "-m", "trainer", *args], cwd=cwd, stdout=slave,
                         stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                         env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"})
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif p.poll() is not None:
            break
    os.close(master)
    return out.decode(), p.wait(timeout=300)


@pytest.mark.slow
def test_the_cli_draws_the_line_on_a_pseudo_terminal(tmp_path):
    """Two replicas and two micro-batches per update: the line counts updates. At 80
    columns the bar shrinks to fit beside the run's ETA."""
    out, code = _under_pty([*RUN, "distribute=mirrored", "distribute.cpu_replicas=2",
                            "trainer.accumulate_steps=2",
                            "callbacks.progress.min_interval_seconds=0",
                            f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, columns=80)
    assert code == 0, out[-2000:]
    # One terminal line per epoch (the terminal turns "\n" into "\r\n"): the line drawn
    # again and again after "\r", then the epoch's final line.
    epochs = [x.split("\r")[1:] for x in out.split("\r\n") if x.startswith("\rEpoch ")]
    assert len(epochs) == 2
    for i, draws in enumerate(epochs, 1):
        *live, final = draws
        # The dense experiment's digits: 23 updates an epoch, each its own execution.
        assert [d.split("  ")[1] for d in live] == [f"{n:>2}/23" for n in range(24)]
        assert all(d.startswith(f"Epoch {i}/2  ") and len(d) <= 79 for d in live)  # a column free
        mid = live[12]
        assert "steps/s  ETA " in mid and "  loss " in mid and "=>" in mid
        assert ("(run " in mid) == (i == 1)
        assert final.startswith(f"Epoch {i}/2  23/23  [===") and "val/accuracy=" in final
        assert "steps/s" in final


@pytest.mark.slow
def test_the_cli_logs_lines_without_a_terminal(tmp_path):
    p = subprocess.run([sys.executable, "-m", "trainer", *RUN, "trainer.epochs=1",
                        "callbacks.progress.log_every_seconds=0.01",
                        f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert p.returncode == 0, p.stderr[-2000:]
    assert "\r" not in p.stdout and "[=" not in p.stdout
    periodic = [x for x in p.stdout.splitlines() if " - Epoch 1/1 " in x]
    assert periodic and all("/23  " in x for x in periodic)
    assert "steps/s  ETA " in periodic[-1]
    assert "epoch 1/1 step 23 " in p.stdout
