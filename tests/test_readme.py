"""The README's Python examples run as written."""

import re
import sys
import types
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _block(marker):
    (code,) = [b for b in BLOCKS if marker in b]
    return code


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
    from trainer.run import run

    cfg = make_cfg("+experiment=dense", "step._target_=readme_steps.ConfidencePenaltyStep",
                   "+step.beta=0.2", "trainer.max_steps=30", f"trainer.run_eagerly={eager}",
                   "callbacks=none")
    metrics = run(cfg, run_dir=tmp_path)
    # 10 classes (chance 0.1); 30 steps reach about 0.86.
    assert metrics["step"] == 30 and metrics["val/accuracy"] > 0.7


def test_custom_step_example_trains_on_weighted_data(make_cfg, tmp_path, readme_steps):
    from trainer.run import run

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


def test_readme_opens_with_the_two_commands_and_where_to_run_them():
    first = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    assert README.index("```bash") < README.index("\n## ")
    assert first.splitlines() == ["pip install -e . && python -m trainer +experiment=dense",
                                  "pip install -e '.[test]' && ruff check . && pytest"]
    intro = README[:README.index("\n## ")]
    assert "python -m venv .venv && . .venv/bin/activate" in intro


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
    """The streaming section's worked example: shards written with a plain
    tf.io.TFRecordWriter, the index command it shows, the meta.json it shows, the run."""
    import json
    import shlex

    from trainer.export_data import index_main
    from trainer.run import run

    monkeypatch.chdir(tmp_path)
    exec(_block("tf.io.TFRecordWriter("), {})
    (commands,) = [b for b in re.findall(r"```bash\n(.*?)```", README, flags=re.S)
                   if "--index" in b]
    index, train = commands.strip().splitlines()
    assert index.startswith("python -m trainer.export_data --index ")
    assert index_main(shlex.split(index)[3:]) == 0
    (shown,) = [b for b in re.findall(r"```json\n(.*?)```", README, flags=re.S)
                if '"format": "trainer.tfrecord"' in b]
    assert json.loads((tmp_path / "shards" / "mine" / "meta.json").read_text()) == json.loads(
        shown)
    assert train.startswith("python -m trainer ")
    metrics = run(make_cfg(*shlex.split(train)[3:], "trainer.max_steps=30", "callbacks=none"),
                  run_dir=tmp_path / "run")
    assert metrics["step"] == 30 and metrics["val/accuracy"] > 0.7, metrics
