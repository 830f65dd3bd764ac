"""The fed server's strategy: sample-weighted FedAvg of LoRA tensors."""

from __future__ import annotations

from typing import Sequence

import torch

from ..transport.messages import AdapterUpdate


def fedavg(updates: Sequence[AdapterUpdate]) -> dict[str, torch.Tensor]:
    """Average ``updates`` weighted by ``num_samples``, in client-id order (deterministic)."""
    if not updates:
        raise ValueError("fedavg needs at least one update")
    updates = sorted(updates, key=lambda u: u.client_id)
    total = float(sum(u.num_samples for u in updates))
    weights = [u.num_samples / total for u in updates]
    keys = updates[0].state.keys()
    for u in updates[1:]:
        if u.state.keys() != keys:
            raise ValueError(f"client {u.client_id} sent a different set of LoRA tensors")
    return {k: sum(w * u.state[k] for w, u in zip(weights, updates)) for k in keys}
