"""The four algorithms, each written once against the grid: ``splitlora``, ``sl``, ``fed``, ``cen``."""

from ..registry import ALGORITHMS  # the one registry of algorithm names (built-ins, registered, entry points)
from .base import Algorithm, StepResult

__all__ = ["ALGORITHMS", "Algorithm", "StepResult"]
