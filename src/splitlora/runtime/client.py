"""The data owner: embeddings and blocks 0..K-1 with its own LoRA, on its own data."""

from __future__ import annotations

import torch
from torch import nn

from ..config import RunConfig
from ..data.batching import BatchStream
from ..models.lora import load_lora_state, lora_state
from ..models.split import client_forward
from ..transport.messages import Activations, AdapterUpdate, Gradients
from .optim import Optimizer, to_device


class SplitClient:
    """One local step is ``forward`` (activations up) then ``backward`` (gradient down)."""

    def __init__(self, client_id: int, part: nn.Module, stream: BatchStream, num_samples: int,
                 cfg: RunConfig, total_steps: int):
        self.client_id = client_id
        self.part = part
        self.stream = stream
        self.num_samples = num_samples
        self.optimizer = Optimizer(part, cfg, total_steps)
        self._hidden: torch.Tensor | None = None
        self._step = -1
        self.device = next(part.parameters()).device

    def forward(self, step: int) -> Activations:
        batch = to_device(next(self.stream), self.device)
        self.part.train()
        self._hidden = client_forward(self.part, batch["input_ids"], batch["attention_mask"])
        self._step = step
        return Activations(self.client_id, step, self._hidden.detach(), batch["attention_mask"], batch["labels"])

    def backward(self, msg: Gradients) -> None:
        if self._hidden is None or msg.step != self._step:
            raise RuntimeError(f"client {self.client_id}: gradient for step {msg.step}, expected {self._step}")
        self._hidden.backward(msg.grad.to(self._hidden.dtype))
        self._hidden = None
        self.optimizer.step()

    def upload(self, round_: int) -> AdapterUpdate:
        return AdapterUpdate(self.client_id, round_, lora_state(self.part), self.num_samples)

    def load(self, state: dict[str, torch.Tensor]) -> None:
        load_lora_state(self.part, state)
