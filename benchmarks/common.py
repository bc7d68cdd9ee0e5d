"""What every group builds on: the workloads, the round robin timing of variants
(``measure``), the paired ratio of two of its rows (``ratio``), and the machine's facts.

The bottom of benchmarks/. Each module imports only the ones after its arrow (at the
top or inside functions), and ``tests/test_bench.py`` fails on any import circle:

    bench         the entry point: groups A-D, E, F -> report, scale, endurance, progress, common,
                                                       variants
    report        targets, table and RESULTS.md     -> scale_report, common
    scale         group F's variants and timing     -> scale_report, streaming, common, variants
    scale_report  group F's case and section        -> common
    streaming     TFRecord shards against memory    -> common, variants
    endurance     group E, in a child process       -> (none)
    progress      the progress line's cost per call -> (none)
    common        this module                       -> variants (in ``workloads``)
    variants      the contestants                   -> (none)
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def workloads(quick: bool) -> dict:
    from benchmarks.variants import Workload

    a = Workload("A", "regression", 32, [64, 64], 1, batch_size=64,
                 n_train=16384 if quick else 65536)
    b = Workload("B", "classification", 784, [256, 256] if quick else [1024, 1024], 10,
                 batch_size=256, n_train=8192)
    return {
        "A": a, "B": b,
        "A+gp": replace(a, name="A+gp", gp_every=1), "A+gp/16": replace(a, name="A+gp/16",
                                                                        gp_every=16),
        "B+gp": replace(b, name="B+gp", gp_every=1), "B+gp/16": replace(b, name="B+gp/16",
                                                                        gp_every=16),
        "B+sam": replace(b, name="B+sam", sam_rho=0.05),
        "D": replace(a, name="D"), "D-eager": replace(a, name="D-eager", n_train=4096),
    }


def measure(variants, *, windows: int, window_seconds: float, log) -> dict:
    """Set up every variant, then time ``windows`` rounds of all of them, round robin."""
    results = {}
    for v in variants:
        t0 = time.perf_counter()
        v.setup()
        steps, seconds = v.run(1)
        v.epochs = max(1, round(window_seconds / max(seconds, 1e-6)))
        log(f"  set up {v.name} in {time.perf_counter() - t0:.1f}s "
            f"({steps / seconds:,.0f} steps/s, {v.epochs} epoch(s) per window)")
        results[v.name] = {**v.meta, "rates": []}
    for w in range(windows):
        for v in variants:
            steps, seconds = v.run(v.epochs)
            results[v.name]["rates"].append(steps / seconds)
        log(f"  window {w + 1}/{windows} done")
    for r in results.values():
        rates = r["rates"]
        med = statistics.median(rates)
        r.update(median=med, min=min(rates), max=max(rates),
                 spread=(max(rates) - min(rates)) / med if med else 0.0)
    peak = next((v for v in variants if v.kind == "peak"), None)
    if peak is not None:
        r = results[peak.name]
        r["gflops"] = {k: r[k] * peak.flops / 1e9 for k in ("median", "min", "max")}
    for v in variants:
        if v.workload is not None and v.kind != "peak":
            results[v.name]["flops_per_step"] = v.workload.flops_per_step()
            results[v.name]["workload"] = v.workload.name
    return results


def ratio(a: dict, b: dict) -> float:
    """``a``'s speed over ``b``'s: the median of their ratios window by window.

    Both ran in every round robin window, one right after the other, so a change in
    the machine's load hits the pair alike; the median of the paired ratios is steadier
    than the ratio of two medians taken over different windows.
    """
    pairs = [x / y for x, y in zip(a["rates"], b["rates"]) if y]
    return statistics.median(pairs) if pairs else a["median"] / b["median"]


def cpuinfo(field: str) -> str | None:
    """The value of the first line of /proc/cpuinfo that starts with ``field`` (``model
    name``, ``flags``), or None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> set:
    return set((cpuinfo("flags") or "").split())


def machine() -> dict:
    import keras
    import tensorflow as tf

    cpu = cpuinfo("model name")
    return {"cpu": "unknown" if cpu is None else cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "platform": platform.platform()}


def load() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
