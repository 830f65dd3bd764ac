"""``train``: a run with every party in this process (:mod:`.parties`), or as Ray actors (:mod:`.ray_backend`)."""

from __future__ import annotations

from pathlib import Path

from transformers.utils import logging as transformers_logging

from ..config import RayOptions, RunConfig
from ..device import setup_torch
from ..models.loading import LoadedModel
from ..runtime.loop import RunResult
from .parties import Validator, build_simulation, client_apps, run_training

__all__ = ["RunResult", "Validator", "build_simulation", "client_apps", "run_training", "train"]


def train(cfg: RunConfig, out_dir: str | Path, progress: bool = True, loaded: LoadedModel | None = None,
          backend: "RayOptions | None" = None, observers: list | None = None) -> RunResult:
    """Run ``cfg`` and write ``config.yaml``, ``metrics.jsonl``/``.csv`` and ``adapter/`` to ``out_dir``.

    ``observers`` (in process): called as ``fn(direction, client, message, nbytes)`` for every message
    that crosses the cut (the leakage audit records what the server receives this way).

    ``backend``: :class:`~splitlora.config.RayOptions`; with ``backend="ray"`` the clients are Ray
    actors and the server one more (:mod:`splitlora.simulation.ray_backend`; ``loaded`` is not used,
    each actor loads ``cfg.model`` itself). Otherwise every party runs in this process.
    """
    if backend is not None and backend.ray:
        from .ray_backend import train_ray

        return train_ray(cfg, out_dir, backend, progress=progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    setup_torch(cfg.seed, cfg.threads)
    if not progress:
        transformers_logging.disable_progress_bar()
    source, data, grid, algo = build_simulation(cfg, loaded)
    grid.observers.extend(observers or [])
    return run_training(cfg, out, source, data, algo, progress=progress)
