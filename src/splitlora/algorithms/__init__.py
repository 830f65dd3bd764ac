"""The four algorithms, each written once against the grid: ``splitlora``, ``sl``, ``fed``, ``cen``."""

from .base import Algorithm, StepResult
from .cen import CentralisedLoRA
from .fed import FedLoRA
from .sl import SplitLearning
from .splitlora import SplitLoRA

# The one registry of algorithm names.
ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (SplitLoRA, SplitLearning, FedLoRA, CentralisedLoRA)
}

__all__ = ["ALGORITHMS", "Algorithm", "StepResult"]
