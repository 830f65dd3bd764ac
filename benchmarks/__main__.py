"""``python -m benchmarks NAME [--out DIR] [--device cpu|cuda] [--quick]`` (same as ``splitlora bench``)."""

import sys

from splitlora.bench.cli import main

sys.exit(main(prog="python -m benchmarks"))
