"""The one exception type that carries a message meant for the user."""


class AtlasError(Exception):
    """Bad input or an unrecoverable condition, described in one line.

    The command line prints the message and exits non-zero, without a
    traceback. The message should say what was wrong, what was expected and,
    where possible, what to do.
    """
