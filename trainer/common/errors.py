"""The one exception type for mistakes a user can fix (bad config, bad data)."""


class UserError(Exception):
    """A problem in the user's config or data.

    The driver prints the message as one line and exits with status 2, so the
    message must name the culprit (key, file, column) and say how to fix it.

    Raised while a ``tf.function`` traces (a step that reaches no variable, say),
    it still arrives as itself: AutoGraph would otherwise re-raise a new
    ``UserError`` whose message starts with its "in user code:" frames, and a
    subclass with its own ``__init__`` as a ``StagingError``. ``ag_pass_through``
    is AutoGraph's marker for exceptions it must re-raise untouched
    (``tensorflow/python/autograph/impl/api.py``); the driver also recovers the
    original message should a TensorFlow version ignore the marker.
    """

    ag_pass_through = True


def one_line_usage_errors(parser, usage: str) -> None:
    """Make ``parser`` (an ``argparse.ArgumentParser``) report a bad command line as one line,
    ``error: MESSAGE; usage: USAGE``, and exit with status 2, as a ``UserError`` is reported."""
    import sys

    def error(message):
        print(f"error: {message}; usage: {usage}", file=sys.stderr)
        sys.exit(2)

    parser.error = error
