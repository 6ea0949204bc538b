"""Errors of the models package that the CLI reports as bad input (torch-free, so that
`attnbench --help` need not import torch)."""


class UnknownNameError(ValueError):
    """A mechanism, impl or preset name that is not registered; the message lists the valid ones."""
