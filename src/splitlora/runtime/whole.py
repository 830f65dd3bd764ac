"""A party that holds the whole model: the `cen` trainer and each `fed` client."""

from __future__ import annotations

import torch
from torch import nn

from ..config import RunConfig
from ..data.batching import IGNORE, BatchStream
from ..models.lora import load_lora_state, lora_state
from ..transport.messages import AdapterUpdate
from .optim import Optimizer, to_device


class WholeModelParty:
    def __init__(self, party_id: int, model: nn.Module, stream: BatchStream, num_samples: int,
                 cfg: RunConfig, total_steps: int):
        self.client_id = party_id
        self.model = model
        self.stream = stream
        self.num_samples = num_samples
        self.optimizer = Optimizer(model, cfg, total_steps)
        self.device = next(model.parameters()).device

    def train_step(self) -> tuple[float, int]:
        """One local step on the unsplit model (transformers' own forward and loss)."""
        batch = to_device(next(self.stream), self.device)
        self.model.train()
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        return float(loss.detach()), int((batch["labels"][:, 1:] != IGNORE).sum())

    def upload(self, round_: int) -> AdapterUpdate:
        return AdapterUpdate(self.client_id, round_, lora_state(self.model), self.num_samples)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        load_lora_state(self.model, state)
