"""Freezing and unfreezing variables by glob patterns on their Keras paths."""

from __future__ import annotations

import fnmatch
import logging

from trainer.common.errors import UserError

log = logging.getLogger(__name__)


def matches(path: str, pattern: str) -> bool:
    """``pattern`` matches the whole path or a trailing part of it.

    ``mlp/dense_0/kernel`` is matched by ``mlp/dense_0/kernel``, ``dense_0/kernel``,
    ``dense_0/*`` and ``*kernel`` (``*`` also crosses ``/``).
    """
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*/" + pattern)


def _layers(models):
    for model in models:
        yield from model._flatten_layers(include_self=False, recursive=True)


def _matched(models, patterns, where):
    variables = [v for m in models for v in m.weights]
    chosen = {}
    for pattern in patterns:
        hits = [v for v in variables if matches(v.path, pattern)]
        if not hits:
            paths = ", ".join(sorted({v.path for v in variables}))
            raise UserError(f"{where}: pattern {pattern!r} matches no variable; paths: {paths}")
        chosen.update({id(v): v for v in hits})
    return chosen


def set_trainable(models, patterns, trainable: bool, *, where: str = "freeze.patterns") -> int:
    """Freeze (or unfreeze) the variables matched by ``patterns``; return how many.

    A layer all of whose variables match is switched the Keras way
    (``layer.trainable``), so e.g. BatchNormalization runs in inference mode while
    frozen; other matched variables are switched one by one. A pattern that
    matches nothing raises a ``UserError`` that lists the available paths.
    """
    models = list(models)
    chosen = _matched(models, patterns, where)
    # Only variables created trainable can be switched: unfreezing `bn/*` must not make
    # BatchNormalization's moving statistics trainable.
    switchable = {id(v) for layer in _layers(models) for v in layer._trainable_variables}
    chosen = {k: v for k, v in chosen.items() if k in switchable}
    for layer in _layers(models):
        own = layer._trainable_variables
        if own and all(id(v) in chosen for v in own):
            layer.trainable = trainable
    for v in chosen.values():
        v.trainable = trainable
    if trainable:
        # Unfreezing a variable inside a frozen layer: the layer must be trainable too,
        # or Keras keeps excluding its variables.
        for layer in _layers(models):
            own = layer._trainable_variables
            if any(id(v) in chosen for v in own) and not layer.trainable:
                siblings = [v for v in own if id(v) not in chosen and not v.trainable]
                layer.trainable = True
                for v in siblings:
                    v.trainable = False
    log.info("%s %d variables (%s)", "unfroze" if trainable else "froze", len(chosen),
             ", ".join(patterns))
    return len(chosen)


def require_trainable(models, patterns, *, where: str = "freeze.patterns") -> None:
    """Raise a ``UserError`` if ``patterns`` left no variable of ``models`` trainable.

    Call it after freezing a run's models. With nothing trainable the step takes
    no gradient and changes nothing, and Keras says nothing: the run would go
    through every epoch and report ``params/trainable`` 0. The message lists the
    layers, so the user can narrow the patterns to some of them.
    """
    models = list(models)
    if any(m.trainable_variables for m in models):
        return
    layers = sorted({v.path.rsplit("/", 1)[0] for m in models for v in m.weights})
    example = f"{layers[0]}/*" if layers else "some_layer/*"
    raise UserError(f"{where}={list(patterns)} freezes every variable, so nothing would "
                    f"train; freeze only some layers (e.g. {where}=[{example}]) of: "
                    f"{', '.join(layers)}")


def variable_rows(models) -> list[tuple[str, tuple, int, str]]:
    """``(path, shape, parameters, "trainable" | "frozen")`` for every variable."""
    rows = []
    for model in models:
        trainable = {id(v) for v in model.trainable_variables}
        # weights, not variables: random-seed state is not a parameter.
        for v in model.weights:
            count = 1
            for dim in v.shape:
                count *= int(dim)
            rows.append((v.path, tuple(v.shape), count,
                         "trainable" if id(v) in trainable else "frozen"))
    return rows


def param_counts(models) -> dict:
    """``params/trainable`` and ``params/frozen`` (non-trainable, as Keras counts them)."""
    rows = variable_rows(models)
    return {
        "params/trainable": sum(r[2] for r in rows if r[3] == "trainable"),
        "params/frozen": sum(r[2] for r in rows if r[3] == "frozen"),
    }


def variable_table(models) -> str:
    """The variable table as Markdown (shown in the log and in TensorBoard's text tab)."""
    lines = ["| variable | shape | parameters | status |", "| --- | --- | ---: | --- |"]
    for path, shape, count, status in variable_rows(models):
        lines.append(f"| {path} | {list(shape)} | {count:,} | {status} |")
    counts = param_counts(models)
    lines.append(f"| total | | {counts['params/trainable']:,} trainable, "
                 f"{counts['params/frozen']:,} frozen | |")
    return "\n".join(lines)
