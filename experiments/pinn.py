"""A physics-informed MLP for 1-D Poisson: u'' = f on [-1, 1] with Dirichlet boundary values.

``python -m trainer +experiment=pinn``. The PDE residual needs the network's
second derivative in its input, taken with two nested tapes inside the training
tape (the seed notebook's ``d2y/dx2``), so the update is a third-order derivative.
The step only overrides ``compute_loss``; the default ``TapeStep.train_step``, the
regularizers and the compiled loop are used unchanged.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from trainer.common.errors import UserError
from trainer.data.base import DataModule
from trainer.data.options import Batching
from trainer.experiments.plot import COLORS, Canvas, ImageCallback
from trainer.step.tape_step import TapeStep


class Poisson1D:
    """``u''(x) = f(x)`` on ``[-1, 1]``, ``u(-1)`` and ``u(1)`` given by the exact solution.

    Exact solution ``u(x) = sin(k pi x) + slope x + offset``, so
    ``f(x) = -(k pi)^2 sin(k pi x)``; ``k = frequency`` sets how hard the problem is.
    """

    domain = (-1.0, 1.0)

    def __init__(self, *, frequency: float = 2.0, slope: float = 0.5, offset: float = 0.0):
        self.frequency, self.slope, self.offset = float(frequency), float(slope), float(offset)

    def exact(self, x):
        """The solution ``u(x)`` (tensors or numpy arrays)."""
        sin = tf.sin if tf.is_tensor(x) else np.sin
        return sin(self.frequency * math.pi * x) + self.slope * x + self.offset

    def source(self, x):
        """The right-hand side ``f(x) = u''(x)``."""
        sin = tf.sin if tf.is_tensor(x) else np.sin
        k = self.frequency * math.pi
        return -(k**2) * sin(k * x)

    def boundary(self):
        """``(x, u(x))`` at both ends of the domain, as ``[2, 1]`` float32 arrays."""
        xb = np.array([[self.domain[0]], [self.domain[1]]], np.float32)
        return xb, self.exact(xb).astype(np.float32)

    def __repr__(self):
        return (f"Poisson1D(frequency={self.frequency}, slope={self.slope}, "
                f"offset={self.offset})")


def poisson_data(
    *,
    problem: Poisson1D,
    n_collocation: int = 8192,
    n_val: int = 1001,
    data_seed: int = 0,
    batch_size: int = 128,
    seed: int = 0,
    shuffle: bool = True,
) -> DataModule:
    """Collocation points for a 1-D problem: uniform random points for training, a grid
    (ends included) for validation. The targets are the exact solution ``u(x)``; the
    PINN's loss never reads them, they only measure its error.
    """
    if n_collocation < 2 or n_val < 2:
        raise UserError("data.n_collocation and data.n_val must be at least 2")
    lo, hi = problem.domain
    rng = np.random.default_rng(data_seed)
    x = rng.uniform(lo, hi, size=(n_collocation, 1)).astype(np.float32)
    x_val = np.linspace(lo, hi, n_val, dtype=np.float32)[:, None]
    return DataModule(
        train=(x, problem.exact(x)), val=(x_val, problem.exact(x_val)), task="regression",
        batching=Batching(batch_size=batch_size, seed=seed, shuffle=shuffle),
        name=f"collocation points of {problem!r}",
    )


def relative_l2(y_true, y_pred):
    """``||u - u_exact|| / ||u_exact||`` over the batch."""
    y_true = tf.cast(y_true, y_pred.dtype)
    return tf.norm(y_pred - y_true) / tf.norm(y_true)


class PinnStep(TapeStep):
    """Physics-informed loss: ``mean (u''(x) - f(x))^2 + bc_weight * mean (u(x_b) - g)^2``.

    ``u''`` comes from two nested tapes that watch the collocation points ``x``
    (the inner one gives ``u'``, the outer one ``u''``), recorded inside the
    training tape, which then differentiates the residual with respect to the
    weights. The batch targets (the exact solution) are only used for metrics:
    ``mae`` and ``l2_error`` (relative L2 error of the batch).

    Args:
        model: an MLP ``x -> u`` with a smooth activation (tanh); ReLU has no
            second derivative.
        problem: the boundary-value problem (``Poisson1D``).
        bc_weight: weight of the boundary term.
        pde_scale: the residual is divided by it, to bring ``f``'s scale near one.
        optimizer, task, regularizers, unconnected_gradients, reset: as for ``TapeStep``.
    """

    def __init__(self, *, model, optimizer, problem=None, bc_weight: float = 1.0,
                 pde_scale: float = 1.0, task: str = "regression", regularizers=(),
                 unconnected_gradients: str = "none", reset=None):
        if problem is None:
            raise UserError("the PINN step needs a problem: use data=poisson (step.problem "
                            "defaults to data.problem) or set step.problem")
        super().__init__(model=model, optimizer=optimizer, task=task, regularizers=regularizers,
                         unconnected_gradients=unconnected_gradients, reset=reset)
        self.problem = problem
        self.bc_weight = float(bc_weight)
        self.pde_scale = float(pde_scale)
        self.metric_fns = {**self.metric_fns, "l2_error": relative_l2}

    def derivatives(self, x, training: bool):
        """``(u, u', u'')`` at ``x`` from nested tapes (differentiable by an outer tape)."""
        x = tf.convert_to_tensor(x)
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(x)
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                inner.watch(x)
                u = self.model(x, training=training)
                total = tf.reduce_sum(u)  # each u_i depends on x_i only: d sum / dx_i = u'(x_i)
            du = inner.gradient(total, x)
            total_du = tf.reduce_sum(du)
        d2u = outer.gradient(total_du, x)
        return u, du, d2u

    def compute_loss(self, x, y, training: bool):
        u, _, d2u = self.derivatives(x, training)
        residual = (d2u - self.problem.source(x)) / self.pde_scale
        xb, ub = self.problem.boundary()
        boundary = self.model(tf.constant(xb), training=training) - ub
        loss = tf.reduce_mean(tf.square(residual)) + self.bc_weight * tf.reduce_mean(
            tf.square(boundary))
        return loss, u

    def final_metrics(self, data) -> dict:
        """Relative L2 and max error against the exact solution on the validation grid."""
        u = self.model(tf.constant(data.x_val), training=False).numpy()
        exact = data.y_val
        return {
            "pinn/relative_l2_error": float(np.linalg.norm(u - exact) / np.linalg.norm(exact)),
            "pinn/max_abs_error": float(np.abs(u - exact).max()),
        }


class SolutionImage(ImageCallback):
    """The network's solution (red) against the exact one (blue) on the validation grid.

    The grid and the exact solution are ``trainer.validation_batches()`` (inputs and
    targets); the solution is ``trainer.models["model"]`` on the grid.

    Args:
        every_n_steps: drawing interval in steps.
        size: image width in pixels (height is half of it).
    """

    tag = "pinn/solution"
    description = "PINN solution (red) against the exact solution (blue)"

    def __init__(self, *, every_n_steps: int = 1000, size: int = 384):
        super().__init__(every_n_steps=every_n_steps)
        self.size = int(size)

    def draw(self, trainer) -> np.ndarray:
        batches = trainer.validation_batches()
        x_val = np.concatenate([np.asarray(x) for x, _ in batches])
        y_val = np.concatenate([np.asarray(y) for _, y in batches])
        u = trainer.models["model"](tf.constant(x_val), training=False).numpy()[:, 0]
        order = np.argsort(x_val[:, 0])  # a polyline needs increasing x, whatever the order
        x, exact, u = x_val[order, 0], y_val[order, 0], u[order]
        lo, hi = float(exact.min()), float(exact.max())
        pad = 0.15 * (hi - lo)
        canvas = Canvas((x.min(), x.max()), (lo - pad, hi + pad), height=self.size // 2,
                        width=self.size)
        canvas.axes().line(x, exact, COLORS["exact"], width=3)
        canvas.line(x, np.clip(u, lo - pad, hi + pad), COLORS["model"], width=1)
        return canvas.image
