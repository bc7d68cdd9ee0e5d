"""The README and the docs pages keep their promises.

Every fenced code block of ``README.md`` and ``docs/*.md`` is run, composed or checked:

- ``python`` blocks are executed (in a scratch directory); the ones named in ``CHECKED_BY``
  are executed by the test named there, which also checks what they do;
- every command of a ``bash`` block is composed or parsed as it would run:
  ``python -m trainer ...`` (also after ``srun`` or ``PYTHONPATH=...``) through Hydra's
  compose API, a multirun's sweeps at their first value; ``python -m trainer.launch ...`` by
  the launcher's own parser, then its overrides composed; ``python -m trainer.export_data
  ...`` composed from ``export_data.yaml``, ``python -m trainer.lr_find ...`` from
  ``lr_find.yaml``; other ``python -m MODULE``/``python SCRIPT``
  commands are checked against their ``--help`` (each option used exists), since they need
  a finished run, a sweep or a browser; commands that are not Python (``pip install``,
  ``tensorboard``, the SLURM script's shell) are listed in ``NOT_RUN`` with the reason;
- ``yaml`` blocks are composed as an experiment (a block whose first line names a file under
  ``my_configs/`` is written there for the commands that use it) and their nodes built;
- blocks without a language are listed in ``NOT_RUN`` or checked by a test of their own (the
  config tree).

Also: relative links and their anchors resolve (GitHub's rules), the README stays a front
page (at most 300 lines, opening with the two commands, linking every page), the design
page's module map names exactly the modules of ``trainer/`` (sub-packages' ``__init__.py``
left out), and the paths and Python names of the package the pages mention exist.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README = (ROOT / "README.md").read_text()


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository
    line: int  # of the opening fence
    lang: str
    text: str

    def __str__(self):
        return f"{self.page}:{self.line}"


def _blocks(path: Path) -> list[Block]:
    blocks, lines = [], path.read_text().splitlines(keepends=True)
    i = 0
    while i < len(lines):
        opening = re.match(r"```(\S*)\s*$", lines[i])
        if opening:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append(Block(str(path.relative_to(ROOT)), i + 1, opening.group(1),
                                "".join(lines[i + 1:end])))
            i = end
        i += 1
    return blocks


ALL_BLOCKS = [b for page in PAGES for b in _blocks(page)]
BLOCKS = [b.text for b in ALL_BLOCKS if b.lang == "python"]


def _block(marker, lang="python"):
    """The one block (across README and docs) that contains ``marker``; copies of one block on
    several pages (the README's tour repeats the custom step) count once."""
    found = {b.text for b in ALL_BLOCKS if b.lang == lang and marker in b.text}
    assert len(found) == 1, f"{len(found)} different ```{lang} blocks hold {marker!r}"
    return found.pop()


#: Blocks run by a test of their own, which checks more than that they run.
CHECKED_BY = {
    ("python", "class ConfidencePenaltyStep"): "test_custom_step_example_*",
    ("python", "class WeightNormStep"): "test_sampled_diagnostic_example_logs_once_per_execution",
    ("python", "from trainer import TapeStep, Trainer, TensorBoardCallback"):
        "test_python_api_example",
    ("python", "tf.io.TFRecordWriter("): "test_shards_from_another_tool_example_writes_...",
    ("bash", "python -m trainer.export_data --index shards/mine"):
        "test_shards_from_another_tool_example_writes_...",
    ("json", '"format": "trainer.tfrecord"'): "test_shards_from_another_tool_example_writes_...",
    ("", "configs/\n  config.yaml"): "test_the_config_tree_names_every_config",
    ("python", 'tf.saved_model.load("served/dense")'): "test_the_docs_serving_example_*",
}

#: Blocks shown but not run, with the reason.
NOT_RUN = {
    ("", "DIR/train-00000-of-00008.tfrecord"):
        "a listing of what an export writes (tests/test_tfrecord.py exports and reads them)",
    ("", "[launch] run dir"): "the output of a run with two workers (tests/test_launch.py)",
    ("", "$ python -m trainer.summary"): "the output of a finished sweep (tests/test_sweep.py)",
    ("", "lr_find: 91 updates from"):
        "the last line of python -m trainer.lr_find (tests/test_lr_find.py runs the command)",
    ("", "driver            trainer/driver/"):
        "the design page's picture of the levels (tests/test_layers.py enforces them)",
    ("", "wrote dense.tflite (tflite); on 360"):
        "the line python -m trainer.export prints (tests/test_export.py checks it)",
    ("", "step,train/loss,train/mae"):
        "the head of a metrics.csv (tests/test_tracking.py reads the file a run writes)",
    ("bash", "mlflow ui --backend-store-uri"):
        "starts MLflow's web page (tests/test_tracking.py reads the store it shows)",
    ("bash", "tensorboard --logdir outputs"):
        "starts a server (tests/test_tensorboard_server.py runs one on a finished run)",
    ("", "Epoch 2/3  "): "the progress line on a terminal (tests/test_progress.py draws it)",
}

#: Commands of bash blocks that are not run, by their first word(s), with the reason.
NOT_RUN_COMMANDS = {
    "pip install": "installs packages; the test environment has them",
    "apt-get install": "installs a system package",
    "ruff check": "the linter, run by CI on the whole repository",
    "pytest": "the test suite itself",
    "tensorboard --logdir": "starts a server (tests/test_tensorboard_server.py runs one on a "
                            "finished run)",
    "mlflow server": "starts a server (tests/test_tracking.py runs one and logs a sweep to it)",
    "mlflow ui": "starts MLflow's web page on a store (tests/test_tracking.py reads the store)",
    "export TF_CONFIG=": "one host's part of a multi-host cluster",
    "status=$?": "the SLURM batch script's shell (needs SLURM)",
    "if [": "the SLURM batch script's shell (needs SLURM)",
    "exit $status": "the SLURM batch script's shell (needs SLURM)",
}

#: Environment variables that commands use, as the test sets them (PWD: the scratch dir).
ENV = {"SLURM_JOB_ID": "1234"}


def _claim(block: Block, table: dict):
    return [key for key in table if key[0] == block.lang and key[1] in block.text]


# --- Commands ---------------------------------------------------------------------------


def _commands(text: str) -> list[list[str]]:
    """The commands of a bash block, as words: continuation lines joined, comments dropped,
    ``&&`` chains split."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        current = []
        for word in [*shlex.split(line, comments=True), "&&"]:
            if word != "&&":
                current.append(word)
            elif current:
                out.append(current)
                current = []
    return out


def _expand(word: str, pwd: Path) -> str:
    env = {**ENV, "PWD": str(pwd)}
    return re.sub(r"\$(\w+)", lambda m: env[m.group(1)], word)


def _first_values(overrides: list[str]) -> list[str]:
    """A multirun's overrides with each sweep at its first value: one job, composed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for text, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if parsed.is_sweep_override():
            first = next(iter(parsed.sweep_string_iterator()))
            text = f"{parsed.get_key_element()}={first}"
        out.append(text)
    return out


def _compose(overrides: list[str], config_name: str = "config"):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("trainer.configs", version_base="1.3"):
            return compose(config_name, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def _compose_trainer_command(args: list[str], config_name: str = "config"):
    """``python -m trainer ARGS`` as Hydra would compose it, without running it."""
    multirun, overrides, it = False, [], iter(args)
    for a in it:
        if a in ("-m", "--multirun"):
            multirun = True
        elif a in ("--cfg", "-c", "--package", "-p"):
            next(it)  # what to print: the config is composed all the same
        elif a.startswith("-"):
            raise AssertionError(f"a flag the test does not know: {a}")
        else:
            overrides.append(a)
    if multirun:
        overrides = _first_values(overrides)
    return _compose(overrides, config_name)


@cache
def _help(command: tuple[str, ...]) -> str:
    p = subprocess.run([sys.executable, *command, "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def _check_options(command: tuple[str, ...], args: list[str]):
    shown = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", _help(command)))
    used = {a.split("=")[0] for a in args if a.startswith("-") and a != "--"}
    assert used <= shown, f"{' '.join(command)}: no such option {sorted(used - shown)}"


def _run_command(words: list[str], pwd: Path) -> str:
    """Compose, parse or check one command; returns what was done (or raises)."""
    command = " ".join(words)
    for prefix, reason in NOT_RUN_COMMANDS.items():
        if command.startswith(prefix):
            return f"not run: {reason}"
    words = [_expand(w, pwd) for w in words]
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # PYTHONPATH=$PWD python ...
        words = words[1:]
    if words[:1] == ["srun"]:
        words = words[1:]
    if words[:3] == ["python", "-m", "trainer"]:
        _compose_trainer_command(words[3:])
        return "composed"
    if words[:3] == ["python", "-m", "trainer.launch"]:
        from trainer.launch import parse_args

        args = parse_args(words[3:])
        _compose(["distribute=multi_worker", *args.overrides])
        return "parsed and composed"
    if words[:3] == ["python", "-m", "trainer.export_data"] and "--index" not in words:
        _compose_trainer_command(words[3:], config_name="export_data")
        return "composed"
    if words[:3] == ["python", "-m", "trainer.lr_find"]:
        _compose_trainer_command(words[3:], config_name="lr_find")
        return "composed"
    if words[:2] == ["python", "-m"]:
        _check_options(tuple(words[1:3]), words[3:])
        return "options checked"
    if words[:1] == ["python"] and words[1].endswith(".py"):
        _check_options((words[1],), words[2:])
        return "options checked"
    raise AssertionError(f"a command the test does not know how to run: {command!r}; "
                         "run it here or list it in NOT_RUN_COMMANDS with the reason")


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A scratch directory as a user's: ``my_configs/`` holds tests/extension's config
    groups and every file the pages show under ``my_configs/``."""
    shutil.copytree(ROOT / "tests" / "extension" / "configs", tmp_path / "my_configs")
    for b in ALL_BLOCKS:
        for name, content in _shown_files(b):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(content)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _shown_files(b: Block):
    """Files a block shows: a yaml block opening with ``# my_configs/X.yaml``, or a comment
    ``# my_configs/X.yaml:  {inline yaml}`` in a bash block."""
    if b.lang == "yaml":
        first = b.text.splitlines()[0]
        m = re.fullmatch(r"# (my_configs/\S+\.yaml)", first)
        if m:
            yield m.group(1), b.text.split("\n", 1)[1]
    if b.lang == "bash":
        for m in re.finditer(r"^# (my_configs/\S+\.yaml):\s+(\{.*\})$", b.text, re.M):
            yield m.group(1), m.group(2) + "\n"


BASH = [b for b in ALL_BLOCKS if b.lang == "bash" and not _claim(b, CHECKED_BY)]


@pytest.mark.parametrize("block", BASH, ids=str)
def test_every_command_composes(block, user_dir):
    done = [_run_command(c, user_dir) for c in _commands(block.text)]
    assert any(not d.startswith("not run") for d in done) or _claim(block, NOT_RUN), (
        f"{block}: nothing in this block runs; list it in NOT_RUN with the reason")


#: Where a yaml block's nodes go in the config when it does not say (its first comment does).
YAML_UNDER = {"keras:\n  _target_: trainer.KerasCallbacks": "callbacks"}

YAML = [b for b in ALL_BLOCKS if b.lang == "yaml"]


@pytest.mark.parametrize("block", YAML, ids=str)
def test_every_yaml_block_composes_and_builds(block, user_dir):
    import hydra.utils
    import yaml
    from omegaconf import OmegaConf

    shown = dict(_shown_files(block))
    if shown:
        (path,) = shown
        if "/experiment/" in path:
            name = Path(path).stem
            cfg = _compose([f"hydra.searchpath=[file://{user_dir}/my_configs]",
                            f"+experiment={name}"])
            assert cfg is not None
        return
    nodes = yaml.safe_load(block.text)
    (under,) = [v for k, v in YAML_UNDER.items() if k in block.text] or [None]
    body = {under: nodes} if under else nodes
    (user_dir / "my_configs" / "experiment").mkdir(parents=True, exist_ok=True)
    (user_dir / "my_configs" / "experiment" / "shown.yaml").write_text(
        "# @package _global_\n" + yaml.safe_dump(body))
    cfg = _compose([f"hydra.searchpath=[file://{user_dir}/my_configs]", "+experiment=shown"])
    for key in nodes:
        node = cfg[under][key] if under else cfg[key]
        built = hydra.utils.instantiate(OmegaConf.to_container(node, resolve=False))
        assert built is not None


def test_every_block_is_run_composed_or_listed():
    """Each block is handled by a test above or listed with the reason; each list entry
    still matches a block."""
    handled_langs = {"python", "bash", "yaml"}
    for b in ALL_BLOCKS:
        claims = _claim(b, CHECKED_BY) + _claim(b, NOT_RUN)
        assert b.lang in handled_langs or claims, (
            f"{b}: a ```{b.lang} block no test runs; run it or list it in NOT_RUN")
    for key in [*CHECKED_BY, *NOT_RUN]:
        assert any(_claim(b, {key: None}) for b in ALL_BLOCKS), f"no block matches {key}"


def test_python_blocks_run(tmp_path, monkeypatch):
    """Python blocks no other test runs are executed as written, in a scratch directory."""
    monkeypatch.chdir(tmp_path)
    for text in {b.text for b in ALL_BLOCKS if b.lang == "python"}:
        if not any(m in text for (lang, m) in CHECKED_BY if lang == "python"):
            exec(compile(text, "<docs block>", "exec"), {"__name__": "docs_block"})


def test_the_config_tree_names_every_config():
    """The config tree of docs/configuration.md names each YAML file of configs/ (a group's
    options by name on the group's line), and nothing else."""
    tree = _block("configs/\n  config.yaml", lang="")
    entries, key = {}, None
    for line in tree.splitlines()[1:]:
        m = re.match(r"  (\S+)\s*(.*)", line)
        if m and not line.startswith("   "):
            key = m.group(1)
            entries[key] = m.group(2)
        else:
            entries[key] += " " + line.strip()
    named = {k for k in entries if not k.startswith("(")}
    configs = ROOT / "configs"
    for k in named:
        assert (configs / k).exists(), f"the config tree names {k}, which does not exist"
    for path in sorted(configs.rglob("*.yaml")):
        rel = path.relative_to(configs).as_posix()
        group = rel.rsplit("/", 1)[0] + "/" if "/" in rel else None
        ok = rel in named or (group in named and re.search(rf"\b{path.stem}\b", entries[group]))
        assert ok, f"configs/{rel} is not in the config tree of docs/configuration.md"


# --- The README as a front page -------------------------------------------------------


def test_readme_is_at_most_300_lines():
    assert len(README.splitlines()) <= 300


def test_readme_opens_with_the_two_commands_and_where_to_run_them():
    first = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    assert README.index("```bash") < README.index("\n## ")
    assert first.splitlines() == ["pip install -e . && python -m trainer +experiment=dense",
                                  "pip install -e '.[test]' && ruff check . && pytest"]
    intro = README[:README.index("\n## ")]
    assert "python -m venv .venv && . .venv/bin/activate" in intro


def test_readme_links_every_docs_page():
    linked = set(re.findall(r"\]\(docs/([\w.-]+\.md)\)", README))
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")}


# --- Links ----------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen, fence = set(), {}, False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            slug = _slug(line.lstrip("#"))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(path: Path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    for m in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = m.group(1)
        if not re.match(r"[a-z]+:", target):
            yield target


#: Links known to be broken, with the reason; each entry must still be there.
KNOWN_BROKEN: dict = {}


def test_relative_links_point_at_files_and_headings_that_exist():
    broken = []
    for page in PAGES:
        rel = page.relative_to(ROOT).as_posix()
        for target in _links(page):
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            ok = dest.exists() and (not anchor or (dest.suffix == ".md"
                                                   and anchor in _anchors(dest)))
            if not ok:
                broken.append((rel, target))
    assert set(broken) == set(KNOWN_BROKEN), (
        f"broken links: {sorted(set(broken) - set(KNOWN_BROKEN))}; "
        f"fixed (remove from KNOWN_BROKEN): {sorted(set(KNOWN_BROKEN) - set(broken))}")


def test_slugs_follow_github():
    assert _slug(" Several devices: `distribute=mirrored`") == "several-devices-distributemirrored"
    assert _slug(" Shards from other tools: `python -m trainer.export_data --index DIR`") == (
        "shards-from-other-tools-python--m-trainerexport_data---index-dir")
    assert _slug(" `meta.json`, key by key") == "metajson-key-by-key"


# --- The module map ---------------------------------------------------------------------


def _section(path: Path, title: str) -> str:
    text = path.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _modules() -> set[str]:
    """Every module of trainer/, without the ``__init__.py`` of its sub-packages (they only
    gather their package's names); trainer/__init__.py, the public API, counts."""
    found = set()
    for path in (ROOT / "trainer").rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        if path.name == "__init__.py" and path.parent != ROOT / "trainer":
            continue
        found.add(path.relative_to(ROOT).as_posix())
    return found


def test_the_module_map_names_exactly_the_modules_that_exist():
    named = set(re.findall(r"`(trainer/[\w/]+\.py)`",
                           _section(ROOT / "docs" / "design.md", "Module map")))
    existing = _modules()
    assert not named - existing, f"the module map names modules that do not exist: " \
                                 f"{sorted(named - existing)}"
    assert not existing - named, f"modules missing from the module map in docs/design.md: " \
                                 f"{sorted(existing - named)}"


def test_every_path_the_pages_name_exists():
    """A path to a module, script or folder of the repository named on a page exists."""
    missing = set()
    for page in PAGES:
        for path in re.findall(r"(?<![\w./-])((?:trainer|experiments|benchmarks|scripts|tests)"
                               r"/[\w/.-]*(?:\.py|/))", page.read_text()):
            if not (ROOT / path).exists():
                missing.add((page.relative_to(ROOT).as_posix(), path))
    assert not missing, sorted(missing)


def _resolve(name: str):
    """The object a dotted name names: the longest importable module, then attributes."""
    import importlib

    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def test_python_names_the_pages_use_exist():
    """A Python name of the package written in code (`trainer.step.tape.gradients`,
    `trainer.TapeStep`) names something that exists. (Names with one dot and a lowercase
    attribute are left out: `trainer.epochs` is a config key, `trainer.models` the trainer's.)"""
    import dataclasses

    from trainer.driver.schemas import TrainerConfig

    # Nested config keys of the trainer node (`trainer.ema.decay`) are not Python names.
    keys = {f.name for f in dataclasses.fields(TrainerConfig)}
    names = set()
    for page in PAGES:
        text = page.read_text()
        names.update(n for n in re.findall(r"`(trainer(?:\.\w+){2,}|trainer\.[A-Z]\w*)", text)
                     if n.split(".")[1] not in keys)
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{name} ({e})")
    assert not missing, missing


# --- The custom step examples -------------------------------------------------------------


@pytest.fixture
def readme_steps():
    module = types.ModuleType("readme_steps")
    exec(_block("class ConfidencePenaltyStep"), module.__dict__)
    sys.modules["readme_steps"] = module
    yield module
    del sys.modules["readme_steps"]


def test_custom_step_example_is_short(readme_steps):
    assert len(_block("class ConfidencePenaltyStep").strip().splitlines()) < 30


@pytest.mark.parametrize("eager", [False, True])
def test_custom_step_example_trains_through_the_config(make_cfg, tmp_path, readme_steps, eager):
    from trainer import run

    cfg = make_cfg("+experiment=dense", "step._target_=readme_steps.ConfidencePenaltyStep",
                   "+step.beta=0.2", "trainer.max_steps=30", f"trainer.run_eagerly={eager}",
                   "callbacks=none")
    metrics = run(cfg, run_dir=tmp_path)
    # 10 classes (chance 0.1); 30 steps reach about 0.86.
    assert metrics["step"] == 30 and metrics["val/accuracy"] > 0.7


def test_custom_step_example_trains_on_weighted_data(make_cfg, tmp_path, readme_steps):
    from trainer import run

    cfg = make_cfg("+experiment=dense", "step._target_=readme_steps.ConfidencePenaltyStep",
                   "data.class_weight=balanced", "trainer.max_steps=30", "callbacks=none")
    metrics = run(cfg, run_dir=tmp_path)
    assert metrics["step"] == 30 and metrics["val/accuracy"] > 0.7


def test_custom_step_example_weighs_every_term_of_its_loss(readme_steps):
    # Weights of 2 double the whole loss (Keras' reduction: sum(w * loss) / batch size).
    import keras
    import numpy as np
    import tensorflow as tf

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    step = readme_steps.ConfidencePenaltyStep(model=model, optimizer=keras.optimizers.SGD(0.1),
                                              beta=0.5)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = np.arange(8) % 3
    plain, _ = step.compute_loss(x, y, training=False)
    doubled, _ = step.compute_loss(x, y, training=False, sample_weight=tf.fill([8], 2.0))
    assert float(doubled) == pytest.approx(2 * float(plain), rel=1e-5)


@pytest.mark.parametrize("eager", [False, True])
def test_sampled_diagnostic_example_logs_once_per_execution(tmp_path, eager):
    import keras
    import numpy as np

    from tests.helpers import regression_data
    from trainer import Callback, Trainer

    module = {}
    exec(_block("class WeightNormStep"), module)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    step = module["WeightNormStep"](model=model, optimizer=keras.optimizers.SGD(0.05),
                                    task="regression")

    class Check(Callback):
        seen = []

        def on_execution_end(self, trainer, global_step, logs):
            # One step per execution: the sample is that step, after its update.
            norm = np.sqrt(sum(float(np.sum(v.numpy() ** 2)) for v in model.trainable_variables))
            self.seen.append((logs["train/weight_norm"], norm, logs["train/grad_norm"]))

    Trainer(epochs=1, steps_per_execution=1, run_eagerly=eager, callbacks=[Check()],
            run_dir=str(tmp_path)).fit(step, regression_data(n=96, batch_size=16))
    assert len(Check.seen) == 6
    for logged, norm, grad_norm in Check.seen:
        assert logged == pytest.approx(norm, rel=1e-5) and grad_norm > 0


def test_python_api_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _block("from trainer import TapeStep, Trainer, TensorBoardCallback")
    exec(code.replace("epochs=5", "epochs=2"), {})
    assert (tmp_path / "runs" / "a" / "tb" / "train").is_dir()


def test_shards_from_another_tool_example_writes_indexes_and_trains(make_cfg, tmp_path,
                                                                     monkeypatch):
    """The streaming page's worked example: shards written with a plain
    tf.io.TFRecordWriter, the index command it shows, the meta.json it shows, the run."""
    import json

    from trainer import run
    from trainer.export_data import index_main

    monkeypatch.chdir(tmp_path)
    exec(_block("tf.io.TFRecordWriter("), {})
    index, train = _block("python -m trainer.export_data --index", lang="bash").strip().splitlines()
    assert index.startswith("python -m trainer.export_data --index ")
    assert index_main(shlex.split(index)[3:]) == 0
    shown = _block('"format": "trainer.tfrecord"', lang="json")
    assert json.loads((tmp_path / "shards" / "mine" / "meta.json").read_text()) == json.loads(
        shown)
    assert train.startswith("python -m trainer ")
    metrics = run(make_cfg(*shlex.split(train)[3:], "trainer.max_steps=30", "callbacks=none"),
                  run_dir=tmp_path / "run")
    assert metrics["step"] == 30 and metrics["val/accuracy"] > 0.7, metrics

