"""The one exception type the command line turns into a one-line message."""


class LmdistillError(ValueError):
    """A user-facing error: bad input, an unsupported model, a missing or corrupt file.

    The message says what is wrong and what to change; the CLI prints it without a traceback.
    """
