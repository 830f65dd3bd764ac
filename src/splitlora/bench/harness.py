"""Building engine algorithms for benchmarks: one loaded model per process, any device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algorithms import ALGORITHMS, Algorithm
from ..config import RunConfig
from ..data import PreparedData, prepare_data
from ..device import setup_torch
from ..models.loading import LoadedModel, load_model
from ..models.parts import SharedModel
from ..simulation.run import client_apps
from ..simulation.inprocess import InProcessGrid
from .trace import StepTracer, TokenCounter

_LOADED: dict[tuple[str, str], LoadedModel] = {}


def quiet_transformers() -> None:
    """No per-load progress bars or advisory warnings in benchmark output."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def loaded_model(name: str, device: str = "cpu") -> LoadedModel:
    """Load ``name`` once per process (frozen, on ``device``); runs share it (it is never modified)."""
    key = (name, device)
    if key not in _LOADED:
        quiet_transformers()
        loaded = load_model(name)
        loaded.model.requires_grad_(False)
        loaded.model.to(device)
        _LOADED[key] = loaded
    return _LOADED[key]


@dataclass
class Built:
    cfg: RunConfig
    algo: Algorithm
    grid: InProcessGrid
    data: PreparedData
    tokens: TokenCounter
    tracer: StepTracer | None = None


def build(cfg: RunConfig, loaded: LoadedModel, device: str = "cpu", data: PreparedData | None = None,
          trace: bool = False, count_flops: bool = True) -> Built:
    """An engine algorithm for ``cfg`` on ``loaded`` (every party on ``device``), observed through hooks."""
    setup_torch(cfg.seed, cfg.threads)
    source = SharedModel(loaded, cfg, device)
    data = data if data is not None else prepare_data(cfg, loaded.tokenizer)
    grid = InProcessGrid(client_apps(cfg, source, data, device), cfg.wire_dtype)
    algo = ALGORITHMS[cfg.algorithm](cfg, source, grid, device)
    algo.join(0)
    tokens = TokenCounter(grid.apps.values())
    tracer = StepTracer(algo, grid, count_flops=count_flops) if trace else None
    return Built(cfg, algo, grid, data, tokens, tracer)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
