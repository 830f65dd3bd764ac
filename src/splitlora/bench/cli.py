"""Argument parsing shared by ``splitlora bench``, ``splitlora experiment`` and ``python -m benchmarks``."""

from __future__ import annotations

import argparse

from ..flags import add_flags, dataclass_flags, given
from . import BENCH, Suite
from .common import Options

DESCRIPTION = ("Run benchmarks; write OUT/NAME.json, OUT/NAME.md and PNG plots (all: also OUT/summary.md). "
               "Benchmarks: overhead, scale, memory, wire, all (those four), and ray, gpu, secagg. The long "
               "experiments (quality, privacy, ttq) are splitlora experiment NAME.")


def add_arguments(p: argparse.ArgumentParser, suite: Suite = BENCH, aliases: tuple[str, ...] = (),
                  example: str = "models=gpt2-small --set clients=1,16") -> None:
    """NAME (one of ``suite.names``; ``aliases`` are accepted too, unlisted), the :class:`Options` flags,
    ``--set`` and ``--quiet``."""
    p.add_argument("name", choices=(*suite.names, *aliases), metavar="NAME", help=f"one of: {', '.join(suite.names)}")
    add_flags(p, dataclass_flags(Options).values(), sections=False)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override {'an' if suite.noun[0] in 'aeiou' else 'a'} {suite.noun} setting, e.g. --set "
                        f"{example} (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    if suite is BENCH:
        p.add_argument("--dry-run", action="store_true",
                       help="gpu: the same code on the CPU on a tiny model, in seconds (--quick --device cpu)")


def options(args: argparse.Namespace) -> Options:
    from ..config import split_set
    from ..errors import UserError

    opts = Options(**given(args, dataclass_flags(Options)),
                   sets={key: value.strip() for key, value in split_set(args.set).items()}, progress=not args.quiet)
    if opts.threads < 0:
        raise UserError(f"--threads must be >= 0 (got {opts.threads})")
    if getattr(args, "dry_run", False):
        opts.device, opts.quick = "cpu", True
    return opts


def run(args: argparse.Namespace) -> int:
    from . import run_benchmarks

    return run_benchmarks(args.name, options(args))


def main(argv: list[str] | None = None, prog: str = "python -m splitlora.bench") -> int:
    import os
    import sys

    from ..errors import OneLineParser, run_command

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = OneLineParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(run, args, "finished benchmarks were written")
