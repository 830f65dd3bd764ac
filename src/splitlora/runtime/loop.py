"""The one training loop: it drives any algorithm over any grid (in process, gRPC, Ray), writes one
metrics row per step (:func:`step_row`), and, when given a checkpointer, checkpoints at the points
where server and clients agree. ``train`` (:mod:`splitlora.simulation`) and ``serve``
(:mod:`splitlora.transport.serve`) both run it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..config import RunConfig
from ..device import retune_threads
from ..privacy.accounting import dp_sgd_epsilons
from .grid import Traffic
from .metrics import MetricsLog

# ``algo`` below is a splitlora.algorithms.Algorithm; algorithms sit above runtime, so it is not imported.
Algorithm = object


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


def step_row(t: int, result, algo: Algorithm, totals: Totals, traffic: Traffic, elapsed: float) -> dict:
    """The metrics row of step ``t`` (the one format, for train and serve alike)."""
    row = {"step": t + 1, "loss": result.loss, "lr": algo.lr, "tokens": result.tokens,
           "tokens_total": totals.tokens, "bytes_up": traffic.up, "bytes_down": traffic.down,
           "bytes_up_total": totals.traffic.up, "bytes_down_total": totals.traffic.down,
           "elapsed_s": round(elapsed, 4), "tokens_per_s": totals.tokens / elapsed if elapsed else 0.0,
           "clients": result.clients}
    if totals.traffic.wire_up or totals.traffic.wire_down:
        row["wire_bytes_up"], row["wire_bytes_down"] = traffic.wire_up, traffic.wire_down
    if algo.cfg.privacy.dp_sgd:  # DP-SGD: epsilon per record of each site so far (privacy/accounting.py)
        sites = dp_sgd_epsilons(algo.cfg, algo.members, t + 1)
        row["epsilon"], row["epsilon_sites"] = max(sites.values(), default=0.0), sites
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
            if cfg.privacy.dp_sgd:
                shown["eps"] = f"{max(dp_sgd_epsilons(cfg, algo.members, t + 1).values(), default=0.0):.2f}"
            if algo.every_client_steps and result.clients != (cfg.clients_per_round or algo.parties(cfg)):
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
