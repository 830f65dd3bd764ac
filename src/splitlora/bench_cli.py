"""``splitlora bench NAME``: registered by ``splitlora.cli`` when this module is present.

The experiments that used to be benchmarks (``bench quality``, ``privacy``, ``ttq``) still run from here,
after a line that says where they moved (``splitlora experiment NAME``)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from .bench.cli import DESCRIPTION, add_arguments
    from .experiments import NAMES as MOVED

    p = subparsers.add_parser("bench", help="run benchmarks (overhead, scale, memory, wire, all; ray, gpu, secagg)",
                              description=DESCRIPTION)
    add_arguments(p, aliases=MOVED)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .bench.cli import run
    from .experiments import NAMES as MOVED

    if args.name in MOVED:
        import sys

        from .experiments.cli import run as run_experiment

        print(f"note: `splitlora bench {args.name}` moved to `splitlora experiment {args.name}`; running that",
              file=sys.stderr, flush=True)
        return run_experiment(args)
    return run(args)
