"""Centralised LoRA: one party, the pooled training data, the whole model (simulation only)."""

from __future__ import annotations

from ..messages import LocalStep
from ..runtime.optim import LrClock
from .base import Algorithm, StepResult


class CentralisedLoRA(Algorithm):
    name = "cen"
    holds_server_part = False
    whole_clients = True

    def __init__(self, cfg, source, grid, device="cpu"):
        super().__init__(cfg, source, grid, device)
        self.global_state = dict(source.initial_state())
        self.clock = LrClock(cfg, cfg.steps)
        self.steps_done = 0

    def step(self, t: int) -> StepResult:
        (party,) = self._admit(t, boundary=t == 0)
        done = self.grid.ask(party, LocalStep(t)).get()
        self.steps_done = t + 1
        return StepResult(done.loss, done.tokens, 1)

    def adapter_state(self):
        return self.grid.peek(self.members[0])

    @property
    def lr(self) -> float:
        return self.clock.after(self.steps_done)
