"""Centralised LoRA: one party, the pooled training data, the whole model."""

from __future__ import annotations

from ..models.lora import lora_state
from .base import Algorithm, Context, StepResult


class CentralisedLoRA(Algorithm):
    name = "cen"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.party = ctx.whole_party(0, self.cfg.steps, items=ctx.data.train)

    def step(self, t: int) -> StepResult:
        loss, tokens = self.party.train_step()
        return StepResult(loss, tokens)

    def adapter_state(self):
        return lora_state(self.party.model)
