"""User-facing errors: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user (config, paths, data, model names). Never a bug in splitlora."""


def require(module: str, extra: str, what: str) -> None:
    """A one-line :class:`UserError` when the optional ``module`` (from ``splitlora[extra]``) is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs {module}, which is not installed: pip install 'splitlora[{extra}]'")


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one ``error:`` line and exit code 2 (argparse would print the usage too)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace, interrupted: str) -> int:
    """``func(args)``'s exit code; a :class:`UserError` is one ``error:`` line and 2, Ctrl-C is 130."""
    try:
        return func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130


def positive_int(text: str) -> int:
    """argparse ``type=`` for a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
