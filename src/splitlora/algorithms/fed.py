"""Federated LoRA: every client trains LoRA on the whole model; FedAvg every I local steps."""

from __future__ import annotations

from ..runtime.aggregator import fedavg
from .base import Algorithm, Context, StepResult, weighted_loss


class FedLoRA(Algorithm):
    name = "fed"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.parties = [ctx.whole_party(i, self.cfg.steps) for i in range(self.cfg.clients)]

    def step(self, t: int) -> StepResult:
        loss, tokens = weighted_loss([p.train_step() for p in self.parties])
        events = [self._aggregate(self.parties, t)] if (t + 1) % self.cfg.aggregate_every == 0 else []
        return StepResult(loss, tokens, events)

    def finish(self, steps_done: int) -> list[dict]:
        if steps_done % self.cfg.aggregate_every:
            return [self._aggregate(self.parties, steps_done - 1)]
        return []

    def adapter_state(self):
        return fedavg([p.upload(self.round) for p in self.parties])
