"""The four algorithms on one engine: ``splitlora``, ``sl``, ``fed``, ``cen``."""

from .base import Algorithm, Context, StepResult
from .cen import CentralisedLoRA
from .fed import FedLoRA
from .sl import SplitLearning
from .splitlora import SplitLoRA

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (SplitLoRA, SplitLearning, FedLoRA, CentralisedLoRA)
}

__all__ = ["ALGORITHMS", "Algorithm", "Context", "StepResult"]
