"""The one exception type for mistakes a user can fix (bad config, bad data)."""


class UserError(Exception):
    """A problem in the user's config or data.

    The driver prints the message as one line and exits with status 2, so the
    message must name the culprit (key, file, column) and say how to fix it.
    """
