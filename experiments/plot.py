"""Tiny numpy rasterizer for TensorBoard images (scatter plots, curves) without matplotlib.

matplotlib is not a dependency of the framework; the experiment images are simple
enough (points, polylines, axes) to draw straight into an RGB array.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from trainer.callbacks import Callback, TensorBoardCallback
from trainer.callbacks.base import resolve

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
    """Draws an image of the run into TensorBoard every ``every_n_steps`` steps and at the end.

    Images go to ``<log_dir>/train`` of the run's ``TensorBoardCallback`` (beside
    the scalars, in their own event file); without a TensorBoard callback
    (``callbacks=none``) nothing is drawn. Subclasses implement ``draw(trainer)``.

    Args:
        every_n_steps: interval in steps (at the first execution boundary past each
            multiple); 0 draws only at the start and at the end.
    """

    tag = "image"
    description = ""

    def __init__(self, *, every_n_steps: int = 500):
        self.every_n_steps = int(every_n_steps)
        self._writer = None
        self._bucket = None
        self._last_step = None

    def draw(self, trainer) -> np.ndarray:
        """An RGB ``uint8`` image of shape ``[height, width, 3]``."""
        raise NotImplementedError

    def _write(self, trainer, step: int) -> None:
        import tensorflow as tf

        if self._writer is None or step == self._last_step:
            return
        self._last_step = step
        with self._writer.as_default(step=step):
            tf.summary.image(self.tag, self.draw(trainer)[None], description=self.description)
        self._writer.flush()

    def on_fit_start(self, trainer):
        import tensorflow as tf

        log_dir = tensorboard_dir(trainer)
        if log_dir is not None:
            self._writer = tf.summary.create_file_writer(str(log_dir))
        step = trainer.current_step
        self._bucket = step // self.every_n_steps if self.every_n_steps else None
        self._write(trainer, step)

    def on_execution_end(self, trainer, step, logs):
        if self.every_n_steps and step // self.every_n_steps != self._bucket:
            self._bucket = step // self.every_n_steps
            self._write(trainer, step)

    def on_fit_end(self, trainer, logs):
        self._write(trainer, trainer.current_step)
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def tensorboard_dir(trainer) -> Path | None:
    """``<log_dir>/train`` of the run's TensorBoard callback, or None if it has none."""
    for cb in trainer.callbacks:
        if isinstance(cb, TensorBoardCallback):
            return resolve(trainer, cb.log_dir) / "train"
    return None
