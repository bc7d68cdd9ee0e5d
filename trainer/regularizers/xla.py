"""Name the regularizer when XLA cannot compile it, instead of a page of graph-compiler output."""

from __future__ import annotations

import re

from trainer.errors import UserError

_UNSUPPORTED = re.compile(r"unsupported operations when trying to compile graph \S+ on \S+: (\w+)")


def raise_if_xla_failure(error: Exception, step) -> None:
    """Raise a ``UserError`` naming the regularizer whose ops XLA failed to compile.

    Every regularizer runs its penalty under the name scope ``regularizer_<name>``
    (``Regularizer.scope``), and XLA's error names the node it could not compile,
    so the culprit is found without compiling anything again. Returns quietly
    when the error does not come from a regularizer (the caller re-raises it).
    """
    message = getattr(error, "message", None) or str(error)
    if "XLA" not in message:
        return
    for reg in getattr(step, "regularizers", ()):
        if f"{reg.scope}/" in message:
            op = _UNSUPPORTED.search(message)
            what = f" (no XLA kernel for {op.group(1)})" if op else ""
            raise UserError(
                f"XLA cannot compile regularizer {reg.name}{what}; set trainer.jit_compile=false "
                "to run it without XLA"
            ) from None
