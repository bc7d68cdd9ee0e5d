"""``python -m trainer.launch``: argument parsing, the run dir, TF_CONFIG, and real processes.

The quick tests run the launcher over a fake worker (a few lines of Python, no TensorFlow)
to check output prefixing, signal forwarding, failure handling and exit statuses in a
second or two. The slow tests run real multi-worker training on 127.0.0.1: two workers
end with the same variables as a one-process MirroredStrategy run over two CPU replicas,
a killed worker brings the launcher down with nothing left alive, and a run killed or
preempted resumes with the same command. Every wait is bounded.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from trainer import launch
from trainer.driver import launcher
from trainer.training.preemption import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300  # seconds: the bound on any one real training command
LAUNCH = [sys.executable, "-m", "trainer.launch"]


# -- the pure parts ------------------------------------------------------------------------


def test_arguments_and_the_double_dash_split():
    args = launch.parse_args(["--workers", "3", "--timeout", "90", "--", "+experiment=dense",
                              "trainer.epochs=2", "distribute=multi_worker"])
    assert (args.workers, args.timeout, args.grace, args.module) == (3, 90.0, 10.0, "trainer")
    # distribute=multi_worker is the launcher's own; it is not passed twice.
    assert args.overrides == ["+experiment=dense", "trainer.epochs=2"]
    assert launch.split_argv(["-n", "2"]) == (["-n", "2"], [])
    assert launch.split_argv(["-n", "2", "--", "a=1", "--", "b=2"]) == (["-n", "2"],
                                                                      ["a=1", "--", "b=2"])
    assert launch.parse_args(["-n", "1"]).overrides == []


@pytest.mark.parametrize("argv,message", [
    (["--workers", "2", "--bogus", "--", "a=1"], "unrecognized arguments: --bogus"),
    (["--workers", "2", "trainer.epochs=2"], "put the trainer's overrides after --"),
    (["--workers", "0"], "must be at least 1"),
    (["--", "a=1"], "required: --workers"),
    (["-n", "2", "--", "distribute=mirrored"], "runs distribute=multi_worker workers"),
    (["-n", "2", "--", "-m", "a=1,2"], "config overrides only"),
])
def test_usage_errors_are_one_line_and_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        launch.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith("python -m trainer.launch")


def test_an_unknown_option_from_the_command_line():
    p = subprocess.run([*LAUNCH, "--workers", "2", "--frobnicate", "--", "trainer.epochs=1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines() == [
        "python -m trainer.launch: error: unrecognized arguments: --frobnicate (see --help)"]


def test_help():
    p = subprocess.run([*LAUNCH, "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    for text in ("--workers", "--timeout", "TF_CONFIG", "exit status", "75"):
        assert text in p.stdout


def test_the_launcher_does_not_import_tensorflow():
    code = "import sys, trainer.launch; print(any(m.startswith('tensorflow') for m in sys.modules))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.stdout.strip() == "False", p.stderr


NOW = datetime.datetime(2025, 3, 4, 5, 6, 7)


@pytest.mark.parametrize("overrides,expected", [
    ([], "outputs/train/runs/2025-03-04_05-06-07"),
    (["task_name=mine"], "outputs/mine/runs/2025-03-04_05-06-07"),
    # The experiment's own task_name, as a one-process run would use.
    (["+experiment=dense"], "outputs/dense/runs/2025-03-04_05-06-07"),
    (["+experiment=dense", "task_name=x"], "outputs/x/runs/2025-03-04_05-06-07"),
    (["+experiment=no_such_file"], "outputs/train/runs/2025-03-04_05-06-07"),
    (["hydra.run.dir=/data/run1", "task_name=x"], "/data/run1"),
    # ${now:...} is fixed once by the launcher, so that the workers agree.
    (["hydra.run.dir=out/${now:%H-%M-%S}/a"], "out/05-06-07/a"),
    (["hydra.run.dir=a", "hydra.run.dir=b"], "b"),
])
def test_run_dir(overrides, expected):
    assert launcher.choose_run_dir(overrides, now=NOW) == expected


def test_tf_config_and_worker_commands():
    ports = launcher.free_ports(3)
    assert len(set(ports)) == 3 and all(0 < p < 65536 for p in ports)
    cfg = launcher.tf_config(ports, 2)
    assert cfg == {"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                   "task": {"type": "worker", "index": 2}}
    assert json.loads(json.dumps(cfg)) == cfg
    overrides = ["+experiment=dense", "hydra.run.dir=ignored", "trainer.epochs=2"]
    chief = launcher.worker_command(0, "outputs/r", overrides)
    other = launcher.worker_command(1, "outputs/r", overrides)
    assert chief == [sys.executable, "-m", "trainer", "distribute=multi_worker",
                     "+experiment=dense", "trainer.epochs=2", "hydra.run.dir=outputs/r"]
    # Only the chief writes .hydra/ and the log file.
    assert other[:len(chief)] == chief and {
        "hydra.output_subdir=null", "~hydra.job_logging.handlers.file"} <= set(other[len(chief):])


def test_exit_statuses_in_words():
    assert launcher.describe(0) == "exited 0"
    assert launcher.describe(75) == "exited 75 (preempted)"
    assert launcher.describe(-9) == "was killed by SIGKILL"
    assert [launcher.exit_code(s) for s in (0, 3, -9, -15)] == [0, 3, 137, 143]


# -- the process handling, over a fake worker --------------------------------------------

#: A stand-in for ``python -m trainer``: reads TF_CONFIG, reports what it was given, then
#: behaves as told by ``fake.w<i>=`` (or ``fake.all=``). Bounded: it never lives a minute.
FAKE_WORKER = r'''
import json, os, signal, sys, time
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
cfg = json.loads(os.environ["TF_CONFIG"])
i = cfg["task"]["index"]
mode = args.get(f"fake.w{i}", args.get("fake.all", "ok"))
print("report " + json.dumps({"argv": sys.argv[1:], "tf_config": cfg, "pid": os.getpid()}))
end = time.monotonic() + 50
if mode == "ok":
    sys.exit(0)
if mode.startswith("exit:"):
    time.sleep(0.3)
    sys.exit(int(mode[5:]))
if mode == "spam":
    for n in range(300):
        print(f"{n}:" + "o" * 5000)
        print(f"{n}:" + "e" * 5000, file=sys.stderr)
    sys.exit(0)
if mode == "preemptible":
    def stop(signum, frame):
        print("preempted by " + signal.Signals(signum).name)
        sys.exit(75)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
elif mode == "stuck":  # as a worker blocked in a collective op: deaf to SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready")
while time.monotonic() < end:
    time.sleep(0.02)
sys.exit(99)
'''


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


class Launched:
    """The launcher in a subprocess; its output (stdout and stderr merged) read by a thread."""

    def __init__(self, argv, *, cwd, env=None):
        self.proc = subprocess.Popen([*LAUNCH, *argv], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self.started = time.monotonic()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            assert self.proc.poll() is None or self._reader.is_alive(), self.text[-5000:]
            time.sleep(0.05)
        pytest.fail(f"no line matching {pattern!r} within {timeout} s:\n{self.text[-5000:]}")

    def worker_pids(self) -> list[int]:
        self.wait_for(r"^\[launch\] worker 1: pid \d+", timeout=60)
        found = [re.match(r"^\[launch\] worker (\d+): pid (\d+)", line) for line in self.lines]
        return [int(m.group(2)) for m in sorted(filter(None, found), key=lambda m: m.group(1))]

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            self.close()
        self._reader.join(timeout=10)
        return code

    def close(self):
        if self.proc.poll() is None:  # a failing test must not leave processes behind
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        for line in self.lines:
            m = re.match(r"^\[launch\] worker \d+: pid (\d+)", line)
            if m and _alive(int(m.group(1))):
                os.kill(int(m.group(1)), signal.SIGKILL)


@pytest.fixture
def fake(tmp_path):
    """Runs the launcher over the fake worker in ``tmp_path``: ``fake(*launcher_args)``."""
    (tmp_path / "fake_worker.py").write_text(FAKE_WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    started = []

    def _launch(*argv):
        launched = Launched(["--module", "fake_worker", *argv], cwd=tmp_path, env=env)
        started.append(launched)
        return launched

    yield _launch
    for launched in started:
        launched.close()


def _reports(launched) -> dict[int, dict]:
    found = {}
    for line in launched.lines:
        m = re.match(r"^\[worker (\d+)\] report (.*)$", line)
        if m:
            found[int(m.group(1))] = json.loads(m.group(2))
    return found


def test_fake_workers_get_their_tf_config_and_one_run_dir(fake):
    launched = fake("--workers", "3", "--", "task_name=t", "a.b=1")
    assert launched.wait(60) == 0, launched.text
    reports = _reports(launched)
    assert sorted(reports) == [0, 1, 2]
    cluster = reports[0]["tf_config"]["cluster"]
    assert len(set(cluster["worker"])) == 3
    run_dirs = set()
    for i, r in reports.items():
        assert r["tf_config"] == {"cluster": cluster, "task": {"type": "worker", "index": i}}
        assert r["argv"][:3] == ["distribute=multi_worker", "task_name=t", "a.b=1"]
        run_dirs |= {a for a in r["argv"] if a.startswith("hydra.run.dir=")}
        assert ("hydra.output_subdir=null" in r["argv"]) == (i > 0)
    assert len(run_dirs) == 1 and re.fullmatch(
        r"hydra.run.dir=outputs/t/runs/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", run_dirs.pop())
    # The run dir and every pid once, at the start.
    head = [line for line in launched.lines if line.startswith("[launch]")][:4]
    assert re.match(r"\[launch\] run dir outputs/t/runs/\S+: 3 workers", head[0])
    assert [int(line.rsplit("pid ", 1)[1].split()[0]) for line in head[1:]] == [
        reports[i]["pid"] for i in range(3)]
    assert launched.lines[-1].startswith("[launch] exit 0 (all workers finished)")


def test_every_line_is_prefixed_and_whole(fake):
    launched = fake("--workers", "2", "--", "fake.all=spam")
    assert launched.wait(60) == 0, launched.text[-3000:]
    counts = {}
    for line in launched.lines:
        if line.startswith("[launch] ") or " report " in line:
            continue
        m = re.fullmatch(r"\[worker (\d)\] (\d+):(o{5000}|e{5000})", line)
        assert m, line[:200]
        key = (m.group(1), m.group(3)[0])
        assert int(m.group(2)) == counts.get(key, 0)  # in order, none lost
        counts[key] = int(m.group(2)) + 1
    assert counts == {(w, s): 300 for w in "01" for s in "oe"}


def test_a_failed_worker_stops_the_others_and_is_named(fake):
    # Worker 0 ignores SIGTERM, as a worker stuck in a collective op does: SIGKILL it is.
    launched = fake("--workers", "2", "--grace", "1", "--", "fake.w0=stuck", "fake.w1=exit:3")
    pids = launched.worker_pids()
    assert launched.wait(30) == 3, launched.text
    assert time.monotonic() - launched.started < 20
    failure = [line for line in launched.lines if "stopping the other workers" in line]
    assert failure == [f"[launch] worker 1 (pid {pids[1]}) exited 3: stopping the other workers"]
    last = launched.lines[-1]
    assert last.startswith("[launch] exit 3 (failed: worker 1") and "was killed by SIGKILL" in last
    assert not any(_alive(p) for p in pids)


def test_a_worker_killed_by_a_signal(fake):
    launched = fake("--workers", "2", "--grace", "1", "--", "fake.all=preemptible")
    pids = launched.worker_pids()
    launched.wait_for(r"^\[worker 1\] ready", 30)
    os.kill(pids[1], signal.SIGKILL)
    assert launched.wait(30) == 128 + signal.SIGKILL
    assert f"[launch] worker 1 (pid {pids[1]}) was killed by SIGKILL: stopping the other " \
           "workers" in launched.lines
    # The others were asked with SIGTERM first: the fake worker 0 stops as preempted.
    assert "[worker 0] preempted by SIGTERM" in launched.lines
    assert not any(_alive(p) for p in pids)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded_and_all_preempted_exits_75(fake, sig):
    launched = fake("--workers", "2", "--", "fake.all=preemptible")
    for i in range(2):
        launched.wait_for(rf"^\[worker {i}\] ready", 30)
    launched.proc.send_signal(sig)
    assert launched.wait(30) == EXIT_PREEMPTED, launched.text
    name = signal.Signals(sig).name
    assert {f"[worker {i}] preempted by {name}" for i in range(2)} <= set(launched.lines)
    assert launched.lines[-1].startswith("[launch] exit 75 (preempted: resume with the same "
                                         "command and hydra.run.dir=outputs/train/runs/")


def test_workers_do_not_outlive_a_killed_launcher(fake):
    # The launcher cannot forward anything once SIGKILLed: the kernel sends the workers
    # SIGTERM (PR_SET_PDEATHSIG), as a preemption.
    launched = fake("--workers", "2", "--", "fake.all=preemptible")
    pids = launched.worker_pids()
    for i in range(2):
        launched.wait_for(rf"^\[worker {i}\] ready", 30)
    launched.proc.send_signal(signal.SIGKILL)
    launched.proc.wait(timeout=30)
    end = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)]


def test_timeout_stops_everything(fake):
    launched = fake("--workers", "2", "--timeout", "2", "--grace", "1", "--", "fake.all=stuck")
    pids = launched.worker_pids()
    assert launched.wait(30) == launch.EXIT_TIMEOUT
    assert 2 <= time.monotonic() - launched.started < 20
    assert "[launch] timeout: 2 s exceeded; stopping the workers" in launched.lines
    assert not any(_alive(p) for p in pids)


def test_a_worker_left_running_after_the_others_finished_is_stopped(fake):
    launched = fake("--workers", "2", "--stop-timeout", "1", "--grace", "1", "--",
                    "fake.w1=stuck")
    pids = launched.worker_pids()
    assert launched.wait(30) == 128 + signal.SIGKILL
    assert any(line.startswith(f"[launch] worker 1 (pid {pids[1]}) still running 1 s after")
               for line in launched.lines)
    assert not any(_alive(p) for p in pids)


# -- real multi-worker training ------------------------------------------------------------

#: A tiny dense run: 2 epochs of 23 steps (1437 digits, batch 64).
TINY = ["+experiment=dense", "trainer.epochs=2", "data.batch_size=64",
        "model.hidden_units=[32]", "model.dropout=0.0", "callbacks.progress.mode=log",
        "callbacks.tensorboard.histogram_every_n_steps=0"]
#: Long enough to be killed after a checkpoint: 5 epochs of 23 steps, one step per
#: execution with a pause after each, and a checkpoint every 5 steps.
LONG = [*TINY, "trainer.epochs=5", "trainer.steps_per_execution=1",
        "callbacks.checkpoint.every_n_steps=5", "callbacks.checkpoint.every_seconds=0",
        "callbacks.checkpoint.min_interval_seconds=0",
        "+callbacks.pause._target_=tests.helpers.Pause", "+callbacks.pause.seconds=0.05"]
LONG_STEPS = 5 * 23


def _env():
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}


def _save_weights(directory) -> list[str]:
    return ["+callbacks.save_weights._target_=tests.helpers.SaveWeights",
            f"+callbacks.save_weights.directory={directory}"]


def _weights(path) -> list[np.ndarray]:
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def _launch(run_dir, *overrides, workers=2) -> Launched:
    return Launched(["--workers", str(workers), "--", *overrides, f"hydra.run.dir={run_dir}"],
                    cwd=ROOT, env=_env())


def _wait_for_checkpoint(run_dir, launched, timeout=TIMEOUT):
    end = time.monotonic() + timeout
    while not list((run_dir / "checkpoints").glob("ckpt-*.index")):
        assert launched.proc.poll() is None, launched.text[-5000:]
        assert time.monotonic() < end, "no checkpoint in time"
        time.sleep(0.02)


def _assert_nothing_alive(pids):
    end = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)]


@pytest.mark.slow
def test_two_workers_match_one_process_over_two_replicas(tmp_path):
    # A Keras metric too: its variables have a copy per worker, summed when read.
    auc = "metrics=[{_target_: keras.metrics.AUC}]"
    launched = _launch(tmp_path / "mw", *TINY, auc, *_save_weights(tmp_path / "mw_weights"))
    mirrored = subprocess.run(
        [sys.executable, "-m", "trainer", *TINY, auc, "distribute=mirrored",
         "distribute.cpu_replicas=2", *_save_weights(tmp_path / "mirrored_weights"),
         f"hydra.run.dir={tmp_path / 'mirrored'}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert mirrored.returncode == 0, mirrored.stderr[-5000:]
    assert launched.wait() == 0, launched.text[-5000:]
    w0, w1 = (_weights(tmp_path / "mw_weights" / f"worker{i}.npz") for i in range(2))
    reference = _weights(tmp_path / "mirrored_weights" / "worker0.npz")
    assert len(w0) == len(w1) == len(reference) == 4  # one Dense(32), the output layer
    for a, b, ref in zip(w0, w1, reference):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-5)
    # The chief keeps the run's outputs; the other worker writes none of its own.
    run_dir = tmp_path / "mw"
    assert (run_dir / "metrics.json").exists() and (run_dir / "model.keras").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 2 * 23
    expected = json.loads((tmp_path / "mirrored" / "metrics.json").read_text())
    for key in ("train/auc", "val/auc", "train/accuracy", "val/loss"):
        assert metrics[key] == pytest.approx(expected[key], rel=1e-4), key
    assert (run_dir / ".hydra" / "overrides.yaml").exists()


@pytest.mark.slow
def test_a_killed_worker_brings_the_launcher_down(tmp_path):
    run_dir = tmp_path / "run"
    launched = _launch(run_dir, *LONG)
    try:
        pids = launched.worker_pids()
        _wait_for_checkpoint(run_dir, launched)
        os.kill(pids[1], signal.SIGKILL)
        killed = time.monotonic()
        code = launched.wait(60)
        assert time.monotonic() - killed < 60
    finally:
        launched.close()
    assert code != 0
    assert f"[launch] worker 1 (pid {pids[1]}) was killed by SIGKILL: stopping the other " \
           "workers" in launched.lines
    _assert_nothing_alive(pids)


@pytest.mark.slow
def test_a_run_killed_after_a_checkpoint_resumes(tmp_path):
    run_dir = tmp_path / "run"
    first = _launch(run_dir, *LONG)
    try:
        pids = first.worker_pids()
        _wait_for_checkpoint(run_dir, first)
        os.kill(pids[1], signal.SIGKILL)
        assert first.wait(60) != 0
    finally:
        first.close()
    _assert_nothing_alive(pids)
    assert not (run_dir / "metrics.json").exists()
    second = _launch(run_dir, *LONG)
    assert second.wait() == 0, second.text[-5000:]
    assert "resumed from" in second.text
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == LONG_STEPS


@pytest.mark.slow
def test_sigterm_to_the_launcher_preempts_every_worker_then_resumes(tmp_path):
    run_dir = tmp_path / "run"
    first = _launch(run_dir, *LONG)
    try:
        pids = first.worker_pids()
        _wait_for_checkpoint(run_dir, first)
        first.proc.send_signal(signal.SIGTERM)
        assert first.wait(120) == EXIT_PREEMPTED, first.text[-5000:]
    finally:
        first.close()
    assert "worker 0 exited 75 (preempted), worker 1 exited 75 (preempted)" in first.lines[-1]
    _assert_nothing_alive(pids)
    # The workers agreed on the step to stop at, and the chief saved a checkpoint there.
    stopped = {int(m.group(1)): int(m.group(2)) for line in first.lines if (m := re.match(
        r"^\[worker (\d)\] preempted: stopped by SIGTERM at step (\d+) after saving", line))}
    assert sorted(stopped) == [0, 1] and stopped[0] == stopped[1], first.text[-5000:]
    stopped_at = stopped[0]
    assert 0 < stopped_at < LONG_STEPS
    assert (run_dir / "checkpoints" / f"ckpt-{stopped_at}.index").exists()
    second = _launch(run_dir, *LONG)
    assert second.wait() == 0, second.text[-5000:]
    assert "resumed from" in second.text
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == LONG_STEPS


@pytest.mark.slow
def test_a_signal_to_one_worker_stops_every_worker_at_the_same_step(tmp_path):
    # As when a scheduler signals one machine's task: the workers agree at the next
    # execution boundary, the chief saves, and every worker exits 75 (not 0: the run is
    # not finished, whatever worker got the signal).
    run_dir = tmp_path / "run"
    first = _launch(run_dir, *LONG)
    try:
        pids = first.worker_pids()
        _wait_for_checkpoint(run_dir, first)
        os.kill(pids[1], signal.SIGTERM)
        assert first.wait(120) == EXIT_PREEMPTED, first.text[-5000:]
    finally:
        first.close()
    stopped = {int(m.group(1)): (m.group(2), int(m.group(3))) for line in first.lines if (
        m := re.match(r"^\[worker (\d)\] preempted: stopped by (.+?) at step (\d+)", line))}
    assert stopped[1][0] == "SIGTERM" and stopped[0][0] == "a signal to another worker"
    assert stopped[0][1] == stopped[1][1] < LONG_STEPS, first.text[-5000:]
    assert (run_dir / "checkpoints" / f"ckpt-{stopped[0][1]}.index").exists()
    assert not (run_dir / ".worker-1").exists()  # its scratch checkpoints are gone
