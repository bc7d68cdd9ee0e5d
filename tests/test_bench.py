"""The benchmark harness runs end to end in quick mode and reports every case (no timings
are asserted: speed is measured by the harness, not by the tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_reports_every_case(tmp_path):
    out, md = tmp_path / "quick.json", tmp_path / "RESULTS.md"
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--quick", "--out", str(out),
         "--markdown", str(md)],
        cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True,
        text=True, timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["cases"]) == {"A", "B", "C", "D", "E"}
    assert {"cpu", "cores", "tensorflow", "keras"} <= set(result["machine"])
    assert set(result["first_step"]) == {"compiled", "xla"}
    assert {"tensorboard_cost", "checkpoint_cost", "compiled_vs_eager"} <= set(
        result["cases"]["D"])
    assert result["cases"]["B"]["peak_gflops"] > 0
    assert {"A+gp", "A+gp/16", "B+gp", "B+gp/16"} <= set(result["cases"]["C"])
    for group in result["groups"].values():
        for variant in group.values():
            assert variant["median"] > 0 and len(variant["rates"]) == 2
    # E: short endurance runs of the nested-tape PINN and the persistent-tape multitask step.
    runs = result["endurance"]["runs"]
    assert set(runs) == {"pinn", "multitask"} == set(result["cases"]["E"])
    for r in runs.values():
        assert r["steps"] == 1000 and r["checkpoints"] == 3
        assert [s[0] for s in r["samples"]] == [250, 500, 750, 1000]
        assert r["start"]["rss_mb"] > 0 and r["end"]["open_files"] > 0
        assert isinstance(r["open_files_growth"], int)
    cases = {t["case"] for t in result["targets"]}
    assert cases == {"A", "B", "C", "D", "E"}
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    text = md.read_text()
    assert "## Targets" in text and result["machine"]["cpu"] in text
    assert "A trainer best / model.fit best" in p.stdout
    assert "E pinn: open file handles growth" in p.stdout
    assert "## E: endurance" in text
