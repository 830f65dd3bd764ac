"""The main server: blocks K..L-1, final norm and LM head with one shared server-side LoRA."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from ..config import RunConfig
from ..data.batching import IGNORE
from ..models.split import server_forward
from ..transport.messages import Activations, Gradients
from .optim import Optimizer


class SplitServer:
    """``process`` takes the activations of one step and returns each client's gradient.

    ``sequential``: one server step per client batch, in client-id order (the paper's code).
    ``batched``: one server step over the concatenated activations of all clients.
    """

    def __init__(self, part: nn.Module, cfg: RunConfig, total_steps: int):
        self.part = part
        self.mode = cfg.server_mode
        self.vocab_size = part.config.vocab_size
        self.optimizer = Optimizer(part, cfg, total_steps)
        self.device = next(part.parameters()).device

    def process(self, ups: Sequence[Activations]) -> list[Gradients]:
        ups = sorted(ups, key=lambda a: a.client_id)
        if self.mode == "batched":
            return self._step(ups)
        return [g for a in ups for g in self._step([a])]

    def _step(self, ups: Sequence[Activations]) -> list[Gradients]:
        width = max(a.hidden.shape[1] for a in ups)
        dev = self.device
        hidden = torch.cat([_pad(a.hidden.to(dev), width, 0.0) for a in ups]).requires_grad_(True)
        mask = torch.cat([_pad(a.attention_mask.to(dev), width, 0) for a in ups])
        labels = torch.cat([_pad(a.labels.to(dev), width, IGNORE) for a in ups])
        self.part.train()
        logits = server_forward(self.part, hidden, mask)
        loss = ForCausalLMLoss(logits, labels, self.vocab_size)
        loss.backward()
        self.optimizer.step()
        loss_value = float(loss.detach())  # one device sync per server step, not one per client
        grads, row = [], 0
        for a in ups:
            b, t = a.hidden.shape[:2]
            tokens = int((a.labels[:, 1:] != IGNORE).sum())
            # Gradients leave on the activations' device (the client's).
            grads.append(Gradients(a.client_id, a.step, hidden.grad[row:row + b, :t].to(a.hidden.device).contiguous(),
                                   loss_value, tokens))
            row += b
        return grads


def _pad(t: torch.Tensor, width: int, value) -> torch.Tensor:
    """Right-pad dim 1 of ``t`` to ``width``."""
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = (0, 0, 0, extra) if t.dim() == 3 else (0, extra)
    return F.pad(t, pad, value=value)
