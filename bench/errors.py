"""Input errors: the CLI turns these into one red line and exit code 2, never a traceback."""

from attnbench.models.errors import UnknownNameError


class InputError(ValueError):
    """Bad user input (a value, a path, a combination of options); the message is the whole story."""


USER_ERRORS = (InputError, UnknownNameError)
