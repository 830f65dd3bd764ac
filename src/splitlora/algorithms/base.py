"""What every algorithm shares: the step result, the admission of clients, and FedAvg through the grid."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import numpy as np

from ..config import RunConfig
from ..messages import Load, Sync, Upload
from ..models.parts import ModelSource
from ..registry import AGGREGATORS
from ..runtime.aggregator import fedavg, make_aggregator
from ..runtime.grid import ClientInfo, Grid, ask_all
from ..runtime.server import SplitServer
from ..runtime.metrics import plausible_loss


@dataclass
class StepResult:
    loss: float | None  # token-weighted mean training loss of this step (None: no loss tokens)
    tokens: int  # completion tokens that carried loss
    clients: int = 0  # clients whose work went into the step
    events: list[dict] = field(default_factory=list)
    ran: bool = True  # False: no client took part; the step runs again once clients are back


def weighted_loss(pairs) -> tuple[float | None, int]:
    """The token-weighted mean of ``(loss, tokens)`` pairs; a loss no model computed (runtime.metrics.
    plausible_loss: a client's forged report) is left out (its tokens still count as trained)."""
    pairs = [(loss, n) for loss, n in pairs if n]
    trained = sum(n for _, n in pairs)
    pairs = [(loss, n) for loss, n in pairs if plausible_loss(loss)]
    tokens = sum(n for _, n in pairs)
    return (sum(loss * n for loss, n in pairs) / tokens if tokens else None, trained)


class Algorithm:
    """One engine step (``step``), the end of training (``finish``) and the current global adapter.

    The algorithm is the server's side of the schedule. It reaches the clients only through
    ``self.grid`` (:mod:`splitlora.runtime.grid`), so the same code runs in simulation and deployed.
    ``state_dict``/``load_state_dict`` hold what a server checkpoint needs to resume; ``consistent``
    says whether now is a point to take one (server and clients agree on one global adapter).
    """

    name = ""
    # ---- the layout: which parties exist, what each holds, what crosses ----------------------------
    holds_server_part = True  # whether the server runs part of the model (fed: no)
    whole_clients = False  # whether clients hold the whole model (fed, cen)
    pools_data = False  # one party trains on every client's rows (cen): the data was pooled where it runs
    sends_activations = True  # whether activations cross the cut (what the leakage audit attacks)
    every_client_steps = True  # every (sampled) client works at every step (sl: one client at a time)
    samples_clients = False  # honours ``clients_per_round`` (a seeded sample of clients per round)
    averages_clients = False  # averages the clients' adapters (what secure aggregation can mask)
    not_deployable: str | None = None  # why ``serve`` cannot run it (None: it can)

    @classmethod
    def parties(cls, cfg: RunConfig) -> int:
        """How many client parties a run of ``cfg`` has."""
        return cfg.clients

    @classmethod
    def party_items(cls, data, index: int) -> list:
        """The encoded training rows party ``index`` holds (``data``: :class:`~splitlora.data.PreparedData`)."""
        return data.client_items(index)

    @classmethod
    def batches_drawn(cls, cfg: RunConfig, index: int, steps: int) -> int:
        """Batches party ``index`` draws in the first ``steps`` steps (what the accountant counts)."""
        if not cls.samples_clients or not cfg.clients_per_round:
            return steps
        every = cfg.aggregate_every
        full = sum(every for b in range(0, steps - steps % every, every) if index in sampled(cfg, b))
        tail = steps % every if steps % every and index in sampled(cfg, steps - steps % every) else 0
        return full + tail

    def __init__(self, cfg: RunConfig, source: ModelSource, grid: Grid, device: torch.device | str = "cpu"):
        self.cfg, self.source, self.grid, self.device = cfg, source, grid, device
        self.round = 0
        self.keep_from = 0  # the step of the server's latest checkpoint (set by the loop)
        self.consistent = True
        self.members: list[ClientInfo] = []
        self.global_state: dict[str, torch.Tensor] = {}  # the averaged client adapter (what joiners get)
        self.aggregator = make_aggregator(cfg.aggregation, AGGREGATORS[cfg.aggregation.rule])
        self.holds: dict[str, int] = {}  # client name -> the round whose average it holds
        self.aggregated_at: int | None = None  # the step of the latest aggregation tried (done or skipped)

    # ---- the schedule ---------------------------------------------------------------------------
    def step(self, t: int) -> StepResult:
        raise NotImplementedError

    def finish(self, steps_done: int) -> list[dict]:
        return []

    def adapter_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def lr(self) -> float:
        raise NotImplementedError

    def welcome(self, client: ClientInfo, step: int) -> Sync:
        """What a client joining before ``step`` gets: the step, its data position, the global adapter."""
        self.holds[client.name] = self.round
        return Sync(step, self.batches_drawn(self.cfg, client.index, step), self.round, state=self.global_state)

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"round": self.round, "global_state": self.global_state, "aggregator": self.aggregator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state["round"])
        self.global_state = {k: v.clone() for k, v in state["global_state"].items()}
        self.aggregator.load_state_dict(state.get("aggregator", {}))

    def make_server(self, total_steps: int) -> SplitServer:
        """The main server's part and its LoRA, for algorithms that split the model (``total_steps``: of
        its learning-rate schedule). The schedule tests replace it with a fake."""
        return SplitServer(self.source.lora_part("server", device=self.device), self.cfg, total_steps)

    def join(self, step: int) -> None:
        """Admit the clients the run starts (or resumes) with, before its first step."""
        self.admit(step, boundary=True)

    # ---- helpers for a schedule ---------------------------------------------------------------------
    def admit(self, t: int, boundary: bool) -> list[ClientInfo]:
        """The clients taking part in step ``t`` (at a ``boundary``, waiting clients join first).

        With ``clients_per_round`` (and ``samples_clients``), only this round's seeded sample of
        client indices; one that missed earlier rounds first gets the current average.
        """
        self.members = self.grid.admit(t, boundary, lambda c: self.welcome(c, t))
        if not self.samples_clients or not self.cfg.clients_per_round:
            return self.members
        chosen = sampled(self.cfg, t - t % self.cfg.aggregate_every)
        self.members = [c for c in self.members if c.index in chosen]
        for c in self.members:
            if self.holds.get(c.name) != self.round:
                self.grid.send(c, Load(self.round, self.global_state, keep_from=self.keep_from))
                self.holds[c.name] = self.round
        return self.members

    def alive(self) -> list[ClientInfo]:
        """The clients of the current step that are still in the run."""
        return [c for c in self.members if self.grid.alive(c)]

    def aggregate(self, step: int) -> dict:
        """FedAvg of the live clients' adapters (robust, see runtime.aggregator); the average goes back."""
        self.aggregated_at = step
        before = self.grid.traffic.copy()
        if self.cfg.privacy.secure_aggregation:  # the server sees only the sum: no per-upload rules
            from .secure import secure_fedavg

            avg, ups = secure_fedavg(self.grid, self.alive(), self.round, self.global_state, self.cfg)
        else:
            ups = ask_all(self.grid, self.alive(), lambda c: Upload(self.round))
            avg = self.aggregator([(c.name, c.index, u.num_samples, u.state) for c, u in ups.items()],
                                  self.global_state, self.grid.min_clients)
        self.round += 1
        send = avg.state
        if avg.state is not None:
            self.global_state = avg.state
            self.consistent = True
        elif avg.refused.startswith("the average"):
            send, self.consistent = self.global_state, True  # a refused result: everyone back to the current one
        for c in ups:
            self.grid.send(c, Load(self.round, send, keep_from=self.keep_from))
            if avg.state is not None:
                self.holds[c.name] = self.round
        spent = self.grid.traffic - before
        event = {"event": "aggregate" if avg.state is not None else "aggregate_skipped", "step": step,
                 "round": self.round, "clients": len(avg.used), "used": avg.used, "samples": avg.samples,
                 "bytes_up": spent.up, "bytes_down": spent.down, "update_norms": avg.update_norms}
        if self.cfg.privacy.secure_aggregation:
            event["secure_aggregation"] = True  # "samples" is then the survivors' total weight
        if avg.bound is not None:
            event["bound"] = round(avg.bound, 6)
        for key in ("rejected", "clipped", "capped", "refused", "average_clipped"):
            if getattr(avg, key):
                event[key] = getattr(avg, key)
        return event

    def final_aggregation(self, steps_done: int) -> list[dict]:
        """The end of training: aggregate a partial last round, but never the same step twice (a round
        skipped for too few uploads stays skipped: asking again would number a round past the last)."""
        if self.consistent or self.aggregated_at == steps_done - 1:
            return []
        return [self.aggregate(steps_done - 1)]

    def peek_average(self) -> dict[str, torch.Tensor]:
        """The average of the clients' adapters right now (simulation only: read, not sent)."""
        states = [(self.grid.peek(c), c.num_samples) for c in self.alive()]
        states = [(s, n) for s, n in states if s is not None]
        if self.consistent or not states:
            return self.global_state
        return fedavg([s for s, _ in states], [n for _, n in states])


def client_keys(init: dict[str, torch.Tensor], server_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The client side's share of the initial adapter: what the server's part does not hold."""
    return {k: v for k, v in init.items() if k not in server_state}


def sampled(cfg: RunConfig, boundary: int) -> set[int]:
    """The client indices that take part in the round starting at step ``boundary`` (``clients_per_round``).

    Drawn from every index, not from the clients present, so that anyone (a resumed server, a
    rejoining client, the accountant) can recompute it from the seed alone.
    """
    n, m = cfg.clients, cfg.clients_per_round
    if not m or m >= n:
        return set(range(n))
    return {int(i) for i in np.random.default_rng([cfg.seed, boundary]).choice(n, m, replace=False)}
