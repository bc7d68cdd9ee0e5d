"""The weight-averaging and SAM table of ``docs/averaging.md``, measured again.

    python scripts/robustness.py                      # dense and cnn, seeds 0 1 2
    python scripts/robustness.py --experiments dense --seeds 0 --out results.json

For each experiment, seed and variant (plain, EMA, SWA, SAM, ASAM) trains the experiment in
process (``trainer.driver.run.build`` then ``fit``: the shipped weights, the average where
there is one), then measures on its validation set the clean accuracy, the accuracy under
FGSM (one signed-gradient step of size ``--fgsm`` on the inputs, clipped to [0, 1]) and
under Gaussian noise (standard deviation ``--noise``, a fixed draw), and the top Hessian
eigenvalue of the training loss on the first 512 training examples
(``trainer.step.hessian.top_eigenvalue``, 50 power iterations). Prints the table of means
and standard deviations over the seeds, and writes every value as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

VARIANTS = {
    "plain": [],
    "EMA": ["trainer.ema.decay=0.999", "trainer.ema.warmup=true"],
    "SWA": ["trainer.swa.start_epoch=30"],
    "SAM": ["step=sam", "step.rho=0.05"],
    "ASAM": ["step=sam", "step.adaptive=true", "step.rho=0.5"],
}


def _compose(overrides):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from trainer.driver.schemas import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module("trainer.configs", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def measure(experiment: str, seed: int, variant: str, *, fgsm: float, noise: float) -> dict:
    import keras
    import numpy as np
    import tensorflow as tf

    from trainer.callbacks.sharpness import fixed_examples
    from trainer.driver.run import build
    from trainer.step.hessian import SharpnessOptions, top_eigenvalue

    keras.backend.clear_session()
    cfg = _compose([f"+experiment={experiment}", f"seed={seed}", "callbacks=none",
                    *VARIANTS[variant]])
    with tempfile.TemporaryDirectory() as run_dir:
        r = build(cfg, run_dir)
        start = time.monotonic()
        r.trainer.fit(r.step, r.data)
        seconds = time.monotonic() - start
    model, data = r.models["model"], r.data
    x = tf.constant(data.x_val)
    y = tf.constant(data.y_val)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def accuracy(inputs) -> float:
        logits = model(inputs, training=False)
        return float(np.mean(np.argmax(logits.numpy(), axis=-1) == data.y_val.reshape(-1)))

    with tf.GradientTape() as tape:
        tape.watch(x)
        value = loss(y, model(x, training=False))
    adversarial = tf.clip_by_value(x + fgsm * tf.sign(tape.gradient(value, x)), 0.0, 1.0)
    noisy = x + tf.random.stateless_normal(x.shape, seed=[seed, 1]) * noise
    examples = fixed_examples(data, 512)
    variables = r.trainer.trainable_variables
    top = tf.function(lambda: top_eigenvalue(
        lambda: r.trainer.inference_loss(examples), variables, tf.constant([seed, 7], tf.int64),
        SharpnessOptions(iterations=50, tolerance=1e-4)))()
    return {"experiment": experiment, "seed": seed, "variant": variant,
            "accuracy": accuracy(x), "fgsm": accuracy(adversarial), "noise": accuracy(noisy),
            "top_eigenvalue": float(top), "train_seconds": seconds}


def table(rows: list[dict]) -> str:
    lines = ["| experiment | variant | val accuracy | FGSM accuracy | noise accuracy | "
             "top Hessian eigenvalue |", "| --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["experiment"], r["variant"]) for r in rows},
                  key=lambda k: (k[0], list(VARIANTS).index(k[1])))
    for experiment, variant in keys:
        group = [r for r in rows if (r["experiment"], r["variant"]) == (experiment, variant)]
        cells = []
        for name, digits in (("accuracy", 4), ("fgsm", 4), ("noise", 4), ("top_eigenvalue", 2)):
            values = [r[name] for r in group]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}")
        lines.append(f"| {experiment} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", nargs="+", default=["dense", "cnn"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--fgsm", type=float, default=0.05)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--out", default="robustness.json")
    args = parser.parse_args()
    rows = []
    for experiment in args.experiments:
        for seed in args.seeds:
            for variant in args.variants:
                row = measure(experiment, seed, variant, fgsm=args.fgsm, noise=args.noise)
                print(json.dumps(row), flush=True)
                rows.append(row)
                with open(args.out, "w") as f:
                    json.dump(rows, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
