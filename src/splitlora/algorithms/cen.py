"""Centralised LoRA: one party, the pooled training data, the whole model (simulation only).

It is ``fed`` with a single party that never averages: the same state, schedule clock and learning
rate, one local step per engine step."""

from __future__ import annotations

from ..messages import LocalStep
from .base import StepResult
from .fed import FedLoRA


class CentralisedLoRA(FedLoRA):
    name = "cen"
    pools_data = True
    samples_clients = False
    averages_clients = False
    not_deployable = "it is one party on pooled data, with nothing to send over a network"

    @classmethod
    def parties(cls, cfg) -> int:
        return 1

    @classmethod
    def party_items(cls, data, index: int) -> list:
        return data.train  # the pooled data

    def step(self, t: int) -> StepResult:
        (party,) = self.admit(t, boundary=t == 0)
        done = self.grid.ask(party, LocalStep(t)).get()
        self.steps_done = t + 1
        return StepResult(done.loss, done.tokens, 1)

    def finish(self, steps_done: int) -> list[dict]:
        return []

    def adapter_state(self):
        return self.grid.peek(self.members[0])
