"""Vanilla split learning: clients take turns (I steps each) training one client-side adapter. At
the end of a turn the adapter and its AdamW moments go to the server, which hands them to the next
client (and keeps a copy: a checkpoint point, and what the next client gets if the holder is lost)."""

from __future__ import annotations

from ..messages import Forward, HandIn, HandOut, Handover, Sync
from ..runtime.optim import LrClock, bound_handover
from .base import Algorithm, StepResult, client_keys, weighted_loss
from .shapes import round_trip


class SplitLearning(Algorithm):
    name = "sl"
    every_client_steps = False

    def __init__(self, cfg, source, grid, device="cpu"):
        super().__init__(cfg, source, grid, device)
        self.server = self.make_server(cfg.steps)
        state = client_keys(source.initial_state(), self.server.lora_state())
        self.global_state = state
        zeros = {k: v.new_zeros(v.shape) for k, v in state.items()}
        self.handover = Handover(state, zeros, {k: v.clone() for k, v in zeros.items()}, 0)  # the server's copy
        self.holder = None  # the client holding the adapter now (None: the server holds it)
        # Server-side truth: the optimiser steps the holder took since the server's copy, and their
        # learning rates (the clients' schedule), bound what it may hand back (runtime/optim.py).
        self.clock = LrClock(cfg, cfg.steps)
        self.taken = 0

    def turn_of(self, t: int) -> int:
        return (t // self.cfg.aggregate_every) % self.cfg.clients

    @classmethod
    def batches_drawn(cls, cfg, index: int, steps: int) -> int:
        """Batches client ``index`` draws in the first ``steps`` steps: the steps of its turns."""
        every, n = cfg.aggregate_every, cfg.clients
        turns = steps // every
        full = turns // n + (1 if index < turns % n else 0)
        return full * every + (steps % every if turns % n == index else 0)

    def welcome(self, client, step: int) -> Sync:
        return Sync(step, self.batches_drawn(self.cfg, client.index, step), self.round)

    def step(self, t: int) -> StepResult:
        every = self.cfg.aggregate_every
        clients = self.admit(t, boundary=t % every == 0)
        if not clients:
            return StepResult(None, 0, 0, ran=False)
        events = []
        # The turn's client, or (if it is gone) the next one that is here.
        by_index = {c.index: c for c in clients}
        turn = self.turn_of(t)
        holder = next(by_index[i] for i in sorted(by_index, key=lambda i: (i - turn) % self.cfg.clients))
        if holder != self.holder:
            before = self.grid.traffic.copy()
            self.grid.send(holder, HandIn(t, self.handover))
            spent = self.grid.traffic - before
            events.append({"event": "handover", "step": t, "to_client": holder.name, "bytes_up": 0,
                           "bytes_down": spent.down})
            self.holder, self.taken = holder, 0
        up = self.grid.ask(holder, Forward(t)).get()
        losses = round_trip(self, [(holder, up)]) if up is not None else {}
        if not losses:
            self.holder = None
            return StepResult(None, 0, 0, events, ran=False)
        self.consistent = False
        self.taken += 1
        if (t + 1) % every == 0:
            events.append(self._take_back(t))
        loss, tokens = weighted_loss(losses.values())
        return StepResult(loss, tokens, 1, events)

    def _take_back(self, t: int) -> dict:
        """End of a turn: the adapter and its optimiser state come to the server."""
        before = self.grid.traffic.copy()
        giver = self.holder
        back = self.grid.ask(giver, HandOut(t)).get() if giver is not None else None
        spent = self.grid.traffic - before
        event = {"event": "handback", "step": t, "from_client": giver.name if giver is not None else None,
                 "bytes_up": spent.up, "bytes_down": 0}
        bounded = []
        if back is not None:
            start = self.handover.opt_steps
            lrs = [self.clock.after(start + j) for j in range(self.taken)]
            back, bounded = bound_handover(self.handover, back, lrs, self.cfg.weight_decay)
            if bounded:
                event["bounded"] = bounded
            self.handover, self.global_state, self.consistent = back, back.state, True
            self.round += 1
        self.taken = 0
        if back is None or self.turn_of(t + 1) != giver.index:
            self.holder = None  # the next turn is someone else's: they get the server's copy
        elif bounded:
            self.grid.send(giver, HandIn(t, self.handover))  # it keeps the turn, from the bounded state
        return event

    def finish(self, steps_done: int) -> list[dict]:
        if not self.consistent:  # the last turn was partial
            return [self._take_back(steps_done - 1)]
        return []

    def adapter_state(self):
        state = self.handover.state
        if not self.consistent and self.holder is not None:
            state = self.grid.peek(self.holder) or state
        return {**state, **self.server.lora_state()}

    @property
    def lr(self) -> float:
        return self.server.optimizer.lr

    def state_dict(self) -> dict:
        h = self.handover
        return {**super().state_dict(), **self.server.state_dict(),
                "handover": {"state": h.state, "exp_avg": h.exp_avg, "exp_avg_sq": h.exp_avg_sq,
                             "opt_steps": h.opt_steps}}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.server.load_state_dict(state)
        h = state["handover"]
        self.handover = Handover(h["state"], h["exp_avg"], h["exp_avg_sq"], int(h["opt_steps"]))
        self.holder, self.taken = None, 0
