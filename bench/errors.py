"""Input errors: the CLI turns these into one red line and exit code 2, never a traceback."""

from attnbench.models.errors import UnknownNameError


class InputError(ValueError):
    """Bad user input (a value, a path, a combination of options); the message is the whole story."""


class Interrupted(Exception):
    """Ctrl-C stopped a run; the message says what was kept and the command that continues it.
    The CLI prints it and exits 130 (the shell's code for SIGINT)."""


USER_ERRORS = (InputError, UnknownNameError)
