"""Observing a party's work without changing it: what benchmarks (FLOPs, time, tokens) hook into.

A hook is ``hook(work) -> context manager``; the party enters it around each piece of work. Nothing in
training depends on hooks, and a party with none pays one empty ``ExitStack``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Work:
    """One piece of a party's work: ``fwd``/``bwd``/``tail``/``whole`` on a client, ``server``
    (the server step; U-shape: the middle's forward) and ``server_bwd`` (U-shape) on the server."""

    party: str  # client name, or "server"
    kind: str
    step: int
    shape: tuple  # input shape: (B, T) of the batch, or (B, T, H) of received tensors (tuple of them: server)
    clients: tuple[str, ...] = field(default_factory=tuple)  # server work: whose batches it is
    input_tokens: int | None = None  # fwd/whole: real (attention-mask) tokens of the batch
    samples: int | None = None  # fwd/whole: rows of the batch


Hook = Callable[[Work], contextlib.AbstractContextManager]


def observe(hooks: list[Hook], work: Work) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for hook in hooks:
        stack.enter_context(hook(work))
    return stack
