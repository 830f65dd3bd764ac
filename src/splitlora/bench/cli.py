"""Argument parsing shared by ``splitlora bench`` and ``python -m benchmarks``."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import NAMES
from .common import Options

DESCRIPTION = ("Run benchmarks; write OUT/NAME.json, OUT/NAME.md and PNG plots (all: also OUT/summary.md). "
               "Benchmarks: overhead, scale, memory, wire, ttq, all (those five), and quality (the E2E table on real "
               "data; not part of all).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=NAMES, metavar="NAME", help=f"one of: {', '.join(NAMES)}")
    p.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--quick", action="store_true", help="tiny-gpt2 and a few steps: a smoke run (used by tests)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a benchmark setting, e.g. --set models=gpt2-small --set clients=1,16 (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--dry-run", action="store_true",
                   help="gpu: the same code on the CPU on a tiny model, in seconds (--quick --device cpu)")


def options(args: argparse.Namespace) -> Options:
    from ..errors import UserError

    sets = {}
    for item in args.set:
        if "=" not in item:
            raise UserError(f"--set expects key=value (got {item!r})")
        key, value = item.split("=", 1)
        sets[key.strip()] = value.strip()
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0 (got {args.threads})")
    dry = getattr(args, "dry_run", False)
    return Options(out=Path(args.out), device="cpu" if dry else args.device, quick=args.quick or dry,
                   threads=args.threads, sets=sets, progress=not args.quiet)


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
