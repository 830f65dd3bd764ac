"""What every algorithm shares: the step result, the admission of clients, and FedAvg through the grid."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import RunConfig
from ..messages import Load, Sync, Upload
from ..models.parts import ModelSource
from ..runtime.aggregator import fedavg, robust_fedavg
from ..runtime.grid import ClientInfo, Grid, ask_all


@dataclass
class StepResult:
    loss: float | None  # token-weighted mean training loss of this step (None: no loss tokens)
    tokens: int  # completion tokens that carried loss
    clients: int = 0  # clients whose work went into the step
    events: list[dict] = field(default_factory=list)
    ran: bool = True  # False: no client took part; the step runs again once clients are back


def weighted_loss(pairs) -> tuple[float | None, int]:
    pairs = [(loss, n) for loss, n in pairs if loss is not None and n]
    tokens = sum(n for _, n in pairs)
    return (sum(loss * n for loss, n in pairs) / tokens if tokens else None, tokens)


class Algorithm:
    """One engine step (``step``), the end of training (``finish``) and the current global adapter.

    The algorithm is the server's side of the schedule. It reaches the clients only through
    ``self.grid`` (:mod:`splitlora.runtime.grid`), so the same code runs in simulation and deployed.
    ``state_dict``/``load_state_dict`` hold what a server checkpoint needs to resume; ``consistent``
    says whether now is a point to take one (server and clients agree on one global adapter).
    """

    name = ""
    holds_server_part = True  # whether the server runs part of the model (fed: no)
    whole_clients = False  # whether clients hold the whole model (fed, cen)

    def __init__(self, cfg: RunConfig, source: ModelSource, grid: Grid, device: torch.device | str = "cpu"):
        self.cfg, self.source, self.grid, self.device = cfg, source, grid, device
        self.round = 0
        self.keep_from = 0  # the step of the server's latest checkpoint (set by the loop)
        self.consistent = True
        self.members: list[ClientInfo] = []
        self.global_state: dict[str, torch.Tensor] = {}  # the averaged client adapter (what joiners get)

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
        return Sync(step, step, self.round, state=self.global_state)

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"round": self.round, "global_state": self.global_state}

    def load_state_dict(self, state: dict) -> None:
        self.round = int(state["round"])
        self.global_state = {k: v.clone() for k, v in state["global_state"].items()}

    def join(self, step: int) -> None:
        """Admit the clients the run starts (or resumes) with, before its first step."""
        self._admit(step, boundary=True)

    # ---- helpers ----------------------------------------------------------------------------------
    def _admit(self, t: int, boundary: bool) -> list[ClientInfo]:
        self.members = self.grid.admit(t, boundary, lambda c: self.welcome(c, t))
        return self.members

    def _alive(self) -> list[ClientInfo]:
        return [c for c in self.members if self.grid.alive(c)]

    def _aggregate(self, step: int) -> dict:
        """FedAvg of the live clients' adapters (robust, see runtime.aggregator); the average goes back."""
        before = self.grid.traffic.copy()
        if self.cfg.privacy.secure_aggregation:  # the server sees only the sum: no per-upload rules
            from .secure import secure_fedavg

            avg, ups = secure_fedavg(self.grid, self._alive(), self.round, self.global_state, self.cfg)
        else:
            ups = ask_all(self.grid, self._alive(), lambda c: Upload(self.round))
            avg = robust_fedavg([(c.name, c.index, u.num_samples, u.state) for c, u in ups.items()],
                                self.global_state, self.cfg.aggregation, self.grid.min_clients)
        self.round += 1
        if avg.state is not None:
            self.global_state = avg.state
            self.consistent = True
        for c in ups:
            self.grid.send(c, Load(self.round, avg.state, keep_from=self.keep_from))
        spent = self.grid.traffic - before
        event = {"event": "aggregate" if avg.state is not None else "aggregate_skipped", "step": step,
                 "round": self.round, "clients": len(avg.used), "used": avg.used, "samples": avg.samples,
                 "bytes_up": spent.up, "bytes_down": spent.down, "update_norms": avg.update_norms}
        if self.cfg.privacy.secure_aggregation:
            event["secure_aggregation"] = True  # "samples" is then the survivors' total weight
        for key in ("rejected", "clipped", "capped"):
            if getattr(avg, key):
                event[key] = getattr(avg, key)
        return event

    def _peek_average(self) -> dict[str, torch.Tensor]:
        """The average of the clients' adapters right now (simulation only: read, not sent)."""
        states = [(self.grid.peek(c), c.num_samples) for c in self._alive()]
        states = [(s, n) for s, n in states if s is not None]
        if self.consistent or not states:
            return self.global_state
        return fedavg([s for s, _ in states], [n for _, n in states])


def client_keys(init: dict[str, torch.Tensor], server_part) -> dict[str, torch.Tensor]:
    """The client side's share of the initial adapter: what the server's part does not hold."""
    from ..models.lora import lora_state

    server = lora_state(server_part).keys()
    return {k: v for k, v in init.items() if k not in server}
