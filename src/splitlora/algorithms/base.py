"""What every algorithm gets (:class:`Context`) and gives back per step (:class:`StepResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import RunConfig
from ..data import PreparedData
from ..data.batching import BatchStream
from ..models.lora import add_lora, initial_lora_state, load_lora_state, side_lora_config, whole_lora_config
from ..models.split import architecture_of, make_part
from ..runtime.client import SplitClient
from ..runtime.server import SplitServer
from ..runtime.whole import WholeModelParty
from ..transport.inprocess import InProcessLink


@dataclass
class StepResult:
    loss: float  # token-weighted mean training loss of this step
    tokens: int  # completion tokens that carried loss
    events: list[dict] = field(default_factory=list)


@dataclass
class Context:
    cfg: RunConfig
    model: nn.Module  # the frozen base model; every part shares its tensors
    data: PreparedData
    link: InProcessLink

    def __post_init__(self):
        self.init_state = initial_lora_state(self.model, self.cfg)

    def stream(self, client: int, items=None) -> BatchStream:
        items = self.data.client_items(client) if items is None else items
        return BatchStream(items, self.cfg.batch_size, self.model.config.pad_token_id, seed=(self.cfg.seed, client))

    def lora_part(self, side: str) -> nn.Module:
        """A part of ``side`` with LoRA, initialised from the run's one initial adapter."""
        part = make_part(self.model, side, self.cfg.cut_layer)
        if side == "whole":
            config = whole_lora_config(self.model, self.cfg)
        else:
            lora = self.cfg.client_lora if side == "client" else self.cfg.server_lora
            config = side_lora_config(lora, architecture_of(self.model))
        add_lora(part, config)
        load_lora_state(part, self.init_state)
        return part

    def split_client(self, client: int, total_steps: int) -> SplitClient:
        return SplitClient(client, self.lora_part("client"), self.stream(client),
                           len(self.data.client_indices[client]), self.cfg, total_steps)

    def split_server(self, total_steps: int) -> SplitServer:
        return SplitServer(self.lora_part("server"), self.cfg, total_steps)

    def whole_party(self, client: int, total_steps: int, items=None) -> WholeModelParty:
        items = self.data.client_items(client) if items is None else items
        return WholeModelParty(client, self.lora_part("whole"), self.stream(client, items), len(items),
                               self.cfg, total_steps)


def weighted_loss(pairs: list[tuple[float, int]]) -> tuple[float, int]:
    tokens = sum(n for _, n in pairs)
    return (sum(l * n for l, n in pairs) / max(tokens, 1), tokens)


class Algorithm:
    """One engine step (``step``), the end of training (``finish``) and the current global adapter."""

    name = ""

    def __init__(self, ctx: Context):
        self.ctx, self.cfg, self.link = ctx, ctx.cfg, ctx.link
        self.round = 0

    def step(self, t: int) -> StepResult:
        raise NotImplementedError

    def finish(self, steps_done: int) -> list[dict]:
        return []

    def adapter_state(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _aggregate(self, parties, step: int) -> dict:
        """FedAvg ``parties``' adapters through the link and load the average into each of them."""
        from ..runtime.aggregator import fedavg

        up0, down0 = self.link.bytes_up, self.link.bytes_down
        updates = [self.link.upload(p.upload(self.round)) for p in parties]
        average = self.link.broadcast(fedavg(updates), len(parties))
        for p in parties:
            p.load(average)
        self.round += 1
        return {"event": "aggregate", "step": step, "round": self.round, "clients": len(parties),
                "samples": [u.num_samples for u in updates],
                "bytes_up": self.link.bytes_up - up0, "bytes_down": self.link.bytes_down - down0}
