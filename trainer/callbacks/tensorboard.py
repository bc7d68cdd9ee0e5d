"""TensorBoard: scalars, histograms, the config as text and an HParams summary."""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from pathlib import Path

import tensorflow as tf
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.scalar import metadata as scalar_metadata

from trainer.callbacks.base import VAL, Callback, resolve
from trainer.common.errors import UserError
from trainer.training.periodic import Periodic

log = logging.getLogger(__name__)

#: The tag prefix of each epoch's ``train/`` and ``val/`` logs in the log dir's root run,
#: where the HParams session reads its metrics.
EPOCH = "epoch"


class TensorBoardCallback(Callback):
    """Writes event files under ``<log_dir>/train`` and ``<log_dir>/val``.

    - every execution: the train logs (``loss``, metrics, ``grad_norm``,
      ``learning_rate``, ``time/steps_per_second``) into ``train``; a learning rate that
      follows a schedule is written at every step (the rate that step's update used,
      computed from the schedule on the execution's iterations), so a warm-up shorter
      than an execution still draws its ramp;
    - every epoch: the validation logs into ``val`` under the same tags, so
      TensorBoard draws train and validation on one chart; with an HParams session
      (``hparams``, which the driver sets), also the epoch's ``train/`` and ``val/`` logs (as in
      ``history.jsonl``: the training values are the epoch's means) into the log dir
      itself as ``epoch/train/loss``, ...: the session's metrics, whose last values the
      HParams dashboard compares (the last execution's means would be a few batches');
    - at the start and every ``histogram_every_n_steps`` steps (at the first
      execution boundary at or past each multiple; 0 turns them off), but not
      within ``histogram_min_interval_seconds`` of the previous ones (a held-back
      set is written at the first boundary after that): histograms of every float
      variable of ``trainer.models`` (not dropout's random-number state,
      ``histogram_variables``) and of each trainable one's gradient on a fixed probe batch
      (``trainer.gradients_by_path()``), and ``grad_norm/<path>`` per variable;
    - at the start: the resolved config and the variable table (path, shape,
      parameters, trainable or frozen) as text, and the HParams session
      (``log_dir`` itself is the session; at the end, its metrics are named).

    Args:
        log_dir: relative to the run directory unless absolute.
        histogram_every_n_steps: histogram interval in steps; 0 disables.
        histogram_min_interval_seconds: hold due histograms back this soon after the
            last ones. Histograms cost a few milliseconds; a fast loop passes 100 steps
            every few milliseconds, and would spend a tenth of its time on them.
            0 writes one every ``histogram_every_n_steps`` exactly.

    Writers stay open across repeated ``fit`` calls of a trainer (flushed at the
    end of each), so the compiled summary functions are traced once.

    **Resumed runs** continue their curves at the checkpoint's global step ``S``, each
    step once, although the interrupted process may have logged up to ``S + k``: when
    the writers open on directories that already hold event files, each of them first
    gets a restart marker (``write_restart_marker``), a small event file read after the
    old files and before this process's, which makes TensorBoard's readers (the Rust
    data server and the Python one) drop the interrupted run's points past the resume.
    The old files are left as they are.
    """

    chief_only = True

    #: Before the callbacks that write into its directories (``ImageCallback``), so
    #: its restart marker is read before their new event files.
    order = -10

    def __init__(self, *, log_dir: str = "tb", histogram_every_n_steps: int = 100,
                 histogram_min_interval_seconds: float = 10.0, hparams: dict | None = None,
                 config_text: str = ""):
        if histogram_every_n_steps < 0 or histogram_min_interval_seconds < 0:
            raise UserError(
                "callbacks.tensorboard.histogram_every_n_steps and "
                "histogram_min_interval_seconds must be >= 0 (0 steps turns histograms off); "
                f"got {histogram_every_n_steps} and {histogram_min_interval_seconds}")
        self.log_dir = log_dir
        #: The run's flat hyperparameters, for the HParams dashboard, and its resolved config
        #: as YAML, logged as text: the driver sets both from the config.
        self.hparams = dict(hparams or {})
        self.config_text = config_text
        self.histogram_every_n_steps = int(histogram_every_n_steps)
        self.histogram_min_interval_seconds = float(histogram_min_interval_seconds)
        self.writers = {}
        self._histogram_when = Periodic(every_n_steps=self.histogram_every_n_steps,
                                        min_seconds=self.histogram_min_interval_seconds,
                                        at_start=True)
        # Writers flush themselves every 10 events; an explicit flush (three file writes)
        # keeps TensorBoard current, and once every few seconds is current enough.
        self._flush_when = Periodic(every_seconds=5.0)
        self._opened_for = None

    def _writer(self, name):
        return self.writers[name]

    def on_fit_start(self, trainer):
        root = resolve(trainer, self.log_dir)
        models = list(trainer.models.values())
        global_step = trainer.current_step
        # A resumed run whose open epoch has all its steps done evaluates it again at this
        # step: the interrupted run's validation points at this step are replaced, not kept.
        progress = trainer.progress
        reevaluates = progress.open_epoch is not None and (
            global_step - progress.open_epoch * trainer.steps_per_epoch >= trainer.steps_per_epoch)
        if not self._opened_for_same(root, models):
            self._open(root, models, global_step, reevaluates=reevaluates,
                       extra=(trainer.averages.prefix,) if trainer.averages is not None else ())
            self._opened_for = (root, models)
        with self._writer("").as_default(step=global_step):
            if self.hparams:
                hp.hparams(self.hparams)
            if self.config_text:
                tf.summary.text("config", "```\n" + self.config_text + "\n```")
            tf.summary.text("variables", trainer.variable_table)
        self._histogram_when.reset(global_step)
        self._flush_when.reset(global_step)
        self._write_histograms(trainer, global_step, start=True)
        self._start_rates(trainer, global_step)

    def _start_rates(self, trainer, global_step: int) -> None:
        """The optimizers whose rate follows a schedule, with their iteration count now."""
        optimizers = trainer.optimizers
        self._rates = {}
        for name, opt in optimizers.items():
            schedule = opt.schedule
            if schedule is None:
                continue
            tag = "learning_rate" if len(optimizers) == 1 else f"learning_rate/{name}"
            writer = self._rate_writers.get((tag, id(schedule)))
            if writer is None:
                writer = self._rate_writers[tag, id(schedule)] = _schedule_writer(
                    self._writer("train"), tag, schedule)
            self._rates[tag] = [opt, int(opt.iterations.numpy()), writer]
        self._rate_step = global_step

    def _write_rates(self, global_step: int, logs: dict) -> dict:
        """Each scheduled rate at every step of the execution that just ended; returns
        ``logs`` without the rates so written. An optimizer that did not update once per
        step (a GAN critic's several, skipped updates) keeps the execution's value."""
        steps = global_step - self._rate_step
        written = set()
        for tag, entry in self._rates.items():
            opt, first, writer = entry
            now = int(opt.iterations.numpy())
            if steps > 0 and now - first == steps:
                writer(tf.constant(self._rate_step + 1, tf.int64),
                       tf.constant(first, tf.int64), tf.constant(steps, tf.int64))
                written.add(f"train/{tag}")
            entry[1] = now
        self._rate_step = global_step
        return {k: v for k, v in logs.items() if k not in written}

    def _opened_for_same(self, root, models) -> bool:
        """Whether the writers and compiled functions are those of this run dir and models."""
        if self._opened_for is None:
            return False
        opened_root, opened_models = self._opened_for
        return (opened_root == root and len(opened_models) == len(models)
                and all(a is b for a, b in zip(opened_models, models)))

    def _open(self, root, models, global_step: int, reevaluates: bool = False, extra=()):
        for w in self.writers.values():  # all of their points on disk before the scan below
            w.close()
        dirs = {name: root / name if name else root for name in ("", "train", "val", *extra)}
        existing = {name: event_files(d) for name, d in dirs.items()}
        for name, files in existing.items():
            if files:  # resumed, or restarted into a used directory
                # The histogram set (with its grad_norm/ scalars) is written anew at the
                # start; a carried copy at the same step would be a second point there.
                rewritten = ("grad_norm/",) if name == "train" and self.histogram_every_n_steps \
                    else ()
                # Epoch-end points (val/, and epoch/ in the root): an epoch evaluated again
                # at this step replaces them.
                keep_until = global_step - 1 if name != "train" and reevaluates else global_step
                # Before this process's own files exist, so it is read before them.
                write_restart_marker(dirs[name], keep_until, files, rewritten=rewritten)
        self.writers = {name: tf.summary.create_file_writer(str(d)) for name, d in dirs.items()}
        # Summaries are written by compiled functions: eagerly a histogram costs ~10 ms of
        # small ops and a scalar ~0.3 ms, which at 0.1 s per execution made TensorBoard half
        # the training time. They capture these writers and models. autograph=False: the
        # loops are over Python lists, and AutoGraph's conversion would double tracing.
        train = self.writers["train"]
        self._histograms = tf.function(
            lambda step, grads: _histograms(train, step, grads, models), autograph=False)
        self._scalar_plans = {}
        self._rate_writers = {}

    def on_execution_end(self, trainer, global_step, logs):
        self._scalars(self._write_rates(global_step, logs), global_step)
        self._write_histograms(trainer, global_step)

    def on_rollback(self, trainer, global_step, line):
        """The rollback's line as text ``recovery/rollback`` at the step that blew up; the
        scheduled rates go on from the step gone back to."""
        with self._writer("").as_default(step=global_step):
            tf.summary.text("recovery/rollback", line)
        self._writer("").flush()
        self._start_rates(trainer, trainer.current_step)

    def on_validation_end(self, trainer, global_step, logs):
        # val_ema/, val_swa/ (weight averages): runs of their own (tb/val_ema, tb/val_swa) on
        # the same charts as val/. Every validation, at its step: epoch ends and, with
        # trainer.val_every_n_steps, the steps between.
        self._scalars({k: v for k, v in logs.items() if k.startswith(VAL)}, global_step)

    def on_epoch_end(self, trainer, epoch, logs):
        if self.hparams:  # the HParams session's metrics, the epoch's values
            self._scalars({k: v for k, v in logs.items() if k.startswith(("train/", *VAL))},
                          logs["step"], epoch=True)
        if self._flush_when.due(logs["step"]):
            for w in self.writers.values():
                w.flush()

    def on_fit_end(self, trainer, logs):
        if self.hparams:
            # Name the metrics the HParams dashboard compares, instead of letting it offer
            # every scalar tag of the run: the last epoch's train and val values, from the
            # session's own run. It shows the first five as columns: validation first.
            metrics = [hp.Metric(f"{EPOCH}/{k}", display_name=k)
                       for k in sorted(logs, key=_metric_order)
                       if k.startswith(("train/", *VAL))]
            with self._writer("").as_default(step=trainer.current_step):
                hp.hparams_config(hparams=[hp.HParam(k) for k in sorted(self.hparams)],
                                  metrics=metrics)
        for w in self.writers.values():
            w.flush()

    def _scalars(self, logs, step, *, epoch: bool = False):
        """``logs`` at ``step``: ``train/x`` as ``x`` in ``train``, ``val/x`` in ``val``,
        other keys in ``train``; with ``epoch``, every key as ``epoch/<key>`` in the root."""
        keys = tuple(logs)
        plan = self._scalar_plans.get((keys, epoch))
        if plan is None:  # one compiled writer per group, traced once per set of keys
            groups = {}
            for key in keys:
                group, _, tag = key.partition("/")
                if epoch:
                    group, tag = "", f"{EPOCH}/{key}"
                elif group not in ("train", *(v[:-1] for v in VAL)):
                    group, tag = "train", key
                groups.setdefault(group, []).append((key, tag))
            plan = self._scalar_plans[keys, epoch] = [
                ([k for k, _ in items], _scalar_writer(self._writer(group), [t for _, t in items]))
                for group, items in groups.items()
            ]
        step = tf.constant(step, tf.int64)
        for group_keys, fn in plan:
            fn(step, tf.constant([logs[k] for k in group_keys], tf.float32))

    def _write_histograms(self, trainer, global_step, *, start: bool = False):
        if not self.histogram_every_n_steps:
            return  # off, also at the start
        if self._histogram_when.due(global_step, start=start):
            self._histograms(tf.constant(global_step, tf.int64), trainer.gradients_by_path())


def _metric_order(key: str) -> tuple:
    """HParams metrics: ``val/`` first, then ``train/`` loss and metrics, then the step's
    state (``grad_norm``, ``learning_rate``, counters), each alphabetically."""
    group, _, tag = key.partition("/")
    state = tag.startswith(("grad_norm", "learning_rate")) or "/" in tag
    return not group.startswith("val"), state, tag


def _scalar_writer(writer, tags):
    """A compiled ``(step, values) -> None`` writing ``values[i]`` as scalar ``tags[i]``."""

    def write(step, values):
        with writer.as_default():
            for i, tag in enumerate(tags):
                tf.summary.scalar(tag, values[i], step=step)

    return tf.function(write, autograph=False)


def _schedule_writer(writer, tag, schedule):
    """A compiled ``(first_step, first_iteration, count) -> None`` writing
    ``schedule(first_iteration + j)`` as scalar ``tag`` at step ``first_step + j``."""

    # tf.summary.write with the scalar plugin's metadata, not tf.summary.scalar: inside the
    # loop's name scope the latter would tag the points "while/<tag>".
    metadata = scalar_metadata.create_summary_metadata(display_name=None, description=None)
    serialized = metadata.SerializeToString()

    def write(first_step, first_iteration, count):
        with writer.as_default():
            for j in tf.range(count):
                rate = tf.cast(schedule(first_iteration + j), tf.float32)
                tf.summary.write(tag, rate, step=first_step + j, metadata=serialized)

    return tf.function(write)


def histogram_variables(model) -> list:
    """The variables of ``model`` that get a ``weights/`` histogram: its float ones.

    Left out: random-number state (the ``seed_generator_state`` of dropout and noise
    layers, an int64 counter that says nothing about the weights, and would be drawn
    as if it were one) and any other non-float variable (counters, lookup indices).
    """
    return [v for v in model.variables
            if v.name != "seed_generator_state" and tf.as_dtype(v.dtype).is_floating]


def _histograms(writer, step, grads, models):
    with writer.as_default():
        for model in models:
            for v in histogram_variables(model):
                _histogram(f"weights/{v.path}", v.value, step)
        for path, g in grads.items():
            _histogram(f"gradients/{path}", g, step)
            tf.summary.scalar(f"grad_norm/{path}", tf.norm(g), step=step)


def _histogram(tag, data, step, bucket_count: int = 30):
    """``tf.summary.histogram``'s summary, the same buckets, computed more cheaply.

    TensorBoard's version one-hot encodes every value (a [n, 30] float64 tensor:
    240 MB for a 1024x1024 kernel) and branches with ``tf.cond``, which takes ~0.2 s
    per tensor to trace; this counts with a segment sum and selects with
    ``tf.where``. Rows are ``[left_edge, right_edge, count]``; when all values are
    equal, both edges are that value and the last bucket holds the count.
    """
    data = tf.cast(tf.reshape(data, [-1]), tf.float64)
    if data.shape[0] == 0:
        buckets = tf.zeros((bucket_count, 3), tf.float64)
    else:
        low, high = tf.reduce_min(data), tf.reduce_max(data)
        single = tf.equal(high, low)
        width = tf.where(single, tf.constant(1.0, tf.float64), (high - low) / bucket_count)
        index = tf.clip_by_value(tf.cast(tf.floor((data - low) / width), tf.int32), 0,
                                 bucket_count - 1)
        counts = tf.math.unsorted_segment_sum(tf.ones_like(data), index, bucket_count)
        size = tf.cast(tf.size(data), tf.float64)
        counts = tf.where(single, tf.one_hot(bucket_count - 1, bucket_count, dtype=tf.float64)
                          * size, counts)
        # tf.linspace's edges, built from a range: tf.linspace takes ~40 ms to trace.
        steps = tf.range(bucket_count, dtype=tf.float64) * ((high - low) / bucket_count)
        edges = tf.concat([low + steps, [high]], 0)
        left = tf.where(single, high, edges[:-1])
        right = tf.where(single, high, edges[1:])
        buckets = tf.stack([left, right, counts], axis=1)
    meta = histogram_metadata.create_summary_metadata(display_name=tag, description=None)
    tf.summary.write(tag, buckets, step=step, metadata=meta)


# --- resuming into a directory that holds event files ---------------------------------------

#: TensorBoard's readers (Python and Rust) take a file for an event file when its name holds this.
_EVENT_FILE = "tfevents"
_NAME_SECONDS = re.compile(r"tfevents\.(\d+)\.")


def event_files(directory: Path) -> list[Path]:
    """The event files directly in ``directory``, in the order TensorBoard reads them.

    Both readers go through a directory's files sorted by name (Python's
    ``DirectoryWatcher`` one after the other, the Rust data server's ``RunLoader``
    in a ``BTreeMap``); writers name their files ``events.out.tfevents.<seconds>.
    <host>...``, so the order is that of creation, to the second.
    """
    try:
        return sorted(p for p in Path(directory).iterdir()
                      if _EVENT_FILE in p.name and p.is_file())
    except FileNotFoundError:
        return []


def _wait_past(files: list[Path]) -> None:
    """Sleep until the clock's second is past the newest of ``files``' name seconds.

    Files created afterwards then sort after ``files`` whatever their host, process id
    and counter (the counter is not zero-padded: ``.10.`` sorts before ``.9.``). A
    resumed process starts seconds after the interrupted one; only a run reopened in
    the same process within the second waits, at most a second.
    """
    newest = max((int(m.group(1)) for f in files if (m := _NAME_SECONDS.search(f.name))),
                 default=-1)
    delay = newest + 1 - time.time()
    if delay > 2:  # dated ahead of this clock (another machine's): waiting would not end soon
        log.warning("event files dated %.0f s in the future in %s: TensorBoard may read this "
                    "run's restart marker before them", delay, files[0].parent)
    elif delay > 0:
        time.sleep(delay)


def _is_scalar(value, kinds) -> bool:
    if value.HasField("simple_value"):  # TF1 and tensorboardX scalars
        return True
    meta = kinds.get(value.tag)
    return meta is not None and meta.plugin_data.plugin_name == "scalars"


def carried_scalars(files, step: int, *, rewritten=()) -> tuple[int, list]:
    """Where a resumed run's points take over from the event files already there.

    Reads ``files`` as TensorBoard does (in order, honouring the SessionLog STARTs of
    earlier restarts) and returns ``(purge_step, events)``: the last step ``<= step``
    at which they hold a scalar (``step`` when none does), and one event per scalar
    tag with a point at that step (the last one read), except tags starting with a
    prefix in ``rewritten``. The events are copies (step, wall time, value) with the
    tag's summary metadata attached, so they stand on their own.
    """
    kinds = {}  # tag -> the SummaryMetadata it was written with (its first event has it)
    last = {}  # tag -> (step, wall_time, Summary.Value): its last point at or before `step`
    for path in files:
        for event in LegacyEventFileLoader(str(path)).Load():
            if event.session_log.status == event_pb2.SessionLog.START:
                last = {tag: p for tag, p in last.items() if p[0] < event.step}
            for value in event.summary.value:
                if value.HasField("metadata") and value.metadata.plugin_data.plugin_name:
                    kinds.setdefault(value.tag, value.metadata)
                if event.step <= step and _is_scalar(value, kinds):
                    last[value.tag] = (event.step, event.wall_time, value)
    if not last:
        return step, []
    purge_step = max(p[0] for p in last.values())
    events = []
    for tag, (at, wall_time, value) in sorted(last.items()):
        if at != purge_step or tag.startswith(tuple(rewritten)):
            continue
        copy = summary_pb2.Summary.Value()
        copy.CopyFrom(value)
        if tag in kinds:
            copy.metadata.CopyFrom(kinds[tag])
        events.append(event_pb2.Event(wall_time=wall_time, step=at,
                                      summary=summary_pb2.Summary(value=[copy])))
    return purge_step, events


def write_restart_marker(directory: Path, step: int, files=None, *, rewritten=()) -> Path:
    """Make TensorBoard continue ``directory``'s curves from global step ``step``.

    Writes an event file that sorts after ``files`` (the directory's event files,
    read now when not given) and before any file created later in the same second:
    a file version, two ``SessionLog`` START events at ``purge_step`` and the
    scalar points ``carried_scalars`` finds at ``purge_step``.

    - TensorBoard's Python reader (``plugin_event_accumulator``, the server's with
      ``--load_fast=false``) purges, on a START, every point read before it at a
      step ``>= purge_step``. It takes a run's first START for a first session, not
      a restart, and TensorFlow 2's writers write none, hence two. The copies that
      follow put back the points at ``purge_step`` itself. (The legacy
      ``event_accumulator`` purges only its TF1 reservoirs, not TF2's tensors.)
    - The Rust data server (the default when installed) ignores START, but each time
      series drops its points at steps ``>=`` a newly read point's: the copies drop
      the interrupted run's later scalars, whatever steps its executions ended at;
      the resumed run's own histograms and images, drawn at its start, drop theirs.

    The file is written under a name TensorBoard ignores and renamed into place, so
    a running TensorBoard never reads half of it. Returns its path.
    """
    directory = Path(directory)
    files = event_files(directory) if files is None else list(files)
    purge_step, carried = carried_scalars(files, step, rewritten=rewritten)
    _wait_past(files)
    now = time.time()
    start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
    events = [event_pb2.Event(wall_time=now, file_version="brain.Event:2"),
              *[event_pb2.Event(wall_time=now, step=purge_step, session_log=start)] * 2,
              *carried]
    # '-' sorts before any host name, so this file precedes the files this process's
    # writers create in the same second (and follows every older one).
    host, pid = socket.gethostname(), os.getpid()
    path = directory / f"events.out.tfevents.{int(now):010d}.-restart.{host}.{pid}"
    partial = directory / f".restart.{pid}.partial"
    with tf.io.TFRecordWriter(str(partial)) as writer:
        for event in events:
            writer.write(event.SerializeToString())
    os.replace(partial, path)
    return path
