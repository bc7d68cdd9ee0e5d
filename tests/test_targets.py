"""A ``_target_`` that cannot be imported: one line naming the module and the fix, exit 2.

Checked while validating, before TensorFlow starts (the module is found, not imported);
what only importing can tell (a module that raises) is explained when the node is built.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from trainer.common.errors import UserError
from trainer.driver.validation import validate

STEP = '''
from trainer import TapeStep


class PlainStep(TapeStep):
    """The default step, from the user's own package."""
'''


@pytest.fixture
def project(tmp_path):
    """A user's package outside the repository: ``mysteps`` (no __init__.py) with a step,
    a module that raises while importing and one that does not parse."""
    package = tmp_path / "project" / "mysteps"
    package.mkdir(parents=True)
    (package / "steps.py").write_text(STEP)
    (package / "broken.py").write_text("import torchh  # noqa\n\n\nclass Foo:\n    pass\n")
    (package / "typo.py").write_text("def Foo(:\n")
    return package.parent


def _cli(module, *args, cwd, pythonpath=None):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_line(p) -> str:
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "Error locating target" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and p.stderr.strip().splitlines()[-1] == errors[0], p.stderr
    return errors[0]


# --- the real CLI --------------------------------------------------------------------------
CHEAP = ["+experiment=dense", "trainer.max_steps=2", "callbacks=none"]


@pytest.mark.slow
@pytest.mark.parametrize(("override", "expected"), [
    pytest.param("step._target_=mysteps.steps.PlainStep",
                 "error: step._target_=mysteps.steps.PlainStep: module mysteps cannot be "
                 "imported: it is not installed and not on the Python path; install the package "
                 "that provides it (pip install -e DIR) or add the folder that holds it to "
                 "PYTHONPATH", id="own-package-without-pythonpath"),
    pytest.param("model._target_=no.such.fn",
                 "error: model._target_=no.such.fn: module no cannot be imported", id="no-module"),
    pytest.param("model._target_=trainer.models.mpl",
                 "error: model._target_=trainer.models.mpl: module trainer.models (",
                 id="misspelt-name"),
])
def test_a_target_that_cannot_be_imported_fails_before_tensorflow(tmp_path, override, expected):
    # Run from elsewhere: python -m puts the working directory on the path.
    p = _cli("trainer", *CHEAP, override, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    line = _one_line(p)
    assert line.startswith(expected), line
    if "mpl" in override:
        assert "has no submodule or name mpl (did you mean trainer.models.mlp?)" in line
    # TensorFlow never started: its start-up lines (absl, oneDNN) are not there.
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.slow
def test_an_own_module_that_raises_while_importing_is_one_line(project, tmp_path):
    # Only importing it tells; the data node is built first, so TensorFlow is not needed.
    line = _one_line(_cli("trainer", *CHEAP, "data._target_=mysteps.broken.Foo",
                          f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, pythonpath=project))
    assert line == ("error: data._target_=mysteps.broken.Foo: module mysteps.broken exists but "
                    "raises while importing: ModuleNotFoundError: No module named 'torchh'; fix "
                    "that error (or install what the module imports)")


@pytest.mark.slow
def test_evaluate_and_predict_on_a_run_whose_module_is_not_importable(project, tmp_path,
                                                                      make_cfg):
    # A run trained with PYTHONPATH set, opened without it: its config is all that is read.
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    cfg = make_cfg(*CHEAP, "step._target_=mysteps.steps.PlainStep")
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    for command in ("trainer.evaluate", "trainer.predict"):
        line = _one_line(_cli(command, str(run_dir), cwd=tmp_path))
        assert line.startswith("error: step._target_=mysteps.steps.PlainStep: module mysteps "
                               "cannot be imported"), line
        assert "PYTHONPATH" in line


@pytest.mark.slow
def test_checking_the_targets_imports_nothing(project):
    # keras and tensorflow targets included: their modules are found, not imported.
    code = textwrap.dedent("""
        import sys
        from trainer.driver.validation import _check_targets
        _check_targets({"model": {"_target_": "mysteps.steps.PlainStep"},
                        "optimizer": {"_target_": "keras.optimizers.Adam", "learning_rate": {
                            "_target_": "keras.optimizers.schedules.CosineDecay"}},
                        "metrics": [{"_target_": "keras.metrics.AUC"}],
                        "layer": {"_target_": "tensorflow.keras.layers.Dense"},
                        "data": {"_target_": "trainer.data.digits"}})
        heavy = {"tensorflow", "keras", "mysteps.steps", "sklearn"} & set(sys.modules)
        assert not heavy, heavy
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(project)})
    assert p.returncode == 0, p.stderr


# --- in-process ----------------------------------------------------------------------------
@pytest.mark.parametrize("experiment", ["dense", "cnn", "gan", "pinn", "multitask", "finetune"])
def test_every_shipped_target_passes(make_cfg, experiment):
    validate(make_cfg(f"+experiment={experiment}", "metrics=[{_target_: keras.metrics.AUC}]"))


@pytest.mark.parametrize(("override", "message"), [
    ("metrics=[{_target_: keras.metrics.AUCC}]",
     "metrics[0]._target_=keras.metrics.AUCC: module keras.metrics ("),
    ("optimizer.learning_rate={_target_: keras.optimizers.schedules.CosineDecy}",
     "optimizer.learning_rate._target_=keras.optimizers.schedules.CosineDecy: module "
     "keras.optimizers.schedules ("),
    ("data._target_=trainer.data..digits", "data._target_=trainer.data..digits: not a dotted "
     "path to a class or function (module.name); fix the target"),
])
def test_nested_and_listed_targets_are_checked(make_cfg, override, message):
    with pytest.raises(UserError) as e:
        validate(make_cfg("+experiment=dense", override))
    assert str(e.value).startswith(message), e.value


def test_own_modules_lacking_the_name_or_not_parsing_fail_validation(project, make_cfg,
                                                                      monkeypatch):
    monkeypatch.syspath_prepend(str(project))
    with pytest.raises(UserError) as e:
        validate(make_cfg("+experiment=dense", "step._target_=mysteps.steps.PlainStp"))
    assert str(e.value) == (f"step._target_=mysteps.steps.PlainStp: module mysteps.steps "
                            f"({project / 'mysteps' / 'steps.py'}) has no name PlainStp (did "
                            "you mean mysteps.steps.PlainStep?); fix the target's spelling")
    with pytest.raises(UserError) as e:
        validate(make_cfg("+experiment=dense", "step._target_=mysteps.typo.Foo"))
    assert str(e.value).startswith("step._target_=mysteps.typo.Foo: module mysteps.typo exists "
                                   "but raises while importing: SyntaxError: ")
    validate(make_cfg("+experiment=dense", "step._target_=mysteps.steps.PlainStep"))
    assert "mysteps.steps" not in sys.modules  # found, not imported


def test_a_target_only_the_import_can_check_is_explained_when_built(project, monkeypatch):
    from trainer.driver.run import instantiate_node, metric_objects

    monkeypatch.syspath_prepend(str(project))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))  # mysteps leaves with the test
    # trainer's names are made lazily (a module __getattr__): only importing tells.
    with pytest.raises(UserError) as e:
        instantiate_node(OmegaConf.create({"model": {"_target_": "trainer.Nope"}}).model)
    assert str(e.value) == ("model._target_=trainer.Nope: module trainer has no submodule or "
                            "name Nope; fix the target's spelling")
    with pytest.raises(UserError) as e:
        instantiate_node(OmegaConf.create({"step": {"_target_": "mysteps.broken.Foo"}}).step)
    assert str(e.value).startswith("step._target_=mysteps.broken.Foo: module mysteps.broken "
                                   "exists but raises while importing: ModuleNotFoundError")
    with pytest.raises(UserError, match=r"^metrics\[0\]._target_=mysteps.broken.Foo: module"):
        metric_objects(OmegaConf.create([{"_target_": "mysteps.broken.Foo"}]))
