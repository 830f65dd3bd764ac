"""Vanilla split learning: clients take turns (I steps each) training one client-side adapter,
which is handed on to the next client together with its optimiser state; one server adapter."""

from __future__ import annotations

from ..models.lora import lora_state
from ..transport.messages import state_nbytes
from .base import Algorithm, Context, StepResult


class SplitLearning(Algorithm):
    name = "sl"

    def __init__(self, ctx: Context):
        super().__init__(ctx)
        self.client = ctx.split_client(0, self.cfg.steps)  # the one client-side model being passed on
        # Client 0's stream is the one the client-side model starts with: reuse it, or its data
        # would restart from the top whenever its turn comes back.
        self.streams = [self.client.stream] + [ctx.stream(i) for i in range(1, self.cfg.clients)]
        self.samples = [len(ix) for ix in ctx.data.client_indices]
        self.server = ctx.split_server(self.cfg.steps)
        self.turn = 0

    def step(self, t: int) -> StepResult:
        events = []
        turn = (t // self.cfg.aggregate_every) % self.cfg.clients
        if turn != self.turn:
            events.append(self._hand_over(turn, t))
        up = self.link.up(self.client.forward(t))
        (down,) = [self.link.down(g) for g in self.server.process([up])]
        self.client.backward(down)
        return StepResult(down.loss, down.tokens, events)

    def _hand_over(self, turn: int, t: int) -> dict:
        # Adapter weights plus AdamW's two moments go from one data owner to the next (via the server).
        size = 3 * state_nbytes(lora_state(self.client.part))
        self.link.bytes_up += size
        self.link.bytes_down += size
        self.client.client_id, self.turn = turn, turn
        self.client.stream, self.client.num_samples = self.streams[turn], self.samples[turn]
        return {"event": "handover", "step": t, "to_client": turn, "bytes_up": size, "bytes_down": size}

    def adapter_state(self):
        return {**lora_state(self.client.part), **lora_state(self.server.part)}
