"""User-facing errors: the CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user (config, paths, data, model names). Never a bug in splitlora."""


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
