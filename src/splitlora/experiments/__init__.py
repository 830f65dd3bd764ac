"""Experiments: ``splitlora experiment NAME``: long runs that measure what the method achieves, not what
the framework costs (that is ``splitlora bench``).

=========== ===================================================================================
``quality``   the paper's E2E table on real data: train all four, decode the 630 test MRs, score them
``privacy``   what the server reconstructs (tokens, labels) per split and defence, beside its utility
``ttq``       validation loss vs simulated wall time (:mod:`.latency`) for cen, fed, sl, splitlora
=========== ===================================================================================

They run as the benchmarks do (:func:`splitlora.bench.run_suite`): the same ``--out``, ``--device``,
``--quick`` and ``--set KEY=VALUE`` options, and the same ``OUT/NAME.json``, ``OUT/NAME.md`` and plots,
every table row carrying the command that reruns it. ``quality`` takes about an hour on an idle
2-core CPU.
"""

from __future__ import annotations

from ..bench import Suite, run_suite
from ..bench.common import Options

NAMES = ("quality", "privacy", "ttq")
EXPERIMENTS = Suite("experiment", "experiment", __name__, NAMES)


def run_experiment(name: str, opts: Options) -> int:
    """Run experiment ``name``; returns the exit code (1 if it crashed)."""
    return run_suite(EXPERIMENTS, name, opts)
