"""SplitLoRA: clients run the bottom in parallel against one shared server-side adapter; the
client adapters are FedAvg-ed every I local steps (Lin et al., arXiv 2407.00952)."""

from __future__ import annotations

from ..models.lora import lora_state
from ..runtime.aggregator import fedavg
from .base import Algorithm, Context, StepResult, weighted_loss


class SplitLoRA(Algorithm):
    name = "splitlora"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        n, steps = self.cfg.clients, self.cfg.steps
        self.clients = [ctx.split_client(i, steps) for i in range(n)]
        self.server = ctx.split_server(steps * n if self.cfg.server_mode == "sequential" else steps)

    def step(self, t: int) -> StepResult:
        if self.cfg.server_mode == "sequential":
            # Client i's forward depends on neither the server nor other clients, so running each
            # client's round trip in turn gives the parallel schedule's result with one graph alive.
            downs = [g for c in self.clients for g in self._round_trip([c], t)]
        else:
            downs = self._round_trip(self.clients, t)
        loss, tokens = weighted_loss([(g.loss, g.tokens) for g in downs])
        events = [self._aggregate(self.clients, t)] if (t + 1) % self.cfg.aggregate_every == 0 else []
        return StepResult(loss, tokens, events)

    def _round_trip(self, clients, t):
        ups = [self.link.up(c.forward(t)) for c in clients]
        downs = [self.link.down(g) for g in self.server.process(ups)]
        by_id = {c.client_id: c for c in clients}
        for g in downs:
            by_id[g.client_id].backward(g)
        return downs

    def finish(self, steps_done: int) -> list[dict]:
        if steps_done % self.cfg.aggregate_every:
            return [self._aggregate(self.clients, steps_done - 1)]
        return []

    def adapter_state(self):
        clients = fedavg([c.upload(self.round) for c in self.clients])
        return {**clients, **lora_state(self.server.part)}
