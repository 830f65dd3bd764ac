"""The simulation's transport: every client is a :class:`~splitlora.runtime.client.ClientApp` in this
process. Messages are handed over by reference after the dtype round trip the network applies, and
every byte that would cross the wire is counted.

A command that expects a reply runs when its reply is asked for (:meth:`Pending.get`), and only then;
so in ``sequential`` mode one client's graph is alive at a time. Commands to one client run in the
order they were issued.
"""

from __future__ import annotations

from collections import deque

from ..errors import UserError
from ..messages import WIRE_DTYPES, payload_nbytes, wire_precision
from ..runtime.grid import ClientInfo, Traffic


class _Pending:
    def __init__(self, grid: "InProcessGrid", client: ClientInfo, command):
        self.grid, self.client, self.command = grid, client, command
        self.done, self.reply = False, None

    def get(self):
        self.grid._run_until(self.client, self)
        return self.reply


class InProcessGrid:
    min_clients = 1

    def __init__(self, apps, wire_dtype: str = "fp32"):
        self.apps = {app.name: app for app in apps}
        self.clients = [ClientInfo(app.name, app.index, app.num_samples) for app in apps]
        self.dtype = WIRE_DTYPES[wire_dtype]
        self.traffic = Traffic()
        self.join_traffic = Traffic()
        self.observers: list = []  # fn(direction, client name, message, nbytes): for benchmarks
        self._joined: set[str] = set()
        self._queues: dict[str, deque] = {c.name: deque() for c in self.clients}

    # ---- the Grid interface -----------------------------------------------------------------------
    def admit(self, step: int, boundary: bool, welcome) -> list[ClientInfo]:
        for c in self.clients:
            if c.name not in self._joined:
                self._joined.add(c.name)
                sync = welcome(c)
                self.join_traffic.down += payload_nbytes(sync, self.dtype)
                self.apps[c.name].handle(sync)
        return list(self.clients)

    def ask(self, client: ClientInfo, command) -> _Pending:
        pending = _Pending(self, client, command)
        self._queues[client.name].append(pending)
        return pending

    def send(self, client: ClientInfo, command) -> None:
        self._run_until(client, None)
        self._deliver(client, command)

    def alive(self, client: ClientInfo) -> bool:
        return True

    def drop(self, client: ClientInfo, reason: str) -> None:
        # A simulated client is honest: a refused contribution means training itself went wrong.
        raise UserError(f"client {client.name}: {reason} (training diverged? try a lower lr)")

    def peek(self, client: ClientInfo):
        return self.apps[client.name].lora_state()

    # ---- delivery ------------------------------------------------------------------------------
    def _run_until(self, client: ClientInfo, target) -> None:
        """Run ``client``'s queued asks in order, up to ``target`` (all of them for None)."""
        queue = self._queues[client.name]
        while queue and (target is None or not target.done):
            pending = queue.popleft()
            pending.reply = self._deliver(client, pending.command)
            pending.done = True

    def _deliver(self, client: ClientInfo, command):
        down = payload_nbytes(command, self.dtype)
        self.traffic.down += down
        self._observe("down", client, command, down)
        reply = self.apps[client.name].handle(wire_precision(command, self.dtype))
        if reply is None:
            return None
        up = payload_nbytes(reply, self.dtype)
        self.traffic.up += up
        self._observe("up", client, reply, up)
        return wire_precision(reply, self.dtype)

    def _observe(self, direction, client, message, nbytes) -> None:
        for fn in self.observers:
            fn(direction, client.name, message, nbytes)
