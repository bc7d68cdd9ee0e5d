"""What XLA's compilation errors mean (whether to compile with it is the compile plan's)."""

from __future__ import annotations

import re

from trainer.common.errors import UserError

_UNSUPPORTED = re.compile(r"unsupported operations when trying to compile graph \S+ on \S+: (\w+)")
_NO_KERNEL = re.compile(r"(\w+) \(No registered '")


class XlaCompileError(UserError):
    """``trainer.jit_compile=true`` and XLA cannot compile part of the step."""


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
