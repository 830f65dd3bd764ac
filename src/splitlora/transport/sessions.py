"""The grid over gRPC: each client's session, its mailbox of commands, admission, deadlines, drops.

:class:`GrpcGrid` implements :class:`splitlora.runtime.grid.Grid` for clients on the other end of
a network. The algorithm's thread (the training loop) calls ``admit``/``ask``/``send``; the gRPC
handler threads call ``hello``/``exchange``/``leave``. They meet under one condition variable.

* ``ask`` and ``send`` encode a command into bytes (on the loop thread) and put it in the client's
  mailbox. A client's ``Exchange`` call takes the mailbox up to the first command that wants a
  reply; the client's next ``Exchange`` carries that reply. So a step costs one round trip, and
  fire-and-forget commands (a gradient, an average) ride along with the next request.
* Replies are checked and turned into tensors on the loop thread (:meth:`_Pending.get`), never in a
  handler thread: every torch op of the process runs on one thread (see docs/deployment.md, Threads).
* Every wait has a deadline: a reply not there within ``client_timeout`` drops its client, and so does
  one not there within ``straggler_floor + straggler_factor * r``, where ``r`` is the lower median of
  the other clients' recent answer times for that kind of command (a client that holds every barrier just
  under ``client_timeout`` would otherwise slow the run a hundredfold, unpunished); a call
  with nothing to deliver is answered ``Wait`` after ``poll_interval``; admission waits at most
  ``join_timeout``. A dropped client may say Hello again and is admitted at the next round boundary.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

import grpc

from ..config import RunConfig, ServeOptions
from ..messages import REPLY_OF, Finish, payload_nbytes
from ..runtime.grid import ClientInfo, Traffic
from . import splitlora_pb2 as pb
from .auth import safe_text
from .wire import (PROTOCOL_VERSION, Expect, Limits, WireError, command_to_proto, message_payload_bytes,
                   reply_from_proto)

log = logging.getLogger("splitlora.transport.server")


class Refused(Exception):
    """A call refused with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, text: str):
        super().__init__(text)
        self.code, self.text = code, text


class Stopped(Exception):
    """The run cannot go on (too few clients in time, or a stop was requested)."""


@dataclass
class _Member:
    info: ClientInfo
    session: int
    state: str = "waiting"  # waiting (joined, not admitted) | in | gone
    reason: str = ""
    code: grpc.StatusCode = grpc.StatusCode.ABORTED  # what a call of a dropped client is told
    outbox: list = field(default_factory=list)  # (pending or None, pb.Command) in order
    awaiting: "_Pending | None" = None  # the delivered command whose reply is owed


class _Pending:
    def __init__(self, grid: "GrpcGrid", member: _Member, command, proto: pb.Command, expect: Expect):
        self.grid, self.member, self.command, self.proto, self.expect = grid, member, command, proto, expect
        self.issued = time.monotonic()
        self.raw: pb.ClientMessage | None = None
        self.wire_bytes = 0

    def get(self):
        return self.grid._reply(self)


class GrpcGrid:
    """See the module doc. ``on_event(record)`` receives join/drop records (any thread)."""

    def __init__(self, cfg: RunConfig, opts: ServeOptions, limits: Limits, shapes: dict, fingerprint: str,
                 on_event=None):
        self.cfg, self.opts, self.limits, self.shapes = cfg, opts, limits, shapes
        self.fingerprint = fingerprint
        self.config_yaml = _config_yaml(cfg)
        self.index = {name: i for i, name in enumerate(opts.tokens)}
        self.min_clients = opts.min_clients
        self.on_event = on_event or (lambda record: None)
        self.cond = threading.Condition()
        self.members: dict[str, _Member] = {}
        self.traffic = Traffic()
        self.join_traffic = Traffic()
        self.step = 0
        self.refused = 0  # calls refused for authentication (counted by the interceptor)
        self.invalid = 0  # messages refused as malformed
        self.calls: dict[str, int] = {}
        self.stop_reason: str | None = None
        self.finished = False
        self.closed = False
        self.told: set[str] = set()  # clients that heard the run is over (Finish, or a finished Hello)
        self._started = False
        self._next_id = 1
        self.answer_times: dict[type, list[tuple[str, float]]] = {}  # command type -> recent (client, seconds)

    # ==== the loop's side: the Grid interface =======================================================
    def admit(self, step: int, boundary: bool, welcome) -> list[ClientInfo]:
        initial = not self._started
        need = self.cfg.clients if initial else self.min_clients
        deadline = None if self.opts.join_timeout is None else time.monotonic() + self.opts.join_timeout
        announced = False
        with self.cond:
            self.step = step
            while True:
                alive = [m for m in self.members.values() if m.state == "in"]
                waiting = [m for m in self.members.values() if m.state == "waiting"]
                may_admit = initial or boundary or len(alive) < self.min_clients
                if not may_admit:
                    break
                have = len(alive) + len(waiting)
                late = deadline is not None and time.monotonic() >= deadline
                if have >= need or (late and have >= self.min_clients):
                    break
                if late:
                    raise Stopped(f"only {have} clients after {self.opts.join_timeout:g}s, need {need}")
                if self.stop_reason:
                    raise Stopped(self.stop_reason)
                if not announced:
                    log.info("waiting for clients to join (%d/%d)", have, need)
                    announced = True
                self.cond.wait(0.25)
            admitted = sorted(waiting, key=lambda m: m.info.index) if may_admit else []
            for m in admitted:
                m.state = "in"
                sync = welcome(m.info)
                nbytes = payload_nbytes(sync, self.limits.dtype)
                self.join_traffic.down += nbytes
                self._enqueue(m, None, sync, count=False)
                self.on_event({"event": "join", "client": m.info.name, "step": step, "bytes_down": nbytes})
                log.info("client %s joined at step %d", m.info.name, step)
            self._started = True
            return sorted((m.info for m in self.members.values() if m.state == "in"), key=lambda c: c.index)

    def ask(self, client: ClientInfo, command) -> _Pending:
        with self.cond:
            m = self._member_of(client)
            expect = Expect(command, self.limits, self.cfg.steps, self.shapes, client.num_samples)
            pending = _Pending(self, m, command, None, expect)
            if m is None:
                pending.member = None
                return pending
            pending.proto = self._enqueue(m, pending, command)
            return pending

    def send(self, client: ClientInfo, command) -> None:
        with self.cond:
            m = self._member_of(client)
            if m is not None:
                self._enqueue(m, None, command)

    def alive(self, client: ClientInfo) -> bool:
        with self.cond:
            return self._member_of(client) is not None

    def drop(self, client: ClientInfo, reason: str) -> None:
        with self.cond:
            m = self._member_of(client)
            if m is not None:
                self._drop(m, reason)

    def peek(self, client: ClientInfo):
        return None  # a remote client's adapter is only known when it sends it

    def request_stop(self, reason: str) -> None:
        with self.cond:
            self.stop_reason = reason
            self.cond.notify_all()

    def stopping(self) -> str | None:
        return self.stop_reason

    def close(self, finished: bool, reason: str = "") -> None:
        """Tell every client that the run is over (or that the server stops), and wait until every
        client of the token file has heard it (members with their next call, late or dropped clients
        with their next Hello), at most ``linger`` seconds."""
        deadline = time.monotonic() + self.opts.linger
        with self.cond:
            self.finished = finished
            for m in self.members.values():
                if m.state != "gone":
                    self._enqueue(m, None, Finish(stop=not finished, reason=reason), count=False)
            self.closed = True
            self.cond.notify_all()
            everyone = set(self.index)
            while time.monotonic() < deadline and not everyone <= self.told:
                self.cond.wait(0.1)
            for m in self.members.values():
                if m.state != "gone":
                    m.state, m.reason = "gone", "the run is over" if finished else f"the server stopped: {reason}"
            self.cond.notify_all()

    # ---- internals (under ``cond``) -----------------------------------------------------------
    def _member_of(self, client: ClientInfo) -> _Member | None:
        m = self.members.get(client.name)
        if m is None or m.state != "in" or m.info != client:
            return None
        return m

    def _enqueue(self, m: _Member, pending, command, count: bool = True) -> pb.Command:
        command_id = 0
        if type(command) in REPLY_OF:
            command_id, self._next_id = self._next_id, self._next_id + 1
        proto = command_to_proto(command, command_id, self.cfg.wire_dtype)
        if count:
            self.traffic.down += message_payload_bytes(proto)
        m.outbox.append((pending, proto))
        self.cond.notify_all()
        return proto

    def _drop(self, m: _Member, reason: str, code: grpc.StatusCode = grpc.StatusCode.ABORTED) -> None:
        if m.state == "gone":
            return
        was_in = m.state == "in"
        m.state, m.reason, m.code = "gone", reason, code
        m.outbox.clear()
        m.awaiting = None
        self.cond.notify_all()
        if was_in:
            self.on_event({"event": "drop", "client": m.info.name, "step": self.step, "reason": reason})
            log.warning("client %s dropped at step %d: %s", m.info.name, self.step, reason)

    def _reply(self, p: _Pending):
        """Wait for ``p``'s reply (deadline ``client_timeout``), then check it here, on the loop thread."""
        m = p.member
        if m is None:
            return None
        with self.cond:
            while p.raw is None:
                if m.state == "gone":
                    return None
                timeout, relative = self._deadline(type(p.command), m.info.name)
                left = p.issued + timeout - time.monotonic()
                if left <= 0:
                    why = " (the others' answers' pace: --straggler-factor)" if relative else ""
                    self._drop(m, f"no answer to {type(p.command).__name__} within {timeout:g}s{why}")
                    return None
                self.cond.wait(min(left, 0.25))

        try:
            reply = reply_from_proto(p.raw, p.expect)
        except WireError as exc:
            with self.cond:
                self.invalid += 1
                self._drop(m, f"invalid {type(p.command).__name__} reply: {exc}", grpc.StatusCode.INVALID_ARGUMENT)
            return None
        with self.cond:
            self.traffic.up += message_payload_bytes(p.raw)
            self.traffic.wire_up += p.wire_bytes
        return reply

    ANSWER_HISTORY = 32  # recent answer times kept per command type

    def _deadline(self, kind: type, name: str) -> tuple[float, bool]:
        """Seconds client ``name``'s reply to a ``kind`` command may take, and whether the straggler rule
        set them (from the other clients' answer times: alone, a client is only held to client_timeout)."""
        times = [t for who, t in self.answer_times.get(kind, ()) if who != name]
        if not self.opts.straggler_factor or not times:
            return self.opts.client_timeout, False
        ref = sorted(times)[(len(times) - 1) // 2]
        relative = self.opts.straggler_floor + self.opts.straggler_factor * ref
        return (relative, True) if relative < self.opts.client_timeout else (self.opts.client_timeout, False)

    # ==== the handlers' side ==========================================================================
    def hello(self, name: str, req: pb.HelloRequest) -> pb.HelloReply:
        if req.protocol_version != PROTOCOL_VERSION:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"protocol version {req.protocol_version} is not supported (server: {PROTOCOL_VERSION})")
        reply = pb.HelloReply(protocol_version=PROTOCOL_VERSION, config_yaml=self.config_yaml,
                              base_fingerprint=self.fingerprint, index=self.index[name],
                              poll_interval=self.opts.poll_interval)
        with self.cond:
            if self.finished:
                reply.finished = True
                self.told.add(name)
                self.cond.notify_all()
                return reply
            if not req.join:
                return reply
            if self.closed:
                raise Refused(grpc.StatusCode.UNAVAILABLE, f"the server is stopping: {self.stop_reason or 'closed'}")
            if req.base_fingerprint and req.base_fingerprint != self.fingerprint:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              "the client's base model weights differ from the server's")
            if not 1 <= req.num_samples <= 1 << 40:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"num_samples {req.num_samples} out of range")
            old = self.members.get(name)
            if old is not None:
                self._drop(old, "reconnected (a new Hello)")
            session = secrets.randbits(62) + 1
            self.members[name] = _Member(ClientInfo(name, self.index[name], int(req.num_samples)), session)
            self.cond.notify_all()
        reply.session = session
        return reply

    def exchange(self, name: str, msg: pb.ClientMessage, wire_bytes: int, active) -> bytes | None:
        """Take ``msg`` (a reply, or a poll) and return the client's next commands, serialised
        (``None`` when the caller went away first)."""
        with self.cond:
            m = self.members.get(name)
            if m is None or m.session != msg.session:
                raise Refused(grpc.StatusCode.ABORTED, "not in the run (an old or unknown session): say Hello again")
            if m.state == "gone":
                raise self._gone(m)
            if msg.reply_to:
                p = m.awaiting
                if p is None or p.proto.id != msg.reply_to:
                    self.invalid += 1
                    self._drop(m, "sent a reply to a command it was not given", grpc.StatusCode.INVALID_ARGUMENT)
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "a reply to a command this client was not given")
                p.raw, p.wire_bytes = msg, wire_bytes
                m.awaiting = None
                # Recorded as it arrives (not when the loop reads it), so a stalled client ahead in the
                # loop's order is judged by the pace of those that already answered.
                times = self.answer_times.setdefault(type(p.command), [])
                times[:] = (times + [(name, time.monotonic() - p.issued)])[-self.ANSWER_HISTORY:]
                self.cond.notify_all()
            elif m.awaiting is not None:
                self._drop(m, "polled while it owed a reply")
                raise Refused(grpc.StatusCode.ABORTED, "a reply was owed: say Hello again")
            deadline = time.monotonic() + self.opts.poll_interval
            while True:
                if m.state == "gone":
                    raise self._gone(m)
                cut = next((i for i, (p, c) in enumerate(m.outbox) if c.id or c.HasField("finish")), None)
                if cut is not None or time.monotonic() >= deadline:
                    break
                if not active():
                    return None
                self.cond.wait(min(0.25, max(deadline - time.monotonic(), 0.001)))
            take = m.outbox[:cut + 1] if cut is not None else list(m.outbox)
            del m.outbox[:len(take)]
            out = pb.ServerMessage(commands=[c for _, c in take])
            if cut is None:
                out.commands.append(pb.Command(wait=pb.WaitMsg()))
            for p, c in take:
                if p is not None:
                    m.awaiting = p
                if c.HasField("finish"):
                    self.told.add(name)
            data = out.SerializeToString()
            self.traffic.wire_down += len(data)
            self.cond.notify_all()
            return data

    @staticmethod
    def _gone(m: _Member) -> Refused:
        """The refusal for a call of a dropped client: why (once, with the drop's code), then ABORTED."""
        code, m.code = m.code, grpc.StatusCode.ABORTED
        return Refused(code, f"dropped from the run ({m.reason}): say Hello again")

    def leave(self, name: str, msg: pb.Done) -> None:
        with self.cond:
            m = self.members.get(name)
            if m is None or m.session != msg.session or m.state == "gone":
                return
            if name in self.told and not msg.error:
                # The goodbye of a client that heard the run is over: not a drop (close() may still be
                # waiting for a client that never comes back).
                m.state, m.reason = "gone", "finished"
                self.cond.notify_all()
                return
            self._drop(m, f"left with an error: {safe_text(msg.error)}" if msg.error else "left")

    def drop_name(self, name: str, reason: str, code: grpc.StatusCode) -> None:
        """A call of ``name`` was malformed: its client leaves the run."""
        with self.cond:
            self.invalid += 1
            m = self.members.get(name)
            if m is not None:
                self._drop(m, reason, code)

    @contextlib.contextmanager
    def call_slot(self, name: str):
        """At most ``calls_per_client`` calls of one client at a time; more are refused at once."""
        with self.cond:
            if self.calls.get(name, 0) >= self.opts.calls_per_client:
                raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"client {name} already has {self.calls[name]} calls open")
            self.calls[name] = self.calls.get(name, 0) + 1
        try:
            yield
        finally:
            with self.cond:
                self.calls[name] -= 1


def _config_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
