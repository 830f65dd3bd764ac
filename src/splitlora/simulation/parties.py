"""The parties of a simulated run and the run itself: :func:`client_apps` (the clients, sharing one
model), :func:`build_simulation` (every party over an :class:`~splitlora.simulation.inprocess.InProcessGrid`)
and :func:`run_training` (the loop, the validation loss, the files of a run), which ``train`` runs in
this process and the Ray backend runs in its server actor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..algorithms import ALGORITHMS, Algorithm
from ..config import RunConfig
from ..data import prepare_data
from ..device import resolve_device
from ..eval.loss import mean_loss
from ..models.loading import LoadedModel, load_model
from ..models.lora import add_lora, load_lora_state, save_adapter
from ..models.parts import ModelSource, SharedModel
from ..models.precision import load_dtype
from ..models.split import make_part
from ..runtime.client import ClientApp
from ..runtime.loop import RunResult, Stopped, Totals, run_loop
from ..runtime.metrics import MetricsLog
from .inprocess import InProcessGrid


class Validator:
    """The unsplit model with the run's whole-model LoRA, used to score any adapter state."""

    def __init__(self, model, cfg: RunConfig, items, pad_id: int, device: str | torch.device | None = None):
        """``device``: move the validation model there (None: stay on ``model``'s device)."""
        from ..models.lora import whole_lora_config

        self.model = add_lora(make_part(model, "whole", cfg.cut_layer), whole_lora_config(model, cfg))
        if device is not None:
            self.model.to(device)
        self.items, self.pad_id = items, pad_id

    def __call__(self, state) -> float | None:
        if not self.items:
            return None
        load_lora_state(self.model, state)
        return mean_loss(self.model, self.items, self.pad_id)



def client_apps(cfg: RunConfig, source: ModelSource, data, device, indices=None) -> list[ClientApp]:
    """The simulated clients: the algorithm's parties, each with its data; only those of ``indices``
    when given (a Ray actor builds its share of them)."""
    algo = ALGORITHMS[cfg.algorithm]
    whole = algo.whole_clients
    apps = []
    for i in (range(algo.parties(cfg)) if indices is None else indices):
        items = algo.party_items(data, i)
        part = source.lora_part("whole" if whole else "client", device=device)
        apps.append(ClientApp(str(i), i, part, items, cfg, whole, source.pad_id, source.num_blocks))
    return apps


def build_simulation(cfg: RunConfig, loaded: LoadedModel | None = None):
    """``(source, data, grid, algorithm)``: every party of ``cfg`` in this process."""
    device = resolve_device(cfg.device)
    source = SharedModel(loaded or load_model(cfg.model, load_dtype(cfg)), cfg, device)
    data = prepare_data(cfg, source.tokenizer)
    grid = InProcessGrid(client_apps(cfg, source, data, device), cfg.wire_dtype)
    algo = ALGORITHMS[cfg.algorithm](cfg, source, grid, device)
    return source, data, grid, algo


def run_training(cfg: RunConfig, out: Path, source: ModelSource, data, algo: Algorithm, *, progress: bool = True,
                 metrics: MetricsLog | None = None, stop: Callable[[], str | None] | None = None) -> RunResult:
    """Train ``algo`` (over whatever grid it was built with) and write ``out``'s files as ``train`` does.

    ``source`` must hold the whole model (the validation loss is computed on it). ``stop()``: a reason to
    stop at the next round boundary (:class:`Stopped` is raised once the adapter is saved).
    """
    cfg.save(out / "config.yaml")
    validate = Validator(source.model, cfg, data.val, source.pad_id)
    whole_config = source.lora_config("whole")
    metrics = metrics if metrics is not None else MetricsLog(out)
    adapter_dir = out / "adapter"

    def snapshot(step: int) -> None:
        save_adapter(algo.adapter_state(), whole_config, source.base_path, out / "adapters" / f"step-{step}")

    totals = Totals()
    try:
        run_loop(cfg, algo, metrics, totals=totals, progress=progress, validate=validate, snapshot=snapshot,
                 stop=stop)
        state = algo.adapter_state()
        val = validate(state)
        metrics.write({"event": "validation", "step": totals.step, "val_loss": val})
    except (KeyboardInterrupt, Stopped) as exc:
        # Keep what was trained: the adapter as of the last finished step.
        event = {"event": "interrupted", "step": totals.step}
        if isinstance(exc, Stopped):
            event["reason"] = str(exc)
        metrics.write(event)
        save_adapter(algo.adapter_state(), whole_config, source.base_path, adapter_dir)
        raise
    finally:
        metrics.close()
    save_adapter(state, whole_config, source.base_path, adapter_dir)
    return RunResult(out, adapter_dir, state, totals.first_loss, totals.last_loss, val, totals.tokens,
                     totals.elapsed, totals.traffic.up, totals.traffic.down, totals.step)
