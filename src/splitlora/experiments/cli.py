"""``splitlora experiment NAME`` (and ``python -m splitlora.experiments NAME``): the benchmarks' options."""

from __future__ import annotations

import argparse

DESCRIPTION = ("Run an experiment; write OUT/NAME.json, OUT/NAME.md and PNG plots. Experiments: quality (the E2E "
               "table on real data, about an hour on a 2-core CPU), privacy (what the server reconstructs, per "
               "split and defence) and ttq (validation loss vs simulated wall time under a latency model).")

EXAMPLE = "samples=480 --set seeds=0,1,2"


def register(subparsers) -> None:
    from ..bench.cli import add_arguments
    from . import EXPERIMENTS

    p = subparsers.add_parser("experiment", help="run an experiment (quality, privacy, ttq)", description=DESCRIPTION)
    add_arguments(p, EXPERIMENTS, example=EXAMPLE)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench.cli import options
    from . import run_experiment

    return run_experiment(args.name, options(args))


def main(argv: list[str] | None = None) -> int:
    import os
    import sys

    from ..bench.cli import add_arguments
    from ..errors import OneLineParser, run_command
    from . import EXPERIMENTS

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = OneLineParser(prog="python -m splitlora.experiments", description=DESCRIPTION)
    add_arguments(parser, EXPERIMENTS, example=EXAMPLE)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(run, args, "finished experiments were written")
