"""What crosses the cut and the aggregation, independent of how it travels (in-process or gRPC)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

WIRE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Masks and labels travel compactly; labels need int32 for vocabularies beyond 32k and -100.
MASK_WIRE_DTYPE = torch.uint8
LABEL_WIRE_DTYPE = torch.int32


@dataclass
class Activations:
    """Client -> server: the cut-layer hidden states of one batch, its mask and its labels."""

    client_id: int
    step: int
    hidden: torch.Tensor  # (B, T, H)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 where no loss


@dataclass
class Gradients:
    """Server -> client: dL/dh for the activations of ``step``, and the batch loss for logging."""

    client_id: int
    step: int
    grad: torch.Tensor  # (B, T, H)
    loss: float
    tokens: int  # completion tokens that carried loss


@dataclass
class AdapterUpdate:
    """Client -> aggregator (and back): LoRA tensors with the sample count that weights FedAvg."""

    client_id: int
    round: int
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    num_samples: int = 0


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(nbytes(t) for t in state.values())
