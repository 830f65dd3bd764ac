"""``python -m splitlora.bench NAME [--out DIR] [--device cpu|cuda] [--quick]``."""

import sys

from .cli import main

sys.exit(main())
