"""``splitlora bench NAME``: registered by ``splitlora.cli`` when this module is present."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from .bench.cli import DESCRIPTION, add_arguments

    p = subparsers.add_parser("bench", help="run benchmarks (overhead, scale, memory, wire, ttq, all; quality)",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .bench.cli import run

    return run(args)
