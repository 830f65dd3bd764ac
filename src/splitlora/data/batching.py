"""Prompt/completion encoding with loss on the completion only, and dynamically padded batches."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import UserError
from .e2e import Example

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens that carry no loss (prompt and padding), as in transformers


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]


def encode(example: Example, tokenizer, template: str, max_length: int) -> Encoded:
    """``template(mr)`` then `` ref<eos>``; only the completion is labelled."""
    prompt = tokenizer(template.format(mr=example.mr), add_special_tokens=False)["input_ids"]
    completion = tokenizer(" " + example.ref, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + completion)[:max_length]
    labels = ([IGNORE] * len(prompt) + completion)[:max_length]
    return Encoded(ids, labels)


def carries_loss(item: Encoded) -> bool:
    """Whether any token is predicted with loss (labels are shifted by one in the loss)."""
    return any(label != IGNORE for label in item.labels[1:])


def encode_labelled(examples: Sequence[Example], tokenizer, template: str,
                    max_length: int) -> tuple[list[Example], list[Encoded]]:
    """Encode ``examples``; those whose completion ``max_length`` cut away entirely carry no loss and
    are dropped (a batch of only such rows would have a 0/0 loss). Returns the kept examples and
    their encodings, in order."""
    pairs = [(ex, encode(ex, tokenizer, template, max_length)) for ex in examples]
    kept = [(ex, e) for ex, e in pairs if carries_loss(e)]
    if pairs and not kept:
        raise UserError(f"max_length {max_length} leaves no completion tokens: every prompt fills it")
    if len(kept) < len(pairs):
        log.warning("dropped %d of %d examples whose completion does not fit in max_length %d",
                    len(pairs) - len(kept), len(pairs), max_length)
    return [ex for ex, _ in kept], [e for _, e in kept]


def encode_all(examples: Sequence[Example], tokenizer, template: str, max_length: int) -> list[Encoded]:
    """The encodings of :func:`encode_labelled`."""
    return encode_labelled(examples, tokenizer, template, max_length)[1]


def collate(items: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item of this batch (never to a fixed length)."""
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it.input_ids)
        ids[row, :n] = torch.tensor(it.input_ids)
        labels[row, :n] = torch.tensor(it.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class BatchStream:
    """Endless batches over ``items``: a fresh seeded shuffle each epoch, partial last batch kept."""

    def __init__(self, items: Sequence[Encoded], batch_size: int, pad_id: int, seed: int):
        if not items:
            raise ValueError("BatchStream needs at least one item")
        # An Arrow-backed sequence is read row by row; anything else is copied once.
        self.items = items if hasattr(items, "subset") else list(items)
        self.batch_size, self.pad_id = batch_size, pad_id
        self.rng = np.random.default_rng(seed)
        self._iter = self._batches()

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            order = self.rng.permutation(len(self.items))
            for start in range(0, len(order), self.batch_size):
                yield collate([self.items[i] for i in order[start:start + self.batch_size]], self.pad_id)

    def __next__(self) -> dict[str, torch.Tensor]:
        return next(self._iter)

    def __iter__(self):
        return self


def batches_in_order(items: Sequence[Encoded], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """One pass in order (validation, perplexity)."""
    for start in range(0, len(items), batch_size):
        yield collate(items[start:start + batch_size], pad_id)
