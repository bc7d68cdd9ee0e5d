"""docs/results.md comes from scripts/results.py, and the pages that quote its figures (the
README, the Results of docs/experiments.md, docs/scaling.md and docs/precision.md) quote only
figures that are on it."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "results.md"


def _script():
    spec = importlib.util.spec_from_file_location("results_script", ROOT / "scripts" / "results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _section(page: str, title: str) -> str:
    text = (ROOT / page).read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _quoted() -> str:
    """The text that quotes docs/results.md: the README, the Results of the experiments page,
    and the pages on scaling out and on precision."""
    return ((ROOT / "README.md").read_text() + _section("docs/experiments.md", "Results")
            + (ROOT / "docs" / "scaling.md").read_text()
            + (ROOT / "docs" / "precision.md").read_text())


def test_the_page_names_the_script_the_date_and_the_machine():
    text = PAGE.read_text()
    assert "Measured by `python scripts/results.py`" in text
    assert re.search(r"Measured on \d{4}-\d{2}-\d{2}\.", text)
    assert re.search(r"\d+-core .+, TensorFlow \d+\.\d+", text)
    assert [m for m in re.findall(r"(?m)^## (.+)$", text)] == [
        "The dense experiment", "The convolutional experiment", "Precisions",
        "Replicas, workers, accumulation and dropout"]


def test_every_figure_the_docs_quote_is_on_the_page():
    page = PAGE.read_text()
    figures = set(re.findall(r"\b\d\.\d{4,}\b", _quoted()))
    assert {"0.9778", "0.4924"} <= figures, "the docs no longer quote the results"
    missing = sorted(f for f in figures if f not in page)
    assert not missing, f"figures not on docs/results.md (rerun the script): {missing}"


def test_sections_not_measured_keep_their_text():
    script = _script()
    old = script.render({"dense": "## The dense experiment\n\nold dense\n\n",
                         "cnn": "## The convolutional experiment\n\nold cnn\n\n"},
                        date="2026-01-01", machine="2-core CPU, TensorFlow 2.0")
    kept = script.previous_sections(old)
    assert kept["dense"].strip() == "## The dense experiment\n\nold dense"
    assert set(kept) == {"dense", "cnn"}
    new = script.render({**kept, "cnn": "## The convolutional experiment\n\nnew cnn\n\n"},
                        date="2026-02-02", machine="m")
    assert "old dense" in new and "new cnn" in new and "old cnn" not in new
    assert new.index("old dense") < new.index("new cnn")


@pytest.mark.slow
def test_the_script_measures_a_section_into_the_page(tmp_path):
    out = tmp_path / "results.md"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "results.py"), "--only", "cnn",
                        "--seeds", "1", "--extra", "trainer.epochs=1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    text = out.read_text()
    assert re.search(r"validation accuracy \*\*0\.\d{4}\*\* on seed 0", text)
    assert "## The convolutional experiment" in text and "## The dense experiment" not in text
