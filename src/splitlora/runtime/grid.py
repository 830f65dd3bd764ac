"""The one seam between an algorithm and its clients (Flower's ``Grid`` is the model).

An algorithm's step is written once, against :class:`Grid`: it asks clients for work with
:meth:`Grid.ask` (a command that expects a reply, see :mod:`splitlora.messages`), tells them things
with :meth:`Grid.send`, and learns who is in the run with :meth:`Grid.admit`. It neither knows nor
cares whether a client is an object in this process, a process across the internet (gRPC) or an
actor on a cluster (Ray). A transport implements the interface and holds no training logic.

Two rules make one schedule right for every transport:

* commands to one client are carried out in the order they were issued;
* :meth:`Pending.get` is where a reply is needed. A transport may start the work when the command
  is issued (remote clients compute in parallel) or only when ``get`` is called (in process, one
  client at a time, so one client's graph is alive at a time). Client work never depends on
  another client's, so both orders compute the same thing.

A client that is gone (disconnected, timed out, sent something invalid) answers ``None``; commands
sent to it are dropped. The algorithm goes on with the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Protocol


@dataclass
class Traffic:
    """Bytes that crossed (or, in simulation, would have crossed) the network.

    ``up``/``down``: tensor payload bytes, counted the same way by every transport (activations and
    gradients in the wire dtype, masks uint8, labels int32, adapters fp32); ``wire_up``/``wire_down``:
    serialised message bytes, where a transport has them (0 in simulation).
    """

    up: int = 0
    down: int = 0
    wire_up: int = 0
    wire_down: int = 0

    def copy(self) -> "Traffic":
        return Traffic(self.up, self.down, self.wire_up, self.wire_down)

    def __sub__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.up - other.up, self.down - other.down, self.wire_up - other.wire_up,
                       self.wire_down - other.wire_down)


@dataclass(frozen=True)
class ClientInfo:
    """A client as the algorithm sees it: its name, its index (fixes its data seed) and its sample count."""

    name: str
    index: int
    num_samples: int


class Pending(Protocol):
    def get(self):
        """The reply, or ``None`` when the client is gone."""


class Grid(Protocol):
    min_clients: int  # fewest clients a step or an aggregation goes ahead with
    traffic: Traffic  # what the run's steps sent so far (joins not included)

    def admit(self, step: int, boundary: bool, welcome: Callable[[ClientInfo], object]) -> list[ClientInfo]:
        """The clients in the run for ``step``, in index order.

        At a ``boundary`` (the start of a round) waiting clients are admitted, each first sent
        ``welcome(client)`` (a :class:`~splitlora.messages.Sync`); the transport may wait here until
        enough clients are in. Between boundaries nobody joins (unless too few are left).
        """

    def ask(self, client: ClientInfo, command) -> Pending:
        """Issue a command that expects a reply."""

    def send(self, client: ClientInfo, command) -> None:
        """Issue a command that expects none."""

    def alive(self, client: ClientInfo) -> bool:
        """Whether the client is still in the run."""

    def drop(self, client: ClientInfo, reason: str) -> None:
        """Leave the client out of the run from now on (its contribution was refused)."""

    def peek(self, client: ClientInfo):
        """The client's current LoRA state without sending anything (simulation only; else None)."""


class Done:
    """A :class:`Pending` whose answer is already known (e.g. ``None`` for a client that is gone)."""

    def __init__(self, value=None):
        self.value = value

    def get(self):
        return self.value


def gather(pending: dict) -> dict:
    """``{client: reply}`` of those ``pending`` that answered, in the given order."""
    out = {}
    for client, p in pending.items():
        reply = p.get()
        if reply is not None:
            out[client] = reply
    return out


def ask_all(grid: Grid, clients: Iterable[ClientInfo], make: Callable[[ClientInfo], object]) -> dict:
    """Issue ``make(c)`` to every client first (so remote clients work in parallel), then collect."""
    return gather({c: grid.ask(c, make(c)) for c in clients})
