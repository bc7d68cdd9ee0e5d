"""Streaming from TFRecord shards against the in-memory path, on the B workload.

``streaming_rows()`` times, round robin in one process (``benchmarks.common.measure``),
the trainer on the B model (MLP 784-1024-1024-10, batch 256) fed from the arrays in
memory (``TensorSource``), from the same arrays through tf.data (``IteratorSource``),
and from TFRecord shards of the same arrays on local disk (``data=tfrecord``). It
returns rows in the format of ``bench.py``'s groups; ``streaming_ratio`` reads off
shards / in memory. ``python -m benchmarks.streaming [--quick]`` prints both.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks.common import measure, workloads
from benchmarks.variants import TrainerVariant, _TrainerClock


class ShardVariant(TrainerVariant):
    """``TrainerVariant`` whose data is the workload's arrays written as TFRecord shards
    into ``directory`` and streamed back (``trainer.data.tfrecord``)."""

    def __init__(self, name, workload, spe, *, directory: Path, shards: int = 8,
                 shuffle_buffer: int = 10_000, xla=False):
        super().__init__(name, workload, spe, source="tfrecord", xla=xla)
        self.directory, self.shards, self.shuffle_buffer = Path(directory), shards, shuffle_buffer
        self.meta.update(shards=shards, shuffle_buffer=shuffle_buffer)

    def setup(self):
        import keras

        from trainer import TapeStep, Trainer
        from trainer.data import Batching, tfrecord
        from trainer.driver.shards import write_shards

        w = self.workload
        x, y = w.arrays()
        self.directory.mkdir(parents=True, exist_ok=True)
        # One batch of validation, as TrainerVariant's: the epoch's evaluation stays small.
        write_shards(self.directory, x_train=x, y_train=y, x_val=x[: w.batch_size],
                     y_val=y[: w.batch_size], task=w.task, num_outputs=w.n_out,
                     shards=self.shards, name=w.name)
        self.data = tfrecord(path=str(self.directory / "*.tfrecord"),
                             batching=Batching(batch_size=w.batch_size),
                             shuffle_buffer=self.shuffle_buffer)
        self.step = TapeStep(model=w.model(), optimizer=keras.optimizers.Adam(1e-3),
                             task=w.task)
        self.clock = _TrainerClock()
        kwargs = {} if self.xla is None else {"jit_compile": self.xla}
        self.trainer = Trainer(epochs=10**9, steps_per_execution=self.spe, callbacks=[self.clock],
                               run_dir=str(self.directory.parent), **kwargs)
        self.run(1)
        self.meta["xla"] = self.trainer.xla


def streaming_rows(*, quick: bool = False, spe: int = 32, windows: int = 3,
                   window_seconds: float = 0.7, shards: int = 8, shuffle_buffer: int = 10_000,
                   directory: str | os.PathLike | None = None, log=None) -> dict:
    """Steps/s of the B workload from memory, through tf.data, and from TFRecord shards.

    ``quick`` uses bench's quick B (hidden 256-256). The shards go to ``directory`` (a
    new temporary directory by default) on local disk. None of the variants uses XLA,
    so the rows differ only in where the batches come from. Returns
    ``{variant name: row}`` as ``benchmarks.common.measure`` makes them (``median``,
    ``min``, ``max``, ``spread``, ``rates``, ``kind``, ``source``, ...).
    """
    w = workloads(quick)["B"]
    directory = Path(directory or tempfile.mkdtemp(prefix="bench-shards-")) / "shards"
    name = f"B/spe{spe}"
    variants = [
        TrainerVariant(f"{name}/trainer-memory", w, spe, source="memory", xla=False),
        TrainerVariant(f"{name}/trainer-iterator", w, spe, source="iterator", xla=False),
        ShardVariant(f"{name}/trainer-tfrecord", w, spe, directory=directory, shards=shards,
                     shuffle_buffer=shuffle_buffer),
    ]
    return measure(variants, windows=windows, window_seconds=window_seconds,
                   log=log or (lambda msg: print(msg, file=sys.stderr, flush=True)))


def streaming_ratio(rows: dict) -> float:
    """Median steps/s from shards over median steps/s from memory."""
    by_source = {r["source"]: r["median"] for r in rows.values()}
    return by_source["tfrecord"] / by_source["memory"]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.streaming", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="bench's quick B, short windows")
    args = parser.parse_args(argv)
    rows = streaming_rows(quick=args.quick, windows=2 if args.quick else 5,
                          window_seconds=0.2 if args.quick else 0.7)
    for variant, r in rows.items():
        print(f"{variant:<36} {r['median']:>8.1f} steps/s  spread {100 * r['spread']:.0f}%")
    print(f"shards / memory: {streaming_ratio(rows):.2f}")
    return rows


if __name__ == "__main__":
    main()
