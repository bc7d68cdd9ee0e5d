"""The driver in two parts: ``build(cfg)`` returns the run's objects untrained, ``run(cfg)``
trains them and writes the outputs; a step is passed only the arguments it takes."""

import functools
import re
import subprocess
import sys

import pytest

from tests.conftest import FAST
from trainer.common.errors import UserError
from trainer.driver.run import StepArgument, build, step_kwargs


# --- the step's arguments, against signatures ----------------------------------------------
class Full:
    """Takes every argument the driver offers."""

    def __init__(self, *, model, optimizer, task="classification", regularizers=(),
                 unconnected_gradients="none", reset=None):
        self.kwargs = dict(model=model, optimizer=optimizer, task=task, regularizers=regularizers,
                           unconnected_gradients=unconnected_gradients, reset=reset)


class Bare:
    """A step with its own losses (a GAN): no task, regularizers, gradient policy or reset."""

    def __init__(self, *, model, optimizer, n_critic=5):
        self.n_critic = n_critic


class Forwarding:
    def __init__(self, *, model, optimizer, pcgrad=True, **kwargs):
        self.kwargs = kwargs


class NoOptimizer:
    def __init__(self, *, model):
        pass


def _offered(**changed):
    """What the driver offers at the config's defaults, with ``changed`` set away from them."""
    offered = {
        "model": StepArgument("M", "model", "a step must accept model", at_default=False),
        "optimizer": StepArgument("O", "optimizer", "a step must accept optimizer",
                                  at_default=False),
        "task": StepArgument("regression"),
        "regularizers": StepArgument([], "regularizer", "remove the regularizer group"),
        "unconnected_gradients": StepArgument("none", "tape.unconnected_gradients",
                                              "remove tape.unconnected_gradients"),
        "reset": StepArgument(None, "tape.reset", "remove tape.reset.when"),
    }
    for name, value in changed.items():
        old = offered[name]
        offered[name] = StepArgument(value, old.key, old.fix, at_default=False)
    return offered


def test_an_argument_the_signature_names_is_passed():
    kwargs = step_kwargs(Full, _offered(reset="policy"))
    assert kwargs == {"model": "M", "optimizer": "O", "task": "regression", "regularizers": [],
                      "unconnected_gradients": "none", "reset": "policy"}


def test_an_argument_at_its_default_the_step_does_not_take_is_dropped():
    assert step_kwargs(Bare, _offered()) == {"model": "M", "optimizer": "O"}


@pytest.mark.parametrize(("name", "value", "message"), [
    ("reset", "policy", "step tests.test_driver.Bare takes no tape.reset; "
                        "remove tape.reset.when"),
    ("regularizers", ["gp"], "step tests.test_driver.Bare takes no regularizer; "
                             "remove the regularizer group"),
    ("unconnected_gradients", "zero", "takes no tape.unconnected_gradients"),
])
def test_a_changed_argument_the_step_does_not_take_names_key_and_step(name, value, message):
    with pytest.raises(UserError, match=re.escape(message)):
        step_kwargs(Bare, _offered(**{name: value}))


def test_a_kwargs_signature_takes_everything():
    kwargs = step_kwargs(Forwarding, _offered(reset="policy"))
    assert set(kwargs) == set(_offered())


def test_a_partial_is_read_through_and_its_own_keywords_are_kept():
    """The configured step is ``functools.partial(cls, **step node)``: the node's values win."""
    factory = functools.partial(Full, task="classification", unconnected_gradients="zero")
    kwargs = step_kwargs(factory, _offered())
    assert "task" not in kwargs and "unconnected_gradients" not in kwargs
    assert factory(**kwargs).kwargs["task"] == "classification"
    assert set(step_kwargs(functools.partial(Bare, n_critic=2), _offered())) == {"model",
                                                                                 "optimizer"}
    with pytest.raises(UserError, match=r"tests\.test_driver\.Bare takes no tape\.reset"):
        step_kwargs(functools.partial(Bare, n_critic=2), _offered(reset="policy"))


def test_a_step_without_model_or_optimizer_is_an_error():
    with pytest.raises(UserError, match="NoOptimizer takes no optimizer"):
        step_kwargs(NoOptimizer, _offered())


class RecordingStep:
    """Enough of a step for ``build``: records its arguments, exposes its models."""

    def __init__(self, *, model, optimizer, **kwargs):
        self.model, self.optimizer, self.kwargs = model, optimizer, kwargs

    @property
    def models(self):
        return {"model": self.model}


class ModelAndOptimizerOnly(RecordingStep):
    def __init__(self, *, model, optimizer):
        super().__init__(model=model, optimizer=optimizer)


def test_composed_config_passes_the_step_what_it_takes(make_cfg, tmp_path):
    def step_of(target, *overrides):
        cfg = make_cfg("data=synthetic", "callbacks=none", *overrides)
        cfg.step = {"_target_": f"tests.test_driver.{target}", "_partial_": True}
        return build(cfg, run_dir=tmp_path).step

    step = step_of("RecordingStep", "regularizer=input_gradient", "tape.reset.when=[nonfinite]")
    assert step.kwargs["task"] == "regression" and step.kwargs["unconnected_gradients"] == "none"
    assert [type(r).__name__ for r in step.kwargs["regularizers"]] == ["InputGradientPenalty"]
    assert list(step.kwargs["reset"].when) == ["nonfinite"]
    assert step_of("ModelAndOptimizerOnly").kwargs == {}
    with pytest.raises(UserError, match=r"step tests\.test_driver\.ModelAndOptimizerOnly takes "
                                        r"no tape\.reset; remove tape\.reset\.when"):
        step_of("ModelAndOptimizerOnly", "tape.reset.when=[nonfinite]")
    with pytest.raises(UserError, match="takes no regularizer"):
        step_of("ModelAndOptimizerOnly", "regularizer=input_gradient")


# --- build and run ---------------------------------------------------------------------------
def test_build_returns_the_objects_untrained(make_cfg, tmp_path):
    r = build(make_cfg(*FAST, "tape.reset.when=[nonfinite]"), run_dir=tmp_path / "run")
    assert r.run_dir == tmp_path / "run" and r.run_dir.is_dir()
    assert isinstance(r.cfg, dict) and r.cfg["trainer"]["epochs"] == 2
    assert r.models == r.step.models and set(r.models) == {"model"}
    assert r.trainer.callbacks == r.callbacks and r.trainer.run_dir == str(r.run_dir)
    assert r.step.reset is not None and r.step.task == r.data.task == "regression"
    assert int(r.trainer.global_step.numpy()) == 0
    assert not (r.run_dir / "metrics.json").exists() and not (r.run_dir / "model.keras").exists()
    logs = r.trainer.fit(r.step, r.data)
    assert logs["step"] > 0


def test_build_validates_before_tensorflow_is_imported(tmp_path):
    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_module\n"
        "from trainer.driver.schemas import register_configs\n"
        "from trainer.common.errors import UserError\n"
        "from trainer.driver.run import build\n"
        "register_configs()\n"
        "with initialize_config_module('trainer.configs', version_base='1.3'):\n"
        "    cfg = compose('config', overrides=['data=csv'])\n"
        "try:\n"
        "    build(cfg)\n"
        "except UserError as e:\n"
        "    print(e)\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "config key data.path" in p.stdout and p.stdout.strip().endswith("False False")


def test_the_metrics_line_prints_significant_digits(make_cfg, tmp_path, caplog):
    """A small learning rate is printed as itself (1.5e-05), not rounded away to 0.0."""
    import logging

    from trainer.driver.run import run

    with caplog.at_level(logging.INFO, logger="trainer.driver.run"):
        run(make_cfg("data=synthetic", "model.hidden_units=[4]", "trainer.epochs=1",
                     "trainer.max_steps=2", "callbacks=none", "optimizer.learning_rate=1.5e-5"),
            run_dir=tmp_path)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("metrics:"))
    assert "train/learning_rate=1.5e-05" in line.split()
    assert "step=2" in line.split()  # counts are printed whole
