"""Building engine algorithms for benchmarks: one loaded model per process, any device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algorithms import ALGORITHMS, Algorithm, Context
from ..config import RunConfig
from ..data import PreparedData, prepare_data
from ..models.loading import LoadedModel, load_model
from ..models.split import check_cut
from ..train import setup_torch
from .trace import CountingStream, StepTracer, TokenCounter, TracingLink, instrument_streams

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
    link: TracingLink
    data: PreparedData
    tokens: TokenCounter
    tracer: StepTracer | None = None


def build(cfg: RunConfig, loaded: LoadedModel, device: str = "cpu", data: PreparedData | None = None,
          trace: bool = False, count_flops: bool = True) -> Built:
    """An engine algorithm for ``cfg`` on ``loaded`` with counting streams on ``device``."""
    setup_torch(cfg)
    check_cut(loaded.model, cfg.cut_layer)
    data = data if data is not None else prepare_data(cfg, loaded.tokenizer)
    link = TracingLink(cfg.wire_dtype)
    algo = ALGORITHMS[cfg.algorithm](Context(cfg, loaded.model, data, link))
    streams: list[CountingStream] = instrument_streams(algo, device)
    tracer = StepTracer(algo, link, count_flops=count_flops) if trace else None
    return Built(cfg, algo, link, data, TokenCounter(streams), tracer)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
