"""The one exception type users see."""


class LrsdError(Exception):
    """A user-facing failure: bad input, bad option or an unusable model.

    The message is one line; the CLI prints it without a traceback and exits 1
    (usage errors: 2).
    """
