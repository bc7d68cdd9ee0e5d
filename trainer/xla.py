"""XLA in one place: whether to compile with it, and what its compilation errors mean."""

from __future__ import annotations

import logging
import re

from trainer.errors import UserError

log = logging.getLogger(__name__)

#: ``jit_compile="auto"`` considers XLA for in-memory runs of at least this many steps
#: (the compilation takes 1-3 s here, XLA saves ~0.1 ms a step on a small MLP when it is
#: faster at all), and times both compilations to decide (``trainer.calibrate``).
AUTO_XLA_MIN_STEPS = 10_000
JIT_CHOICES = (True, False, "auto")
#: ``choose_xla``'s answer when only timing both compilations can tell.
MEASURE = "measure"

_UNSUPPORTED = re.compile(r"unsupported operations when trying to compile graph \S+ on \S+: (\w+)")
_NO_KERNEL = re.compile(r"(\w+) \(No registered '")


class XlaCompileError(UserError):
    """``trainer.jit_compile=true`` and XLA cannot compile part of the step."""


def check_jit_compile(value):
    """``True``, ``False`` or ``"auto"``."""
    if not (isinstance(value, bool) or value == "auto"):
        raise UserError(f"trainer.jit_compile={value!r} must be auto, true or false")
    return value


def choose_xla(jit_compile, *, fused: bool, run_eagerly: bool, planned_steps: float,
               distributed: bool = False):
    """Whether to compile with XLA: as configured; for ``"auto"``, ``MEASURE`` when the
    whole execution can be one XLA program (an in-memory source) and the run is long
    enough for the compilation to pay back: the trainer then times both compilations
    and keeps the faster (``trainer.calibrate``); else False. Never under a strategy:
    an XLA program that updates variables cannot reach the other replicas' devices."""
    if distributed:
        if jit_compile is True:
            log.info("trainer.jit_compile=true under a tf.distribute strategy: XLA compiles "
                     "the step's forward pass and gradients (steps that can split them from "
                     "their update: TapeStep), the update runs without it (a compiled update "
                     "cannot reach the other replicas' variables)")
        return False
    if jit_compile != "auto":
        return bool(jit_compile)
    if fused and not run_eagerly and planned_steps >= AUTO_XLA_MIN_STEPS:
        return MEASURE
    return False


def xla_failure(error: Exception) -> str | None:
    """If ``error`` is XLA failing to compile: the rejected ops and where they were made.

    XLA's own message is a page of graph names; this keeps the rejected op types
    and the innermost ``File ...`` line of the code that created them. None for
    any other error.
    """
    text = _text(error)
    if "XLA" not in text or not ("compile" in text or "tf2xla" in text):
        return None
    ops = sorted(set(_NO_KERNEL.findall(text)) | set(_UNSUPPORTED.findall(text)))
    where = [line.strip() for line in text.splitlines() if line.strip().startswith("File ")]
    detail = f"no XLA kernel for {', '.join(ops)}" if ops else text.strip().splitlines()[0][:300]
    if where:
        detail += f", created at {where[-1]}"
    return detail


def raise_if_xla_error(error: Exception, what: str, regularizers=()) -> None:
    """Turn an XLA compilation failure into one line; return quietly for other errors.

    Every regularizer runs its penalty under the name scope ``Regularizer.scope``
    and XLA's error names the node it could not compile, so a failing regularizer
    is named without compiling anything again; otherwise the error names the ops
    and where they were created (``what`` says which function failed).
    """
    detail = xla_failure(error)
    if detail is None:
        return
    text = _text(error)
    for reg in regularizers:
        if f"{reg.scope}/" in text:
            op = _UNSUPPORTED.search(text) or _NO_KERNEL.search(text)
            kernel = f" (no XLA kernel for {op.group(1)})" if op else ""
            raise XlaCompileError(
                f"XLA cannot compile regularizer {reg.name}{kernel}; set trainer.jit_compile=false "
                "to run it without XLA"
            ) from None
    raise XlaCompileError(
        f"trainer.jit_compile=true: XLA cannot compile {what} ({detail}); replace that op with "
        "one XLA supports, or set trainer.jit_compile=false"
    ) from None


def _text(error: Exception) -> str:
    return getattr(error, "message", None) or str(error)
