"""Token-level loss of a whole-model adapter on held-out data (validation loss, perplexity)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batching import IGNORE, Encoded, batches_in_order


@torch.no_grad()
def token_nll(model: nn.Module, items: Sequence[Encoded], pad_id: int, batch_size: int = 16) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled (completion) tokens, and their count."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches_in_order(items, batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                              reduction="sum")
        total += float(nll)
        count += int((labels != IGNORE).sum())
    return total, count


def mean_loss(model: nn.Module, items: Sequence[Encoded], pad_id: int, batch_size: int = 16) -> float:
    total, count = token_nll(model, items, pad_id, batch_size)
    return total / count if count else float("nan")


def perplexity(mean_nll: float) -> float:
    return math.exp(mean_nll) if mean_nll == mean_nll else float("nan")
