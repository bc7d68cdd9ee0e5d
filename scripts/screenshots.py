"""Screenshots of the real TensorBoard dashboard for the README, into ``docs/images/``.

    pip install -e . playwright     # Playwright drives the browser (not a test dependency)
    apt-get install -y chromium     # Debian's Chromium, /usr/bin/chromium
    python scripts/screenshots.py   # about a minute on 2 cores

1. Trains the dense experiment (``python -m trainer +experiment=dense``, 40 epochs) and a
   2x2 sweep (``python -m trainer -m +experiment=dense optimizer.learning_rate=1e-3,3e-3
   model.dropout=0,0.2 trainer.epochs=10``) into a scratch directory.
2. Starts the real ``tensorboard --logdir ... --host 127.0.0.1 --port <free>`` on each and
   waits (bounded) until its HTTP API serves the runs' last points.
3. Opens the dashboard in headless Chromium through Playwright, waits for the page's
   network to be idle (the charts draw only after their data arrived: Chromium's own
   ``--screenshot`` flag captures them without their lines), and saves:

   - ``docs/images/tensorboard_scalars.png``: the dense run in the Time Series page
     filtered to ``loss`` and ``accuracy``: training (per execution) and validation
     (per epoch) on one chart each;
   - ``docs/images/tensorboard_hparams.png``: the sweep in the HParams table, with the
     two swept hyperparameters ticked (the dashboard ticks the first five by name) and
     the validation and training metrics;
   - ``docs/images/tensorboard_health.png``: the dense run in the Custom Scalars page,
     the health callback's first category (each statistic with every layer on one chart).

The PNGs are reduced to 256 colours (Pillow, when installed) to stay small. Playwright's
own browser download (``playwright install``) is not needed: any Chromium works
(``--chromium PATH``). ``--work DIR --keep`` keeps the runs; ``--reuse`` photographs runs
kept before without training again. The servers are stopped however the script ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SWEPT = ["optimizer.learning_rate", "model.dropout"]


def train(work: Path, sweep_epochs: int) -> None:
    """The dense experiment and the sweep, as a user runs them (``python -m trainer``)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    commands = [
        # Health every 100 steps whatever the pace (its default holds a measurement back
        # within a second of the last: a 40-epoch run measures a few times only).
        ["+experiment=dense", "callbacks.health.min_interval_seconds=0",
         f"hydra.run.dir={work / 'dense'}"],
        ["-m", "+experiment=dense", "optimizer.learning_rate=1e-3,3e-3", "model.dropout=0,0.2",
         f"trainer.epochs={sweep_epochs}", f"hydra.sweep.dir={work / 'sweep'}"],
    ]
    for args in commands:
        print("python -m trainer", " ".join(args), flush=True)
        subprocess.run([sys.executable, "-m", "trainer", *args], cwd=work, env=env, check=True,
                       stdout=subprocess.DEVNULL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def tensorboard(logdir: Path, ready_run: str, last_step: int, *, timeout: float = 120):
    """``tensorboard`` on 127.0.0.1 serving ``logdir``; yields its base URL once the
    ``loss`` of ``ready_run`` reaches ``last_step`` (the run fully loaded)."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    query = urllib.parse.urlencode({"run": ready_run, "tag": "loss"})
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
             "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if any(step >= last_step for _, step, _ in
                           _get(f"{base}/data/plugin/scalars/scalars?{query}")):
                        break
                except OSError:
                    pass  # not listening yet, or not loaded yet
                if server.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(
                        f"tensorboard did not serve {logdir} ({ready_run}) within {timeout} s:"
                        f"\n{log.read().decode(errors='replace')[-2000:]}")
                time.sleep(0.5)
            yield base
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=15)


def _last_step(run_dir: Path) -> int:
    return json.loads((run_dir / "metrics.json").read_text())["step"]


def _open(browser, url: str, *, width: int, height: int):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url, wait_until="networkidle")
    return page


def _settle(page) -> None:
    """Until the requests the last action caused are answered and the charts redrawn."""
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1500)


def scalars(browser, base: str, out: Path) -> None:
    """The Time Series page (TensorBoard's first) filtered to the tags ``loss`` and
    ``accuracy``: train and val on one chart each, with the runs' legend and values."""
    page = _open(browser, f"{base}/#timeseries", width=1200, height=900)
    tag_filter = page.locator("input[placeholder='Filter tags (regex)']")
    tag_filter.fill("^(loss|accuracy)$")
    page.keyboard.press("Escape")  # the filter's suggestions
    page.get_by_role("button", name="Toggle settings side pane").click()  # closed: wider charts
    page.locator("metrics-filtered-view scalar-card").nth(1).wait_for()
    _settle(page)
    bottom = _bottom(page.locator("metrics-filtered-view metrics-card-grid").first)
    page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": 1200, "height": bottom + 16})
    page.close()


def hparams(browser, base: str, out: Path) -> None:
    """The HParams table of the sweep, showing the swept hyperparameters."""
    page = _open(browser, f"{base}/#hparams", width=1480, height=700)
    boxes = page.locator("paper-checkbox.hparam-checkbox")
    boxes.filter(has_text=SWEPT[0]).wait_for()
    for i in range(boxes.count()):
        box = boxes.nth(i)
        wanted = box.inner_text().strip() in SWEPT
        if (box.get_attribute("aria-checked") == "true") != wanted:
            box.click()
    # The sidebar scrolled to the first ticked hyperparameter.
    first = min(SWEPT)
    boxes.filter(has_text=first).evaluate("box => box.scrollIntoView({block: 'start'})")
    _settle(page)
    cells = page.locator("tf-hparams-table-view vaadin-grid-cell-content")
    bottom = max(_bottom(cells.nth(i)) for i in range(cells.count()) if cells.nth(i).is_visible())
    page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": 1480, "height": bottom + 16})
    page.close()


def health(browser, base: str, out: Path) -> None:
    """The Custom Scalars page: the health callback's layout, its first category (every
    layer's gradient norm, update ratio, ... on one chart each)."""
    page = _open(browser, f"{base}/#custom_scalars", width=1200, height=1000)
    charts = page.locator("tf-custom-scalar-margin-chart-card, "
                          "tf-custom-scalar-multi-line-chart-card")
    charts.first.wait_for()
    _settle(page)
    bottom = max(_bottom(charts.nth(i)) for i in range(min(charts.count(), 6))
                 if charts.nth(i).is_visible())
    page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": 1200,
                                         "height": min(bottom + 16, 1000)})
    page.close()


def _bottom(locator) -> float:
    box = locator.bounding_box()
    return box["y"] + box["height"]


def shrink(path: Path) -> None:
    """256 colours: the dashboard is flat colours and anti-aliased lines."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--reuse", action="store_true", help="photograph the runs in --work")
    parser.add_argument("--sweep-epochs", type=int, default=10)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright  # an error naming it if not installed

    work = args.work or Path(tempfile.mkdtemp(prefix="screenshots-"))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if not args.reuse:
            train(work, args.sweep_epochs)
        dense, sweep = work / "dense", work / "sweep"
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            try:
                # The run's tb/ as the log dir: its runs are named train and val.
                with tensorboard(dense / "tb", "val", _last_step(dense)) as base:
                    scalars(browser, base, args.out / "tensorboard_scalars.png")
                    health(browser, base, args.out / "tensorboard_health.png")
                jobs = sorted(p.parent for p in sweep.glob("*/metrics.json"))
                with tensorboard(sweep, f"{jobs[-1].name}/tb/val", _last_step(jobs[-1])) as base:
                    hparams(browser, base, args.out / "tensorboard_hparams.png")
            finally:
                browser.close()
        for name in ("tensorboard_scalars.png", "tensorboard_hparams.png",
                     "tensorboard_health.png"):
            shrink(args.out / name)
            print(args.out / name, f"{(args.out / name).stat().st_size // 1024} KiB")
    finally:
        if not (args.keep or args.work):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
