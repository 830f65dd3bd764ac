"""Federated LoRA: every client trains LoRA on the whole model; FedAvg every I local steps. The
server holds no part of the model: it only aggregates."""

from __future__ import annotations

from ..messages import LocalStep
from ..runtime.grid import ask_all
from ..runtime.optim import LrClock
from .base import Algorithm, StepResult, weighted_loss


class FedLoRA(Algorithm):
    name = "fed"
    averages_clients = True
    holds_server_part = False
    whole_clients = True
    sends_activations = False  # only adapters cross, to the aggregator
    samples_clients = True

    def __init__(self, cfg, source, grid, device="cpu"):
        super().__init__(cfg, source, grid, device)
        self.global_state = dict(source.initial_state())
        self.clock = LrClock(cfg, cfg.steps)
        self.steps_done = 0

    def step(self, t: int) -> StepResult:
        clients = self.admit(t, boundary=t % self.cfg.aggregate_every == 0)
        done = ask_all(self.grid, clients, lambda c: LocalStep(t))
        if not done:
            return StepResult(None, 0, 0, ran=False)
        self.consistent = False
        self.steps_done = t + 1
        loss, tokens = weighted_loss((d.loss, d.tokens) for d in done.values())
        events = [self.aggregate(t)] if (t + 1) % self.cfg.aggregate_every == 0 else []
        return StepResult(loss, tokens, len(done), events)

    def finish(self, steps_done: int) -> list[dict]:
        return self.final_aggregation(steps_done)

    def adapter_state(self):
        return dict(self.peek_average())

    @property
    def lr(self) -> float:
        return self.clock.after(self.steps_done)  # the clients' schedule, which the server does not hold
