"""The training loop behind ``splitlora train`` and ``splitlora serve``: step, log, validate, save one adapter.

:func:`run_loop` is the one loop: it drives any algorithm over any grid (in process, gRPC, Ray),
writes one metrics row per step (:func:`step_row`), and, when given a checkpointer, checkpoints at
the points where server and clients agree. :func:`train` builds the simulation (every party in this
process, sharing one model) and runs it with :func:`run_training`; with ``backend`` ray the same
:func:`run_training` runs in the server's Ray actor over a :class:`~splitlora.transport.ray_grid.RayGrid`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from .algorithms import ALGORITHMS, Algorithm
from .config import RayOptions, RunConfig
from .data import prepare_data
from .device import resolve_device, retune_threads, setup_torch
from .eval.loss import mean_loss
from .models.loading import LoadedModel, load_model
from .models.lora import add_lora, load_lora_state, save_adapter
from .models.parts import ModelSource, SharedModel
from .models.split import make_part
from .runtime.client import ClientApp
from .runtime.grid import Traffic
from .runtime.metrics import MetricsLog
from .transport.inprocess import InProcessGrid

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    out_dir: Path
    adapter_dir: Path
    adapter: dict[str, torch.Tensor]
    first_loss: float | None
    last_loss: float | None
    val_loss: float | None
    tokens: int
    seconds: float
    bytes_up: int
    bytes_down: int
    steps_done: int = 0
    finished: bool = True
    wire_bytes_up: int = 0
    wire_bytes_down: int = 0


@dataclass
class Totals:
    """What a run has done so far (kept in a checkpoint, so a resumed run continues its counts)."""

    step: int = 0  # the next step to run
    tokens: int = 0
    elapsed: float = 0.0  # seconds of training before this process
    first_loss: float | None = None
    last_loss: float | None = None
    traffic: Traffic = field(default_factory=Traffic)


class Stopped(Exception):
    """The run stops before its last step (Ctrl-C on a server, or too few clients)."""


class Validator:
    """The unsplit model with the run's whole-model LoRA, used to score any adapter state."""

    def __init__(self, model, cfg: RunConfig, items, pad_id: int, device: str | torch.device | None = None):
        """``device``: move the validation model there (None: stay on ``model``'s device)."""
        from .models.lora import whole_lora_config

        self.model = add_lora(make_part(model, "whole", cfg.cut_layer), whole_lora_config(model, cfg))
        if device is not None:
            self.model.to(device)
        self.items, self.pad_id = items, pad_id

    def __call__(self, state) -> float | None:
        if not self.items:
            return None
        load_lora_state(self.model, state)
        return mean_loss(self.model, self.items, self.pad_id)


def step_row(t: int, result, algo: Algorithm, totals: Totals, traffic: Traffic, elapsed: float) -> dict:
    """The metrics row of step ``t`` (the one format, for train and serve alike)."""
    row = {"step": t + 1, "loss": result.loss, "lr": algo.lr, "tokens": result.tokens,
           "tokens_total": totals.tokens, "bytes_up": traffic.up, "bytes_down": traffic.down,
           "bytes_up_total": totals.traffic.up, "bytes_down_total": totals.traffic.down,
           "elapsed_s": round(elapsed, 4), "tokens_per_s": totals.tokens / elapsed if elapsed else 0.0,
           "clients": result.clients}
    if totals.traffic.wire_up or totals.traffic.wire_down:
        row["wire_bytes_up"], row["wire_bytes_down"] = traffic.wire_up, traffic.wire_down
    return row


def run_loop(cfg: RunConfig, algo: Algorithm, metrics: MetricsLog, *, totals: Totals | None = None,
             progress: bool = True, desc: str | None = None, validate: Callable | None = None,
             snapshot: Callable[[int], None] | None = None, checkpointer=None,
             stop: Callable[[], str | None] | None = None) -> Totals:
    """Run ``algo`` from ``totals.step`` to ``cfg.steps``; returns the totals (``step`` = steps done).

    ``validate(state)``: validation loss every ``eval_every`` steps (simulation). ``snapshot(t)``:
    called every ``save_every`` steps. ``checkpointer``: ``due(step)`` and ``save(algo, totals)``,
    tried whenever ``algo.consistent``. ``stop()``: a reason to stop at the next consistent point.
    Raises :class:`Stopped` when the run stops early; ``totals`` then holds what was done.
    """
    totals = totals or Totals()
    grid = algo.grid
    if totals.step < cfg.steps:
        algo.join(totals.step)  # waits (deployed) until the clients are in
    clock = time.perf_counter()  # training time starts when they are
    bar = tqdm(total=cfg.steps, initial=totals.step, desc=desc or cfg.algorithm, unit="step",
               disable=not progress, dynamic_ncols=True)

    def elapsed() -> float:
        return totals.elapsed + (time.perf_counter() - clock)

    try:
        while totals.step < cfg.steps:
            t = totals.step
            if not cfg.threads:
                retune_threads()  # --threads 0: follow the machine's load (a syscall: free)
            reason = stop() if stop is not None else None
            if reason and algo.consistent:
                raise Stopped(reason)
            before = grid.traffic.copy()
            result = algo.step(t)
            if not result.ran:
                continue  # nobody took part: admit again and rerun step t
            spent = grid.traffic - before
            totals.step, totals.tokens = t + 1, totals.tokens + result.tokens
            totals.traffic = grid.traffic.copy()
            if result.loss is not None:
                totals.first_loss = result.loss if totals.first_loss is None else totals.first_loss
                totals.last_loss = result.loss
            if (t + 1) % cfg.log_every == 0 or t + 1 == cfg.steps:
                metrics.write(step_row(t, result, algo, totals, spent, elapsed()))
            for event in result.events:
                metrics.write(event)
            if validate is not None and cfg.eval_every and (t + 1) % cfg.eval_every == 0 and t + 1 < cfg.steps:
                metrics.write({"event": "validation", "step": t + 1, "val_loss": validate(algo.adapter_state())})
            if snapshot is not None and cfg.save_every and (t + 1) % cfg.save_every == 0 and t + 1 < cfg.steps:
                snapshot(t + 1)
            if checkpointer is not None and algo.consistent and t + 1 < cfg.steps and checkpointer.due(t + 1):
                totals.elapsed = elapsed()
                clock = time.perf_counter()
                checkpointer.save(algo, totals)
            shown = {"loss": f"{result.loss:.3f}" if result.loss is not None else "-",
                     "tok_s": f"{totals.tokens / max(elapsed(), 1e-9):.0f}"}
            if result.clients != cfg.clients and cfg.algorithm not in ("cen", "sl"):
                shown["clients"] = result.clients
            bar.set_postfix(**shown)
            bar.update(1)
        for event in algo.finish(totals.step):
            metrics.write(event)
        totals.traffic = grid.traffic.copy()
        totals.elapsed = elapsed()
        return totals
    except BaseException:
        totals.elapsed = elapsed()
        totals.traffic = grid.traffic.copy()
        raise
    finally:
        bar.close()


# ---- the simulation ---------------------------------------------------------------------------------

def client_apps(cfg: RunConfig, source: ModelSource, data, device, indices=None) -> list[ClientApp]:
    """The simulated clients: one per partition (``cen``: one party on the pooled data); only those of
    ``indices`` when given (a Ray actor builds its share of them)."""
    algo = ALGORITHMS[cfg.algorithm]
    whole = algo.whole_clients
    n = 1 if cfg.algorithm == "cen" else cfg.clients
    apps = []
    for i in (range(n) if indices is None else indices):
        items = data.train if cfg.algorithm == "cen" else data.client_items(i)
        part = source.lora_part("whole" if whole else "client", device=device)
        apps.append(ClientApp(str(i), i, part, items, cfg, whole, source.pad_id, source.num_blocks))
    return apps


def build_simulation(cfg: RunConfig, loaded: LoadedModel | None = None):
    """``(source, data, grid, algorithm)``: every party of ``cfg`` in this process."""
    device = resolve_device(cfg.device)
    source = SharedModel(loaded or load_model(cfg.model), cfg, device)
    data = prepare_data(cfg, source.tokenizer)
    grid = InProcessGrid(client_apps(cfg, source, data, device), cfg.wire_dtype)
    algo = ALGORITHMS[cfg.algorithm](cfg, source, grid, device)
    return source, data, grid, algo


def train(cfg: RunConfig, out_dir: str | Path, progress: bool = True, loaded: LoadedModel | None = None,
          backend: "RayOptions | None" = None, observers: list | None = None) -> RunResult:
    """Run ``cfg`` and write ``config.yaml``, ``metrics.jsonl``/``.csv`` and ``adapter/`` to ``out_dir``.

    ``observers`` (in process): called as ``fn(direction, client, message, nbytes)`` for every message
    that crosses the cut (the leakage audit records what the server receives this way).

    ``backend``: :class:`~splitlora.config.RayOptions`; with ``backend="ray"`` the clients are Ray
    actors and the server one more (:mod:`splitlora.transport.ray_backend`; ``loaded`` is not used,
    each actor loads ``cfg.model`` itself). Otherwise every party runs in this process.
    """
    if backend is not None and backend.ray:
        from .transport.ray_backend import train_ray

        return train_ray(cfg, out_dir, backend, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_torch(cfg.seed, cfg.threads)
    if not progress:
        transformers_logging.disable_progress_bar()
    source, data, grid, algo = build_simulation(cfg, loaded)
    grid.observers.extend(observers or [])
    return run_training(cfg, out, source, data, algo, progress=progress)


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
