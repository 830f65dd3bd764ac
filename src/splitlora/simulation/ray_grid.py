"""The grid over Ray: every client is a :class:`~splitlora.runtime.client.ClientApp` inside a Ray actor.

:class:`RayGrid` implements :class:`splitlora.runtime.grid.Grid` for clients hosted by long-lived
Ray actors (:class:`~splitlora.simulation.ray_backend.ClientHost`; several clients may share one
actor). It holds no training logic: it hands commands to the actors and replies back, counts their
bytes and applies the wire dtype exactly as :class:`~splitlora.simulation.inprocess.InProcessGrid`
does, so a run's metrics rows and adapter are the in-process run's.

* ``ask`` submits the command at once (an actor task: actors compute in parallel);
  :meth:`_Pending.get` waits for it (``ray.get`` with the grid's ``timeout``). ``send`` submits and
  does not wait; what it raised is looked at with the client's next reply.
* Commands to one client run in the order they were issued: they are tasks of one actor, submitted
  by one caller, and an actor runs those in submission order (one at a time).
* Tensors travel as Ray objects (the actor call's arguments and results), on the CPU.
* An actor that died (``RayActorError``) or let a command pass ``timeout`` drops its clients, as a
  lost client is dropped over gRPC: their replies are ``None`` and the run goes on with the others.
  A dropped client does not come back. With fewer than ``min_clients`` left the run stops.

Ray pickles what it moves: this is a transport for one trusted cluster, never across organisations
(that is the gRPC transport's job, with its checks).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from ..errors import UserError
from ..messages import WIRE_DTYPES, Handover, payload_nbytes, wire_precision
from ..runtime.grid import ClientInfo, Done, Traffic

log = logging.getLogger("splitlora.transport.ray")


def portable(msg):
    """``msg`` with every tensor on the CPU (what may cross to another process or node)."""
    if msg is None:
        return None
    changes = {}
    for f in dataclasses.fields(msg):
        value = getattr(msg, f.name)
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            changes[f.name] = value.cpu()
        elif isinstance(value, dict) and any(isinstance(v, torch.Tensor) and v.device.type != "cpu"
                                             for v in value.values()):
            changes[f.name] = {k: v.cpu() for k, v in value.items()}
        elif isinstance(value, Handover):
            moved = portable(value)
            if moved is not value:
                changes[f.name] = moved
    return dataclasses.replace(msg, **changes) if changes else msg


class _Pending:
    def __init__(self, grid: "RayGrid", client: ClientInfo, command, ref, before: list):
        self.grid, self.client, self.command, self.ref, self.before = grid, client, command, ref, before
        self.done, self.reply = False, None

    def get(self):
        if not self.done:
            self.done = True
            self.reply = self.grid._reply(self)
        return self.reply


class RayGrid:
    """See the module doc. ``hosts``: client name -> the actor that hosts it."""

    def __init__(self, hosts: dict, clients: list[ClientInfo], wire_dtype: str = "fp32", timeout: float = 600.0,
                 min_clients: int = 1, on_event=None):
        self.hosts = hosts
        self.clients = sorted(clients, key=lambda c: c.index)
        self.dtype = WIRE_DTYPES[wire_dtype]
        self.timeout = timeout
        self.min_clients = min_clients
        self.on_event = on_event or (lambda record: None)  # drop records
        self.traffic = Traffic()
        self.join_traffic = Traffic()
        self.observers: list = []  # fn(direction, client name, message, nbytes): for benchmarks
        self.gone: dict[str, str] = {}  # client name -> why it was dropped
        self.step = 0
        self._joined: set[str] = set()
        self._unchecked: dict[str, list] = {c.name: [] for c in self.clients}  # refs of sends not yet looked at

    # ---- the Grid interface -----------------------------------------------------------------------
    def admit(self, step: int, boundary: bool, welcome) -> list[ClientInfo]:
        self.step = step
        for c in self.clients:
            if c.name not in self._joined and c.name not in self.gone:
                self._joined.add(c.name)
                sync = welcome(c)
                self.join_traffic.down += payload_nbytes(sync, self.dtype)
                self._unchecked[c.name].append(self._submit(c, sync))
        alive = [c for c in self.clients if c.name not in self.gone]
        if len(alive) < self.min_clients:
            from ..runtime.loop import Stopped

            why = "; ".join(f"{name}: {reason}" for name, reason in self.gone.items())
            raise Stopped(f"{len(alive)} clients left, fewer than min_clients={self.min_clients} ({why})")
        return alive

    def ask(self, client: ClientInfo, command) -> _Pending | Done:
        if not self.alive(client):
            return Done(None)
        self._count("down", client, command)
        before, self._unchecked[client.name] = self._unchecked[client.name], []
        return _Pending(self, client, command, self._submit(client, command), before)

    def send(self, client: ClientInfo, command) -> None:
        if not self.alive(client):
            return
        self._count("down", client, command)
        self._unchecked[client.name].append(self._submit(client, command))

    def alive(self, client: ClientInfo) -> bool:
        return client.name in self.hosts and client.name not in self.gone

    def drop(self, client: ClientInfo, reason: str) -> None:
        # A simulated client is honest (as in process): a refused contribution means training went wrong.
        raise UserError(f"client {client.name}: {reason} (training diverged? try a lower lr)")

    def peek(self, client: ClientInfo):
        if not self.alive(client):
            return None
        before, self._unchecked[client.name] = self._unchecked[client.name], []
        return self._wait(client, before, self.hosts[client.name].lora_state.remote(client.name), "lora_state")

    # ---- beyond the interface -------------------------------------------------------------------
    def close(self) -> None:
        """Look at the outcome of every command sent and not yet looked at (raises what a client raised)."""
        for c in self.clients:
            refs, self._unchecked[c.name] = self._unchecked[c.name], []
            if refs and self.alive(c):
                self._wait(c, refs[:-1], refs[-1], "the last commands")

    def lose(self, client: ClientInfo, reason: str) -> None:
        """Drop ``client`` (and every client its actor hosts, when the actor is gone) from the run."""
        if client.name in self.gone:
            return
        self.gone[client.name] = reason
        self._unchecked[client.name] = []
        self.on_event({"event": "drop", "client": client.name, "step": self.step, "reason": reason})
        log.warning("client %s dropped at step %d: %s", client.name, self.step, reason)

    # ---- delivery ----------------------------------------------------------------------------------
    def _submit(self, client: ClientInfo, command):
        return self.hosts[client.name].handle.remote(client.name, portable(wire_precision(command, self.dtype)))

    def _count(self, direction: str, client: ClientInfo, message) -> None:
        nbytes = payload_nbytes(message, self.dtype)
        if direction == "down":
            self.traffic.down += nbytes
        else:
            self.traffic.up += nbytes
        for fn in self.observers:
            fn(direction, client.name, message, nbytes)

    def _reply(self, p: _Pending):
        if not self.alive(p.client):
            return None
        reply = self._wait(p.client, p.before, p.ref, type(p.command).__name__)
        if reply is None:
            return None
        self._count("up", p.client, reply)
        return wire_precision(reply, self.dtype)

    def _wait(self, client: ClientInfo, before: list, ref, what: str):
        """``ref``'s value once ``before`` (sends issued earlier) succeeded; None when the client is lost."""
        import ray
        from ray.exceptions import GetTimeoutError, OutOfMemoryError, RayActorError, WorkerCrashedError

        try:
            values = ray.get([*before, ref], timeout=self.timeout)
        except (RayActorError, OutOfMemoryError, WorkerCrashedError) as exc:  # the actor process is gone
            host = _actor_id(self.hosts[client.name])
            reason = f"its Ray actor died ({_first_line(exc)})"
            for c in self.clients:  # every client of that actor is gone with it
                if _actor_id(self.hosts[c.name]) == host:
                    self.lose(c, reason)
            return None
        except GetTimeoutError:
            self.lose(client, f"no answer to {what} within {self.timeout:g}s")
            return None
        return values[-1]


def _actor_id(handle):
    return getattr(handle, "_actor_id", id(handle))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
