"""Split a data set across clients: ``iid``, ``contiguous`` or ``dirichlet:ALPHA`` (non-IID by a key).

``column:NAME`` (one client per distinct value, as flwr-datasets' NaturalIdPartitioner) and ``files``
(a folder of per-site files, one client per file) follow the data itself: :func:`splitlora.data.prepare_data`
builds them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..config import parse_partition
from ..errors import UserError


def partition(n_items: int, n_clients: int, spec: str, seed: int,
              key_of: Callable[[int], str] | None = None) -> list[list[int]]:
    """Indices of each client's items, each list sorted (so one client holds the data in file order).

    ``dirichlet:ALPHA``: for every value of the key, its items are spread over the clients in
    proportions drawn from Dir(ALPHA); small ALPHA = strongly non-IID.
    """
    kind, alpha = parse_partition(spec)
    if kind in ("column", "files"):
        raise ValueError(f"partition {spec} is built from the data (splitlora.data.prepare_data)")
    if n_items < n_clients:
        raise UserError(f"{n_items} training examples cannot be split over {n_clients} clients")
    rng = np.random.default_rng(seed)
    if kind == "contiguous":
        parts = np.array_split(np.arange(n_items), n_clients)
    elif kind == "iid":
        parts = np.array_split(rng.permutation(n_items), n_clients)
    else:
        parts = _dirichlet(n_items, n_clients, alpha, rng, key_of or (lambda i: ""))
    return [sorted(int(i) for i in p) for p in parts]


def _dirichlet(n_items: int, n_clients: int, alpha: float, rng: np.random.Generator,
               key_of: Callable[[int], str]) -> list[Sequence[int]]:
    groups: dict[str, list[int]] = {}
    for i in range(n_items):
        groups.setdefault(key_of(i), []).append(i)
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for key in sorted(groups):
        items = rng.permutation(groups[key])
        shares = rng.dirichlet([alpha] * n_clients)
        cuts = (np.cumsum(shares)[:-1] * len(items)).astype(int)
        for client, chunk in enumerate(np.split(items, cuts)):
            parts[client].extend(chunk.tolist())
    # A client with no data cannot train: give it one item from the largest client.
    for client in range(n_clients):
        if not parts[client]:
            donor = max(range(n_clients), key=lambda c: len(parts[c]))
            parts[client].append(parts[donor].pop())
    return parts
