"""Errors that tell a user's mistake from a bug.

:class:`UserError` is the base of every error that means "fix what you typed or pointed at": a config key, a model
folder, a dataset, an output path, a run directory that holds a run or is in use, a checkpoint that cannot be
trusted. Its message is one line that says what is wrong and what to do. The command line prints it and exits with
code 2 (``drpo.cli``), and catches nothing else that way: any other exception is a bug and keeps its traceback.

Each layer names its own mistakes as subclasses (``ConfigError``, ``ModelLoadError``, ``EngineUnavailable``, ...),
most with the built-in type they were before as a second base (``ValueError``, ``FileExistsError``), so that code
catching those still does; :class:`InputError` is for a file or an option the user gave that has no class of its
own (a dataset row, a grid file, a benchmark name).
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake in the input (see the module docstring); the message is one line."""


class InputError(UserError, ValueError):
    """A file or an option the user gave is not usable (the message names it, and the line when it has one)."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an error's message, or its type's name when it has none."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
