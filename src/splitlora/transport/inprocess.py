"""In-process transport for simulation: messages are handed over by reference after the same
dtype conversion the network applies, and every byte that would cross the wire is counted."""

from __future__ import annotations

from dataclasses import replace

import torch

from .messages import (LABEL_WIRE_DTYPE, MASK_WIRE_DTYPE, WIRE_DTYPES, Activations, AdapterUpdate, Gradients,
                       nbytes, state_nbytes)


class InProcessLink:
    """Counts ``bytes_up`` (client -> server/aggregator) and ``bytes_down`` (back)."""

    def __init__(self, wire_dtype: str = "fp32"):
        self.dtype = WIRE_DTYPES[wire_dtype]
        self.bytes_up = 0
        self.bytes_down = 0

    def _wire(self, t: torch.Tensor) -> torch.Tensor:
        # Round-trip through the wire dtype so simulation sees the same precision as deployment.
        return t if t.dtype == self.dtype else t.to(self.dtype).to(t.dtype)

    def up(self, msg: Activations) -> Activations:
        self.bytes_up += (msg.hidden.numel() * self.dtype.itemsize
                          + msg.attention_mask.numel() * MASK_WIRE_DTYPE.itemsize
                          + msg.labels.numel() * LABEL_WIRE_DTYPE.itemsize)
        return replace(msg, hidden=self._wire(msg.hidden))

    def down(self, msg: Gradients) -> Gradients:
        self.bytes_down += msg.grad.numel() * self.dtype.itemsize
        return replace(msg, grad=self._wire(msg.grad))

    def upload(self, msg: AdapterUpdate) -> AdapterUpdate:
        self.bytes_up += state_nbytes(msg.state)
        return msg

    def broadcast(self, state: dict[str, torch.Tensor], receivers: int) -> dict[str, torch.Tensor]:
        self.bytes_down += state_nbytes(state) * receivers
        return state


__all__ = ["InProcessLink", "nbytes"]
