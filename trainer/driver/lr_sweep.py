"""The learning-rate finder of a configured run (``python -m trainer.lr_find``): its curve
as JSON and CSV, its plot, and the suggested ``optimizer.learning_rate``.

The config is the training run's (``configs/lr_find.yaml`` composes ``config.yaml`` and
adds the ``lr_find`` node); the run is built as ``python -m trainer`` builds it, without
its callbacks and without its schedule (the finder sets the rate of every update itself;
its suggestion is then the schedule's peak, ``optimizer.learning_rate``), and
``trainer.training.lr_finder.find_learning_rate`` runs the sweep on its step.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from trainer.common.atomic import atomic_write
from trainer.common.errors import UserError

log = logging.getLogger(__name__)

#: The files the command writes into its run directory.
JSON, CSV, PNG = "lr_find.json", "lr_find.csv", "lr_find.png"
PLOT_MISSING = ("the plot needs matplotlib: pip install 'tape-trainer[plot]' (or pass "
                "lr_find.plot=false for the curve and the suggestion without it)")


def _run_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` without the finder's node, its callbacks and its schedule: the run whose
    step the finder sweeps."""
    run_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "lr_find"])
    with open_dict(run_cfg):
        run_cfg.callbacks = {}
        run_cfg.schedule = None
    return run_cfg


def _check_plot(plot: bool) -> None:
    if not plot:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(PLOT_MISSING) from None


def lr_find(cfg: DictConfig, run_dir: str | Path | None = None) -> dict:
    """Build the run of ``cfg``, sweep its learning rate, write ``lr_find.json``,
    ``lr_find.csv`` and (``lr_find.plot``) ``lr_find.png`` into ``run_dir`` (default:
    Hydra's output directory); return the JSON's content."""
    from trainer.driver.run import _run_dir, build
    from trainer.driver.rundir import accept
    from trainer.driver.validation import _check_known_keys, validate
    from trainer.training.lr_finder import Sweep, find_learning_rate

    node = cfg.lr_find
    _check_known_keys(node, "lr_find.", root=cfg)  # +lr_find.min_lrr=1 would be ignored
    sweep = Sweep(min_lr=float(node.min_lr), max_lr=float(node.max_lr),
                  num_steps=int(node.num_steps), smoothing=float(node.smoothing),
                  diverge_factor=float(node.diverge_factor))
    _check_plot(node.plot)
    run_cfg = _run_config(cfg)
    validate(run_cfg)
    if cfg.get("schedule"):
        log.info("lr_find: the schedule is left out; the suggestion is its peak, "
                 "optimizer.learning_rate")
    run_dir = _run_dir(run_dir)
    r = build(run_cfg, run_dir)
    accept(run_dir, cfg)
    # The run's compile settings, from its config, passed on to the sweep's trainer.
    compiling = {k: r.cfg["trainer"][k] for k in ("run_eagerly", "jit_compile",
                                                   "accumulate_steps")}
    curve = find_learning_rate(r.step, r.data, sweep=sweep, monitor=node.monitor,
                               distribution=r.trainer.distribution, **compiling)
    if not math.isfinite(curve.suggestion):
        raise UserError(f"lr_find: the loss diverged after {len(curve.rates)} updates, too soon "
                        f"to suggest a rate; lower lr_find.min_lr (now {sweep.min_lr:g})")
    result = {"suggestion": curve.suggestion, "override": override(curve.suggestion),
              "diverged": curve.diverged, "monitor": node.monitor,
              "sweep": OmegaConf.to_container(node, resolve=True), "curve": curve.rows()}
    if r.trainer.is_chief:
        write_outputs(run_dir, result, plot=node.plot)
    return result


def override(rate: float) -> str:
    """The command-line override that trains at ``rate`` (two significant digits)."""
    return f"optimizer.learning_rate={float(f'{rate:.2g}'):g}"


def write_outputs(run_dir: Path, result: dict, *, plot: bool = True) -> None:
    """``lr_find.json`` (everything), ``lr_find.csv`` (the curve) and ``lr_find.png``."""
    run_dir = Path(run_dir)
    text = json.dumps(result, indent=2) + "\n"
    atomic_write(run_dir / JSON, lambda p: Path(p).write_text(text))

    def write_csv(path):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(result["curve"][0]))
            writer.writeheader()
            writer.writerows(result["curve"])

    atomic_write(run_dir / CSV, write_csv)
    if plot:
        atomic_write(run_dir / PNG, lambda p: draw(result, p))


def draw(result: dict, path) -> None:
    """Loss and smoothed loss against the learning rate (log x), the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    rows, rate = result["curve"], result["suggestion"]
    rates = [r["learning_rate"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    try:
        ax.plot(rates, [r["loss"] for r in rows], color="0.75", lw=1, label=result["monitor"])
        ax.plot(rates, [r["smoothed_loss"] for r in rows], color="C0", lw=2,
                label=f"smoothed {result['monitor']}")
        ax.axvline(rate, color="C3", ls="--", lw=1.5, label=f"suggestion {rate:.2g}")
        ax.set_xscale("log")
        finite = [r["smoothed_loss"] for r in rows if math.isfinite(r["smoothed_loss"])]
        if finite:  # the diverged tail would flatten the curve: show it to twice the drop
            raw = [r["loss"] for r in rows[: len(finite)] if math.isfinite(r["loss"])]
            low, first = min(finite + raw), finite[0]
            top = min(max(finite), first + max(first - low, 1e-12))
            ax.set_ylim(low - 0.05 * (top - low), top + 0.05 * (top - low))
        ax.set_xlabel("learning rate")
        ax.set_ylabel(result["monitor"])
        ax.set_title(result["override"])
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
