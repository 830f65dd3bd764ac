"""Building engine algorithms for benchmarks: one loaded model per process, any device."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..algorithms import ALGORITHMS, Algorithm, Context
from ..config import RunConfig
from ..data import PreparedData, prepare_data
from ..data.batching import IGNORE, batches_in_order
from ..models.loading import LoadedModel, load_model
from ..models.lora import add_lora, load_lora_state, whole_lora_config
from ..models.split import check_cut, make_part
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


class Evaluator:
    """Validation loss of any adapter state on fixed items (the unsplit model + the run's LoRA).

    Same computation as ``splitlora.eval.loss.mean_loss`` (token-weighted NLL of the completion
    tokens), with batches moved to ``device``.
    """

    def __init__(self, loaded: LoadedModel, cfg: RunConfig, items, device: str = "cpu", batch_size: int = 16):
        self.model = add_lora(make_part(loaded.model, "whole", cfg.cut_layer), whole_lora_config(loaded.model, cfg))
        self.model.to(device)
        self.items, self.device, self.batch_size = items, torch.device(device), batch_size
        self.pad_id = loaded.model.config.pad_token_id

    @torch.no_grad()
    def __call__(self, state) -> float:
        load_lora_state(self.model, state)
        self.model.eval()
        total, count = 0.0, 0
        for batch in batches_in_order(self.items, self.batch_size, self.pad_id):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                           ignore_index=IGNORE, reduction="sum"))
            count += int((labels != IGNORE).sum())
        return total / count if count else math.nan


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
