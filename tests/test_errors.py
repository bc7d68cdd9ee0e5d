"""Bad input, tried as a new user would (the README's Errors table, row by row).

Every row runs the real CLI: it must exit non-zero with one line naming the culprit and
the fix (Hydra's own message for composition errors), no traceback, and no checkpoint.
"""

import numpy as np
import pytest

from tests.helpers import cli

# Two steps with only the checkpoint callback, so "no checkpoint left behind" means something.
CHEAP = ["trainer.max_steps=2", "~callbacks.tensorboard", "~callbacks.profile",
         "~callbacks.progress"]
SYNTHETIC = ["data=synthetic", "data.n_samples=64"]


def _fails(tmp_path, *overrides, status=2) -> list[str]:
    """Run the CLI, check the common promises, return stderr's non-empty lines."""
    run_dir = tmp_path / "run"
    p = cli(*overrides, *CHEAP, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert p.returncode == status, p.stderr
    assert "Traceback" not in p.stderr and "in user code" not in p.stderr, p.stderr
    checkpoints = run_dir / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    if status == 2:
        # Ours: the last line, and the only one, is the error.
        assert lines[-1].startswith("error: "), p.stderr
        assert sum(line.startswith("error:") for line in lines) == 1, p.stderr
    return lines


# Mistakes caught while Hydra composes or the driver validates, before TensorFlow starts.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(["+resmue=true"],
                     "error: config key resmue does not exist", id="new-root-key-misspelt"),
        pytest.param(["+freeze.paterns=[dense_0/*]"],
                     "error: config key freeze.paterns does not exist (did you mean "
                     "freeze.patterns?); fix or remove the override +freeze.paterns=[dense_0/*]",
                     id="new-nested-key-misspelt"),
        pytest.param(["+trainer.epoch=3"],
                     "error: config key trainer.epoch does not exist (did you mean "
                     "trainer.epochs?); fix or remove the override +trainer.epoch=3",
                     id="hydras-hint-followed"),
        pytest.param(["data=csv"], "error: config key data.path: Missing mandatory value",
                     id="missing-mandatory-value"),
        pytest.param(["optimizer.learning_rate=-1"],
                     "error: optimizer.learning_rate=-1 must be a finite number >= 0",
                     id="negative-learning-rate"),
    ],
)
def test_validation_errors_are_one_line_and_exit_2(tmp_path, overrides, expected):
    assert _fails(tmp_path, *overrides)[-1].startswith(expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        pytest.param("trainer.epoch=3", "Key 'epoch' not in 'TrainerConfig'", id="unknown-key"),
        pytest.param("trainer.epochs=abc", "full_key: trainer.epochs", id="wrong-type"),
        pytest.param("+experiment=nope", "Could not find 'experiment/nope'",
                     id="unknown-experiment"),
    ],
)
def test_composition_errors_are_hydras_message_naming_the_key(tmp_path, override, expected):
    lines = _fails(tmp_path, override, status=1)
    assert any(expected in line for line in lines), lines
    assert lines[-1] == ("Set the environment variable HYDRA_FULL_ERROR=1 for a complete "
                         "stack trace.")


def _csv(text):
    def write(d):
        (d / "data.csv").write_text(text)
        return ["data=csv", f"data.path={d / 'data.csv'}", "data.target=label"]
    return write


def _npz(x, y):
    def write(d):
        np.savez(d / "data.npz", x=x, y=y)
        return ["data=npz", f"data.path={d / 'data.npz'}"]
    return write


@pytest.mark.slow
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(lambda d: ["data=npz", "data.path=missing.npz"],
                     "missing.npz: no such file; check data.path", id="missing-file"),
        pytest.param(_csv("a,label\n1,0\noops,1\n"),
                     "data.csv: line 3, column 'a': 'oops' is not a number", id="csv-text"),
        pytest.param(_csv("a,label\n1,0\nnan,1\n"),
                     "data.csv: line 3, column 'a' is 'nan'; clean the data or set "
                     "data.allow_nonfinite=true", id="csv-nan"),
        pytest.param(_npz(np.full((10, 3), np.nan), np.zeros(10)),
                     "data.npz: train features hold NaN or infinity (first at train row 0); "
                     "clean the data or set data.allow_nonfinite=true", id="npz-nan"),
        pytest.param(_csv("a,label\n"), "data.csv: the file has a header but no data rows",
                     id="csv-header-only"),
        pytest.param(_npz(np.zeros((0, 3)), np.zeros(0)), "data.npz: the data set is empty",
                     id="npz-no-rows"),
        pytest.param(lambda d: [*SYNTHETIC, "data.batch_size=100"],
                     "data.batch_size=100 is larger than the 48 training examples; lower "
                     "data.batch_size", id="batch-larger-than-data"),
    ],
)
def test_data_errors_name_the_file_and_the_fix(tmp_path, data, expected):
    assert expected in _fails(tmp_path, *data(tmp_path))[-1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(["trainer.epochs=0"], "error: trainer.epochs=0 must be at least 1",
                     id="zero-epochs"),
        pytest.param(["freeze.patterns=[nope/*]"],
                     "error: freeze.patterns: pattern 'nope/*' matches no variable; paths: "
                     "mlp/dense_0/bias", id="freeze-pattern-matches-nothing"),
        pytest.param(["metrics=[auc]"],
                     "error: metrics: 'auc' is not a metric node; write each entry as "
                     "{_target_: keras.metrics.AUC}", id="metric-not-a-node"),
        pytest.param(["data.task=classification", "data.class_weight={12:2.0}"],
                     "error: data.class_weight: class 12 is not a class of synthetic "
                     "classification (classes 0-2)", id="class-weight-unknown-class"),
        pytest.param(["data.class_weight=balanced"],
                     "error: data.class_weight is set but synthetic regression is a regression "
                     "task", id="class-weight-regression"),
        pytest.param(["trainer.limit_train_batches=0"],
                     "error: trainer.limit_train_batches=0 must be an integer >= 1 (batches)",
                     id="limit-train-batches"),
        pytest.param(["trainer.val_every_n_steps=0"],
                     "error: trainer.val_every_n_steps=0 must be an integer >= 1",
                     id="val-every-n-steps"),
        pytest.param(["freeze.patterns=[*]"],
                     "error: freeze.patterns=['*'] freezes every variable, so nothing would "
                     "train", id="freeze-everything"),
        pytest.param(["regularizer=input_gradient", "+regularizer.input_gradient.wieght=1"],
                     "error: trainer.regularizers.InputGradientPenalty: Regularizer.__init__() "
                     "got an unexpected keyword argument 'wieght'", id="misspelt-untyped-key"),
    ],
)
def test_build_errors_are_one_line(tmp_path, overrides, expected):
    assert _fails(tmp_path, *SYNTHETIC, *overrides)[-1].startswith(expected)


def test_require_trainable_names_the_patterns_and_the_layers():
    import keras

    from trainer.common.errors import UserError
    from trainer.step.freezing import require_trainable, set_trainable

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="body"),
                              keras.layers.Dense(1, name="head")], name="net")
    set_trainable([model], ["body/*"], False)
    require_trainable([model], ["body/*"])  # the head still trains
    set_trainable([model], ["*"], False)
    with pytest.raises(UserError, match=r"^freeze.patterns=\['\*'\] freezes every variable.*"
                                        r"e.g. freeze.patterns=\[net/body/\*\]\) of: net/body, "
                                        r"net/head$"):
        require_trainable([model], ["*"])


STEP_WITHOUT_GRADIENT = '''
import tensorflow as tf
from trainer import TapeStep


class DetachedStep(TapeStep):
    """A loss the tape cannot trace back to any variable."""

    def compute_loss(self, x, y, training):
        logits = tf.stop_gradient(self.model(x, training=training))
        return tf.reduce_mean(logits), logits
'''


@pytest.mark.slow
def test_an_error_raised_while_the_step_traces_is_one_line(tmp_path):
    (tmp_path / "detached.py").write_text(STEP_WITHOUT_GRADIENT)
    lines = _fails(tmp_path, *SYNTHETIC, "step._target_=detached.DetachedStep")
    assert lines[-1] == ("error: the loss reaches none of the trainable variables; check "
                         "compute_loss and freeze.patterns")


def test_one_line_recovers_the_message_autograph_wraps(monkeypatch):
    """Should AutoGraph stop honouring ``ag_pass_through``, the driver still prints the
    original message: simulate it by removing the marker and tracing a raising function."""
    import tensorflow as tf

    from trainer.common.errors import UserError
    from trainer.driver.run import _one_line

    monkeypatch.delattr(UserError, "ag_pass_through")

    @tf.function
    def fails(x):
        if x.shape[0] == 2:
            raise UserError("data.path is wrong; fix it")
        return x

    with pytest.raises(UserError) as wrapped:
        fails(tf.zeros([2]))
    assert "in user code" in str(wrapped.value)
    assert _one_line(wrapped.value) == "data.path is wrong; fix it"


def test_user_error_passes_through_tracing_as_itself():
    import tensorflow as tf

    from trainer.common.errors import UserError

    error = UserError("freeze.patterns is wrong; fix it")

    @tf.function
    def fails(x):
        raise error

    with pytest.raises(UserError) as caught:
        fails(tf.zeros([2]))
    assert caught.value is error


def test_new_keys_are_accepted_where_the_config_takes_them(make_cfg, monkeypatch):
    """A custom step's own argument, a new callback and a new regularizer are not typos."""
    import sys
    import types

    from trainer.driver.run import validate

    # The targets' module must exist (validation checks it), not its names: an imported
    # module without a source is taken at its word until it is built.
    monkeypatch.setitem(sys.modules, "my", types.ModuleType("my"))
    validate(make_cfg("step._target_=my.Step", "+step.beta=0.2",
                      "+callbacks.spy._target_=my.Spy", "+regularizer.mine._target_=my.Reg",
                      "+model.width=16", "model._target_=my.model"))


@pytest.mark.slow
def test_resume_from_a_path_that_does_not_exist(tmp_path):
    lines = _fails(tmp_path, *SYNTHETIC, f"trainer.resume={tmp_path / 'nowhere'}")
    assert lines[-1].startswith(f"error: trainer.resume={tmp_path / 'nowhere'}: does not exist")


@pytest.mark.slow
def test_resume_from_a_checkpoint_of_another_model(tmp_path):
    first = tmp_path / "first"
    p = cli(*SYNTHETIC, *CHEAP, "model.hidden_units=[8]", f"hydra.run.dir={first}",
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    lines = _fails(tmp_path, *SYNTHETIC, "model.hidden_units=[16]",
                   f"trainer.resume={first}")
    assert lines[-1].startswith(f"error: checkpoint {first}/checkpoints/ckpt-2 was written by "
                                "another model or config (shapes differ: ")


@pytest.mark.slow
def test_resume_from_a_checkpoint_of_another_format_version(tmp_path):
    import tensorflow as tf

    first = tmp_path / "first"
    p = cli(*SYNTHETIC, *CHEAP, f"hydra.run.dir={first}", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    # Written again without its format_version, as checkpoints were before versions.
    path = str(first / "checkpoints" / "ckpt-2")
    reader = tf.train.load_checkpoint(path)
    dtypes = {k: v for k, v in reader.get_variable_to_dtype_map().items()
              if not k.startswith("format_version/")}
    tf.raw_ops.SaveV2(prefix=path, tensor_names=list(dtypes),
                      shape_and_slices=[""] * len(dtypes),
                      tensors=[tf.constant(reader.get_tensor(k), dtype=d)
                               for k, d in dtypes.items()])
    lines = _fails(tmp_path, *SYNTHETIC, f"trainer.resume={first}")
    assert lines[-1].startswith(f"error: checkpoint {path} has format version 1, this trainer "
                                "reads version 2: ")
