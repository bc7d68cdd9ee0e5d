"""The benchmark harness runs end to end in quick mode and reports every case, and group F's
variants run on toy sizes (no timings are asserted: speed is measured by the harness, not
by the tests)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
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
    assert set(result["cases"]) == {"A", "B", "C", "D", "E", "F", "S"}
    assert {"cpu", "cores", "tensorflow", "keras"} <= set(result["machine"])
    assert set(result["first_step"]) == {"compiled", "xla"}
    assert {"tensorboard_cost", "checkpoint_cost", "health_cost", "progress_cost",
            "progress_spe1_cost", "compiled_vs_eager"} <= set(result["cases"]["D"])
    assert result["cases"]["S"]["sam_step_time_vs_plain"] > 1  # two passes per update
    assert result["cases"]["B"]["peak_gflops"] > 0
    assert {"A+gp", "A+gp/16", "B+gp", "B+gp/16"} <= set(result["cases"]["C"])
    for name, group in result["groups"].items():
        for variant in group.values():  # F times twice the windows, half as long
            assert variant["median"] > 0 and len(variant["rates"]) == (4 if name == "F" else 2)
    # E: short endurance runs of the nested-tape PINN and the persistent-tape multitask step.
    runs = result["endurance"]["runs"]
    assert set(runs) == {"pinn", "multitask"} == set(result["cases"]["E"])
    for r in runs.values():
        assert r["steps"] == 1000 and r["checkpoints"] == 3
        assert [s[0] for s in r["samples"]] == [250, 500, 750, 1000]
        assert r["start"]["rss_mb"] > 0 and r["end"]["open_files"] > 0
        assert isinstance(r["open_files_growth"], int)
    cases = {t["case"] for t in result["targets"]}
    assert cases == {"A", "B", "C", "D", "E", "F", "S"}
    assert set(result["cases"]["F"]["auto"]) == {"dense", "dense-nodropout", "B-bf16"}
    assert result["cases"]["F"]["mirrored2_vs_one_device"] > 0  # the child process's pair
    assert all(isinstance(t["met"], bool) for t in result["targets"])
    text = md.read_text()
    assert "## Targets" in text and result["machine"]["cpu"] in text
    assert "A trainer best / model.fit best" in p.stdout
    assert "E pinn: open file handles growth" in p.stdout
    assert "## E: endurance" in text and "## F: scale" in text


@pytest.mark.slow
def test_dispatch_script_times_the_wrapper_and_the_concrete_function():
    p = subprocess.run([sys.executable, "-m", "benchmarks.dispatch", "--calls", "3",
                        "--rounds", "2"], capture_output=True, text=True, cwd=ROOT, timeout=180,
                       env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0].startswith("20 captured variables; best of 2 rounds of 3 calls"), lines
    assert [line.split(":")[0] for line in lines[1:]] == [
        "through the tf.function wrapper", "the concrete function directly",
        "the wrapper's dispatch"]
    assert all(line.endswith(" us per call") for line in lines[1:])


def test_group_f_runs_every_kind_of_variant_on_toy_sizes(tmp_path):
    """Each kind of group F variant sets up and runs (precision policies with the hand-written
    loops, TFRecord shards, the tf.data iterator, accumulation, jit_compile=auto's
    measurement of both compilations, a mirrored strategy), and the report reads its targets
    off the rows. The mirrored pair runs in this process: conftest made two logical CPUs
    before TensorFlow started. The group's repeated baselines and fixed-XLA rows stand in as
    copies of rows measured here (same code paths), which keeps this test fast."""
    import keras

    from benchmarks import scale
    from benchmarks.report import summarize

    planned = scale.variants(directory=tmp_path, tiny=True)
    assert set(planned) == {"precision", "streaming", "accumulation", "auto/dense",
                            "auto/dense-nodropout", "auto/B-bf16"}
    assert all(len(planned[f"auto/{m}"]) == 3 for m in ("dense", "dense-nodropout", "B-bf16"))
    baseline, mirrored = "F/precision/B/spe8/trainer-memory", scale.mirrored_variants(tiny=True)
    copies = {"F/streaming/B/spe8/trainer-memory": baseline,
              "F/accumulation/B/spe8/trainer-memory": baseline,
              mirrored[0].name: baseline,
              "F/auto/dense/jit-false": "F/auto/dense/jit-auto",
              "F/auto/dense/jit-true": "F/auto/dense/jit-auto"}
    chosen = [v for sub, group in planned.items() if sub in (
        "precision", "streaming", "accumulation", "auto/dense") for v in group
        if v.name not in copies] + [mirrored[1]]
    rows = scale.measure_cpu(chosen, windows=1, window_seconds=0.001, log=lambda msg: None)
    assert keras.mixed_precision.global_policy().name == "float32"  # put back
    assert set(rows) == {v.name for v in chosen}
    assert all(r["median"] > 0 and len(r["rates"]) == 1 for r in rows.values())
    assert all(len(r["cpu_ms_per_step"]) == 1 and r["cpu_ms_per_step_median"] > 0
               for r in rows.values())
    by = {name.rsplit("/", 1)[1]: r for name, r in rows.items()}
    assert by["trainer-memory-bf16"]["precision"] == "mixed_bfloat16"
    assert by["trainer-memory-fp16"]["precision"] == "mixed_float16"
    assert by["trainer-tfrecord"]["source"] == "tfrecord"
    assert by["trainer-iterator"]["source"] == "iterator"
    assert by["trainer-memory-mirrored2"]["distribute"] == "mirrored"
    accum = next(r for r in rows.values() if r.get("accumulate_steps") == scale.ACCUMULATE)
    assert accum["unit"] == "micro-batches"
    auto = rows["F/auto/dense/jit-auto"]
    assert isinstance(auto["xla"], bool) and set(auto["calibration_ms_per_step"]) == {
        "xla", "no_xla"}
    rows.update({copy: rows[source] for copy, source in copies.items()})
    cases, targets = summarize({"groups": {"F": rows}})
    f = cases["F"]
    assert set(f["auto"]) == {"dense"} and f["auto"]["dense"]["auto_chose"] in ("true", "false")
    for key in ("bf16_vs_fp32", "bf16_trainer_vs_hand", "hand_bf16_vs_fp32", "fp16_vs_fp32",
                "tfrecord_vs_memory", "tfrecord_vs_iterator", "accumulate_micro_vs_plain",
                "mirrored2_vs_one_device"):
        assert f[key] > 0, key
    assert {t["case"] for t in targets} == {"F"} and len(targets) == 6
    text = "\n".join(scale.report_lines({"cases": cases, "groups": {"F": rows}}))
    assert "## F: scale" in text and "| dense |" in text


def test_merge_keeps_the_recorded_groups_and_lists_each_run():
    """``--groups F --merge``: group F's results join the recorded A-E, whose numbers stay."""
    from benchmarks.report import markdown_report, merge, summarize

    recorded = json.loads((ROOT / "benchmarks" / "results.json").read_text())
    others = [g for g in recorded["groups"] if g != "F"]
    row = {"kind": "trainer", "median": 100.0, "min": 90.0, "max": 110.0, "spread": 0.2,
           "rates": [100.0], "xla": False, "steps_per_execution": 32}
    later = {"machine": recorded["machine"], "load_before": "now", "load_after": "later",
             "seconds": 60.0, "first_step": {}, "groups": {"F": {"F/B/spe32/trainer-memory": row}},
             "settings": {"quick": False, "windows": 7, "window_seconds": 0.7, "groups": ["F"]}}
    merged = merge(recorded, later)
    # The recorded runs (one full run, or several after merges) less group F, then F's.
    runs = [[g for g in r["groups"] if g != "F"] for r in recorded.get("runs", [])]
    runs = [*[r for r in runs if r], ["F"]]
    assert list(merged["groups"]) == [*others, "F"]
    assert merged["groups"]["A"] == recorded["groups"]["A"]
    assert merged["endurance"] == recorded["endurance"]
    assert merged["first_step"] == recorded["first_step"]
    assert [r["groups"] for r in merged["runs"]] == runs
    merged["cases"], merged["targets"] = summarize(merged)
    assert set(merged["cases"]) == {"A", "B", "C", "D", "E", "F", "S"}
    text = markdown_report(merged)
    assert "- Group F:" in text and "## F: scale" in text
    assert all(f"- Group{'s' if len(r) > 1 else ''} {', '.join(r)}:" in text for r in runs)
    # Merging again replaces F and keeps the rest.
    again = merge(merged, later)
    assert [r["groups"] for r in again["runs"]] == runs


def _benchmark_imports() -> dict:
    """``{module: the benchmarks/ modules it imports}``, every import statement of
    benchmarks/*.py read with ast (at the top, inside functions, absolute or relative)."""
    import ast

    package = ROOT / "benchmarks"
    modules = {path.stem for path in package.glob("*.py")}

    def module(dotted: str):
        parts = dotted.split(".")
        if parts[0] != "benchmarks":
            return None
        return parts[1] if len(parts) > 1 and parts[1] in modules else "__init__"

    graph = {}
    for path in sorted(package.glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found |= {module(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level > 1:  # above the package
                    continue
                base = "benchmarks" if node.level else ""
                base = ".".join(filter(None, [base, node.module]))
                found.add(module(base))  # the module, or the package's __init__
                if module(base) == "__init__":  # from benchmarks import scale
                    found |= {a.name for a in node.names if a.name in modules}
        graph[path.stem] = found - {None, path.stem}
    return graph


def _circle(graph: dict):
    """One import circle of ``graph`` as ``[a, b, ..., a]``, or None."""
    done, path = set(), []

    def visit(name):
        if name in path:
            return [*path[path.index(name):], name]
        if name in done:
            return None
        path.append(name)
        for other in sorted(graph.get(name, ())):
            if found := visit(other):
                return found
        path.pop()
        done.add(name)
        return None

    return next((c for c in map(visit, sorted(graph)) if c), None)


def test_benchmark_modules_import_one_way():
    """No benchmarks/ module reaches itself through its imports (those inside functions
    included): the modules stack in layers, bench.py at the top."""
    graph = _benchmark_imports()
    assert {"report", "scale"} <= graph["bench"]  # the reader sees the imports
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _circle(graph) is None, " -> ".join(_circle(graph))
