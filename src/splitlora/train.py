"""The training driver behind ``splitlora train``: load, step, log, validate, save one adapter."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from .algorithms import ALGORITHMS, Context
from .config import RunConfig
from .data import prepare_data
from .errors import UserError
from .eval.loss import mean_loss
from .models.loading import LoadedModel, load_model
from .models.lora import add_lora, load_lora_state, save_adapter, whole_lora_config
from .models.split import check_cut, make_part
from .runtime.metrics import MetricsLog
from .transport.inprocess import InProcessLink

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    out_dir: Path
    adapter_dir: Path
    adapter: dict[str, torch.Tensor]
    first_loss: float
    last_loss: float
    val_loss: float | None
    tokens: int
    seconds: float
    bytes_up: int
    bytes_down: int


class Validator:
    """The unsplit model with the run's whole-model LoRA, used to score any adapter state."""

    def __init__(self, model, cfg: RunConfig, items, pad_id: int, device: str | torch.device | None = None):
        """``device``: move the validation model there (None: stay on ``model``'s device)."""
        self.model = add_lora(make_part(model, "whole", cfg.cut_layer), whole_lora_config(model, cfg))
        if device is not None:
            self.model.to(device)
        self.items, self.pad_id = items, pad_id

    def __call__(self, state) -> float | None:
        if not self.items:
            return None
        load_lora_state(self.model, state)
        return mean_loss(self.model, self.items, self.pad_id)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device must be cpu, cuda, cuda:N or auto (got {name!r})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but no CUDA GPU is available")
    return device


def setup_torch(cfg: RunConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train(cfg: RunConfig, out_dir: str | Path, progress: bool = True, loaded: LoadedModel | None = None) -> RunResult:
    """Run ``cfg`` and write ``config.yaml``, ``metrics.jsonl``/``.csv`` and ``adapter/`` to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_torch(cfg)
    if not progress:
        transformers_logging.disable_progress_bar()
    loaded = loaded or load_model(cfg.model)
    model = loaded.model.to(resolve_device(cfg.device))
    model.requires_grad_(False)
    check_cut(model, cfg.cut_layer)
    cfg.save(out / "config.yaml")
    data = prepare_data(cfg, loaded.tokenizer)
    link = InProcessLink(cfg.wire_dtype)
    algo = ALGORITHMS[cfg.algorithm](Context(cfg, model, data, link))
    validate = Validator(model, cfg, data.val, model.config.pad_token_id)
    metrics = MetricsLog(out)
    adapter_dir = out / "adapter"

    first = last = float("nan")
    tokens_total, val = 0, None
    start = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc=cfg.algorithm, unit="step", disable=not progress, dynamic_ncols=True)
    t = 0
    try:
        for t in range(cfg.steps):
            up0, down0 = link.bytes_up, link.bytes_down
            result = algo.step(t)
            tokens_total += result.tokens
            first = result.loss if t == 0 else first
            last = result.loss
            elapsed = time.perf_counter() - start
            if (t + 1) % cfg.log_every == 0 or t == cfg.steps - 1:
                metrics.write({"step": t + 1, "loss": result.loss, "lr": _lr(algo), "tokens": result.tokens,
                               "tokens_total": tokens_total, "bytes_up": link.bytes_up - up0,
                               "bytes_down": link.bytes_down - down0, "bytes_up_total": link.bytes_up,
                               "bytes_down_total": link.bytes_down, "elapsed_s": round(elapsed, 4),
                               "tokens_per_s": tokens_total / elapsed if elapsed else 0.0})
            for event in result.events:
                metrics.write(event)
            if cfg.eval_every and (t + 1) % cfg.eval_every == 0 and t + 1 < cfg.steps:
                val = validate(algo.adapter_state())
                metrics.write({"event": "validation", "step": t + 1, "val_loss": val})
            if cfg.save_every and (t + 1) % cfg.save_every == 0 and t + 1 < cfg.steps:
                save_adapter(algo.adapter_state(), whole_lora_config(model, cfg), loaded.base_path,
                             out / "adapters" / f"step-{t + 1}")
            bar.set_postfix(loss=f"{result.loss:.3f}", tok_s=f"{tokens_total / max(elapsed, 1e-9):.0f}")
            bar.update(1)
        t = cfg.steps
        for event in algo.finish(t):
            metrics.write(event)
        seconds = time.perf_counter() - start
        state = algo.adapter_state()
        val = validate(state)
        metrics.write({"event": "validation", "step": t, "val_loss": val})
    except KeyboardInterrupt:
        # Keep what was trained: the adapter as of the last finished step.
        metrics.write({"event": "interrupted", "step": t})
        save_adapter(algo.adapter_state(), whole_lora_config(model, cfg), loaded.base_path, adapter_dir)
        raise
    finally:
        bar.close()
        metrics.close()
    save_adapter(state, whole_lora_config(model, cfg), loaded.base_path, adapter_dir)
    return RunResult(out, adapter_dir, state, first, last, val, tokens_total, seconds, link.bytes_up,
                     link.bytes_down)


def _lr(algo) -> float:
    """The learning rate now: the server's (splitlora, sl), the party's (cen) or the first client's (fed)."""
    party = getattr(algo, "server", None) or getattr(algo, "party", None) or algo.parties[0]
    return party.optimizer.lr
