"""Data: E2E loading and synthetic generation, partitioning across clients, batching."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import RunConfig
from ..errors import UserError
from .batching import Encoded, encode_all, encode_labelled
from .e2e import Example, load_e2e, synthetic_e2e
from .partition import partition


@dataclass
class PreparedData:
    train: list[Encoded]
    val: list[Encoded]
    client_indices: list[list[int]]  # indices into ``train``, one list per client
    train_examples: list[Example]
    val_examples: list[Example]

    def client_items(self, client: int) -> list[Encoded]:
        return [self.train[i] for i in self.client_indices[client]]


def load_examples(cfg: RunConfig) -> list[Example]:
    if cfg.data == "synthetic":
        return synthetic_e2e(cfg.synthetic_examples, seed=cfg.seed)
    return load_e2e(cfg.data)


def prepare_data(cfg: RunConfig, tokenizer) -> PreparedData:
    """Split off validation MRs (whole MR groups, so no MR is in both), then partition the rest."""
    examples = load_examples(cfg)
    mrs = sorted({ex.mr for ex in examples})
    rng = np.random.default_rng(cfg.seed)
    n_val = int(round(len(mrs) * cfg.val_fraction))
    val_mrs = {mrs[i] for i in rng.permutation(len(mrs))[:n_val]}
    train_ex = [ex for ex in examples if ex.mr not in val_mrs]
    val_ex = [ex for ex in examples if ex.mr in val_mrs]
    if not train_ex:
        raise UserError("no training examples left after the validation split")
    # Drop examples whose completion max_length cuts away before partitioning, so indices line up.
    train_ex, train = encode_labelled(train_ex, tokenizer, cfg.prompt_template, cfg.max_length)
    n_clients = cfg.clients  # an algorithm with pooled data (cen) reads ``train``
    key = cfg.partition_key
    indices = partition(len(train_ex), n_clients, cfg.partition, cfg.seed,
                        key_of=lambda i: train_ex[i].slots().get(key, ""))
    return PreparedData(
        train=train,
        val=encode_all(val_ex, tokenizer, cfg.prompt_template, cfg.max_length),
        client_indices=indices, train_examples=train_ex, val_examples=val_ex)
