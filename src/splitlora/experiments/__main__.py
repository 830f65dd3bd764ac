"""``python -m splitlora.experiments NAME [--out DIR] [--device cpu|cuda] [--quick] [--set KEY=VALUE]``."""

import sys

from .cli import main

sys.exit(main())
