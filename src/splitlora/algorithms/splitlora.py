"""SplitLoRA: clients run the bottom in parallel against one shared server-side adapter; the
client adapters are FedAvg-ed every I local steps (Lin et al., arXiv 2407.00952)."""

from __future__ import annotations

from ..messages import Forward
from ..runtime.grid import ask_all
from .base import Algorithm, StepResult, client_keys, weighted_loss
from .shapes import round_trip


class SplitLoRA(Algorithm):
    name = "splitlora"
    averages_clients = True
    samples_clients = True

    def __init__(self, cfg, source, grid, device="cpu"):
        super().__init__(cfg, source, grid, device)
        sequential = cfg.server_mode == "sequential"
        self.server = self.make_server(cfg.steps * (cfg.clients_per_round or cfg.clients) if sequential else cfg.steps)
        self.global_state = client_keys(source.initial_state(), self.server.lora_state())

    def step(self, t: int) -> StepResult:
        clients = self.admit(t, boundary=t % self.cfg.aggregate_every == 0)
        if self.cfg.server_mode == "sequential":
            # All clients are asked at once (remote ones compute in parallel); the server takes their
            # batches one at a time, in index order. In process a client computes when its batch is
            # taken, so one client's graph is alive at a time.
            pending = {c: self.grid.ask(c, Forward(t)) for c in clients}
            losses = {}
            for c, p in pending.items():
                up = p.get()
                if up is not None:
                    losses.update(round_trip(self, [(c, up)]))
        else:
            losses = round_trip(self, list(ask_all(self.grid, clients, lambda c: Forward(t)).items()))
        if not losses:
            return StepResult(None, 0, 0, ran=False)
        self.consistent = False
        loss, tokens = weighted_loss(losses.values())
        events = [self.aggregate(t)] if (t + 1) % self.cfg.aggregate_every == 0 else []
        return StepResult(loss, tokens, len(losses), events)

    def finish(self, steps_done: int) -> list[dict]:
        return self.final_aggregation(steps_done)

    def adapter_state(self):
        return {**self.peek_average(), **self.server.lora_state()}

    @property
    def lr(self) -> float:
        return self.server.optimizer.lr

    def state_dict(self) -> dict:
        return {**super().state_dict(), **self.server.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.server.load_state_dict(state)
