"""TensorBoard images without matplotlib: a tiny numpy rasterizer and the image callback.

matplotlib is not a dependency of the framework; the experiment images are simple
enough (points, polylines, axes) to draw straight into an RGB array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.callbacks import Callback, TensorBoardCallback
from trainer.callbacks.base import resolve
from trainer.common.errors import UserError
from trainer.training.periodic import Periodic

COLORS = {
    "real": (31, 119, 180),
    "fake": (255, 127, 14),
    "exact": (31, 119, 180),
    "model": (214, 39, 40),
    "axis": (190, 190, 190),
    "mode": (44, 160, 44),
}


class Canvas:
    """A white ``height x width`` RGB image showing ``xlim x ylim`` of the data plane."""

    def __init__(self, xlim, ylim, *, height: int = 256, width: int = 256, margin: int = 8):
        self.image = np.full((height, width, 3), 255, np.uint8)
        self.xlim, self.ylim, self.margin = tuple(map(float, xlim)), tuple(map(float, ylim)), margin

    def _pixels(self, xs, ys):
        h, w, _ = self.image.shape
        m = self.margin
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        cols = m + (np.asarray(xs, float) - x0) / (x1 - x0) * (w - 1 - 2 * m)
        rows = h - 1 - m - (np.asarray(ys, float) - y0) / (y1 - y0) * (h - 1 - 2 * m)
        return np.rint(rows).astype(int), np.rint(cols).astype(int)

    def _paint(self, rows, cols, color, radius: int):
        h, w, _ = self.image.shape
        for dr in range(-radius, radius + 1):
            for dc in range(-radius, radius + 1):
                r, c = rows + dr, cols + dc
                ok = (r >= 0) & (r < h) & (c >= 0) & (c < w)
                self.image[r[ok], c[ok]] = color

    def points(self, xs, ys, color, radius: int = 1) -> Canvas:
        """Square markers of side ``2 radius + 1`` pixels."""
        self._paint(*self._pixels(xs, ys), np.asarray(color, np.uint8), radius)
        return self

    def line(self, xs, ys, color, width: int = 1) -> Canvas:
        """A polyline through the points, sampled densely enough to leave no gaps."""
        rows, cols = self._pixels(xs, ys)
        steps = np.maximum(np.abs(np.diff(rows)), np.abs(np.diff(cols))).clip(min=1)
        seg_r, seg_c = [rows[:1]], [cols[:1]]
        for i, n in enumerate(steps):
            t = np.arange(1, n + 1) / n
            seg_r.append(np.rint(rows[i] + t * (rows[i + 1] - rows[i])).astype(int))
            seg_c.append(np.rint(cols[i] + t * (cols[i + 1] - cols[i])).astype(int))
        self._paint(np.concatenate(seg_r), np.concatenate(seg_c), np.asarray(color, np.uint8),
                    width // 2)
        return self

    def axes(self) -> Canvas:
        """The lines x = 0 and y = 0 where they are in view, in light grey."""
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        if y0 <= 0 <= y1:
            self.line([x0, x1], [0, 0], COLORS["axis"])
        if x0 <= 0 <= x1:
            self.line([0, 0], [y0, y1], COLORS["axis"])
        return self


class ImageCallback(Callback):
    """Draws an image of the run into TensorBoard at the start, every ``every_n_steps``
    steps and at the end of ``fit``.

    Images go to ``<log_dir>/train`` of the run's ``TensorBoardCallback`` (beside
    the scalars, in their own event file); without a TensorBoard callback
    (``callbacks=none``) nothing is drawn. Subclasses implement ``draw(trainer)``
    with the trainer's public API (``trainer.models``,
    ``trainer.validation_batches()``).

    Args:
        every_n_steps: interval in steps (at the first execution boundary at or past
            each multiple); 0 draws only at the start and at the end.
    """

    chief_only = True

    tag = "image"
    description = ""

    def __init__(self, *, every_n_steps: int = 500):
        if every_n_steps < 0:
            raise UserError(f"{type(self).__name__}: every_n_steps={every_n_steps} must be "
                            ">= 0 (0 draws only at the start and at the end)")
        self.every_n_steps = int(every_n_steps)
        self._when = Periodic(every_n_steps=self.every_n_steps, at_start=True, at_end=True)
        self._writer = None

    def draw(self, trainer) -> np.ndarray:
        """An RGB ``uint8`` image of shape ``[height, width, 3]``."""
        raise NotImplementedError

    def _maybe_write(self, trainer, global_step: int, *, start: bool = False,
                     end: bool = False) -> None:
        if self._writer is None or not self._when.due(global_step, start=start, end=end):
            return
        import tensorflow as tf

        with self._writer.as_default(step=global_step):
            tf.summary.image(self.tag, self.draw(trainer)[None], description=self.description)
        self._writer.flush()

    def on_fit_start(self, trainer):
        import tensorflow as tf

        log_dir = tensorboard_dir(trainer)
        if log_dir is not None:
            self._writer = tf.summary.create_file_writer(str(log_dir))
        global_step = trainer.current_step
        self._when.reset(global_step)
        self._maybe_write(trainer, global_step, start=True)

    def on_execution_end(self, trainer, global_step, logs):
        self._maybe_write(trainer, global_step)

    def on_fit_end(self, trainer, logs):
        self._maybe_write(trainer, trainer.current_step, end=True)
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def tensorboard_dir(trainer) -> Path | None:
    """``<log_dir>/train`` of the run's TensorBoard callback, or None if it has none."""
    for cb in trainer.callbacks:
        if isinstance(cb, TensorBoardCallback):
            return resolve(trainer, cb.log_dir) / "train"
    return None
