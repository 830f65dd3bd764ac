"""``splitlora serve``: the main server and the fed server behind one authenticated gRPC service.

The training loop (:class:`Coordinator`) is the in-process ``SplitLoRA`` schedule with the clients
on the other end of a network: for step t it collects the activations of every admitted client,
runs :meth:`SplitServer.process` on them in client-id order, sends each gradient back, and at the
end of a round FedAvg-s the client adapters (:func:`fedavg`). The gRPC handlers only authenticate,
read and check messages, hand them to the loop and wait for its answer; they never touch a model.

Faults: a client whose call breaks or who misses ``client_timeout`` is dropped from the round; a
client that says Hello again is admitted at the next round boundary (at once when fewer than
``min_clients`` are left) with the last averaged adapter. After every aggregation that is due, the
server state is checkpointed atomically; ``resume`` continues from it.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import signal
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import grpc
import torch
from tqdm.auto import tqdm

from ..algorithms.base import weighted_loss
from ..config import RunConfig
from ..errors import UserError
from ..models.loading import LoadedModel, load_model
from ..models.lora import (add_lora, initial_lora_state, load_lora_state, lora_state, save_adapter,
                           side_lora_config, whole_lora_config)
from ..models.split import architecture_of, check_cut, make_part
from ..runtime.aggregator import fedavg
from ..runtime.checkpoint import load_checkpoint, save_checkpoint
from ..runtime.metrics import MetricsLog
from ..runtime.server import SplitServer
from ..train import resolve_device, setup_torch
from . import splitlora_pb2 as pb
from . import splitlora_pb2_grpc as pb_grpc
from .messages import AdapterUpdate
from .wire import (GRPC_FRAME_LIMIT, PROTOCOL_VERSION, CutLimits, WireError, activations_from_proto,
                   base_fingerprint, from_chunks, gradients_to_proto, payload_bytes, state_payload_bytes,
                   state_shapes, state_to_proto, state_wire_bytes, to_chunks, update_from_proto)

log = logging.getLogger(__name__)

AUTH_KEY = "authorization"
CLIENT_ID_KEY = "splitlora-client-id"
ENDPOINT_FILE = "endpoint"  # DIR/endpoint: "host:port" once the server listens
CHECKPOINT_DIR = "checkpoint"
HELLO_LIMIT = 64 << 10
_OVERHEAD = 256 << 10  # protobuf framing and tensor names on top of the tensor bytes


# ---- configuration --------------------------------------------------------------------------

def read_token_file(path: str | Path) -> dict[int, str]:
    """``CLIENT_ID TOKEN`` per line (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"token file not found: {path}")
    tokens: dict[int, str] = {}
    seen: set[str] = set()
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or len(parts[0]) > 9:
            raise UserError(f"{path}:{lineno}: expected 'CLIENT_ID TOKEN' with an integer client id")
        cid, token = int(parts[0]), parts[1]
        if cid in tokens:
            raise UserError(f"{path}:{lineno}: client id {cid} listed twice")
        if token in seen:
            raise UserError(f"{path}:{lineno}: two clients share one token")
        tokens[cid] = token
        seen.add(token)
    if not tokens:
        raise UserError(f"token file {path} lists no clients")
    return tokens


@dataclass
class ServeOptions:
    tokens: dict[int, str]
    listen: str = "127.0.0.1:50051"
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    min_clients: int = 1  # fewest clients a step and an aggregation go ahead with
    client_timeout: float = 120.0  # seconds a client may take to send its step or adapter
    join_timeout: float | None = None  # seconds to wait for clients to (re)join; None = forever
    checkpoint_every: int = 0  # steps between checkpoints (taken after a round); 0 = every round
    resume: bool = False
    max_message_bytes: int = 512 << 20
    progress: bool = True
    handle_signals: bool = True  # SIGINT/SIGTERM stop cleanly (main thread only)

    def validate(self, cfg: RunConfig) -> "ServeOptions":
        if not 1 <= self.min_clients <= cfg.clients:
            raise UserError(f"--min-clients must be between 1 and clients={cfg.clients} (got {self.min_clients})")
        if len(self.tokens) < cfg.clients:
            raise UserError(f"the token file lists {len(self.tokens)} clients, the config needs {cfg.clients}")
        if self.client_timeout <= 0:
            raise UserError("--client-timeout must be > 0")
        if self.join_timeout is not None and self.join_timeout <= 0:
            raise UserError("--join-timeout must be > 0")
        if self.checkpoint_every < 0:
            raise UserError("--checkpoint-every must be >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UserError("--tls-cert and --tls-key go together")
        if cfg.algorithm != "splitlora":
            raise UserError(f"serve runs algorithm splitlora (the config says {cfg.algorithm!r})")
        return self


@dataclass
class ServeResult:
    out_dir: Path
    adapter_dir: Path
    steps_done: int
    finished: bool
    tokens: int
    seconds: float
    first_loss: float
    last_loss: float
    bytes_up: int
    bytes_down: int
    wire_bytes_up: int
    wire_bytes_down: int
    port: int = 0


# ---- the server's share of the model ----------------------------------------------------------

@dataclass
class ServerSide:
    """What the server keeps after start-up: its part, and facts about the client part."""

    server: SplitServer
    init_client_state: dict[str, torch.Tensor]
    client_shapes: dict[str, tuple[int, ...]]
    fingerprint: str  # of the client part's frozen weights
    limits: CutLimits
    whole_config: Any  # the whole-model LoraConfig of the adapter we write
    base_path: str


def build_server_side(cfg: RunConfig, loaded: LoadedModel) -> ServerSide:
    """Compute the run's initial adapter on the whole model, then keep only the server part."""
    model = loaded.model
    model.requires_grad_(False)
    check_cut(model, cfg.cut_layer)
    init = initial_lora_state(model, cfg)
    arch = architecture_of(model)
    client_part = make_part(model, "client", cfg.cut_layer)
    fingerprint = base_fingerprint(client_part)
    add_lora(client_part, side_lora_config(cfg.client_lora, arch))
    shapes = state_shapes(lora_state(client_part))
    del client_part
    server_part = add_lora(make_part(model, "server", cfg.cut_layer), side_lora_config(cfg.server_lora, arch))
    server_part.to(resolve_device(cfg.device))  # only the server's modules move
    load_lora_state(server_part, init)
    total = cfg.steps * cfg.clients if cfg.server_mode == "sequential" else cfg.steps
    limits = CutLimits(cfg.batch_size, cfg.max_length, model.config.hidden_size, model.config.vocab_size,
                       cfg.wire_dtype)
    return ServerSide(SplitServer(server_part, cfg, total), {k: init[k] for k in shapes}, shapes, fingerprint,
                      limits, whole_lora_config(model, cfg), loaded.base_path)


def run_spec(cfg: RunConfig) -> pb.RunSpec:
    import yaml

    lora = cfg.client_lora
    return pb.RunSpec(config_yaml=yaml.safe_dump(cfg.to_dict(), sort_keys=False), model=cfg.model,
                      cut_layer=cfg.cut_layer, client_rank=lora.rank, client_alpha=lora.alpha,
                      client_dropout=lora.dropout, client_target_modules=list(lora.target_modules or []),
                      steps=cfg.steps, aggregate_every=cfg.aggregate_every, wire_dtype=cfg.wire_dtype)


# ---- shared state between the handlers and the loop -------------------------------------------

class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, text: str):
        super().__init__(text)
        self.code, self.text = code, text


class _Request:
    """One call waiting for the loop: a join, a step or an upload."""

    def __init__(self, kind: str, client_id: int, session: int, payload: Any, wire_bytes: int = 0,
                 decode: Callable[[], Any] | None = None):
        self.kind, self.client_id, self.session, self.payload = kind, client_id, session, payload
        self.decode = decode  # builds ``payload`` from the message; run on the loop thread (see _decode)
        self.wire_bytes = wire_bytes
        self.payload_bytes = 0  # tensor bytes, counted as the simulation counts them
        self.done = threading.Event()
        self.reply: Any = None
        self.error: tuple[grpc.StatusCode, str] | None = None
        self.delivered = False  # the whole reply went out
        self.cancelled = False  # the caller went away before an answer

    def resolve(self, reply) -> None:
        self.reply = reply
        self.done.set()

    def fail(self, code: grpc.StatusCode, text: str) -> None:
        if not self.done.is_set():
            self.error = (code, text)
            self.done.set()


@dataclass
class Member:
    client_id: int
    session: int
    num_samples: int
    joined_step: int
    dead: str = ""  # why the client is gone ("" while alive)


class _Stopped(Exception):
    """The run stops before its last step (Ctrl-C, or too few clients)."""


@dataclass
class _Totals:
    tokens: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    wire_up: int = 0
    wire_down: int = 0
    elapsed: float = 0.0  # seconds of training before this process (resume)


@dataclass
class _Traffic:
    up: int = 0  # tensor bytes, counted as the simulation counts them
    down: int = 0
    wire_up: int = 0  # serialised message bytes
    wire_down: int = 0

    def __add__(self, other: "_Traffic") -> "_Traffic":
        return _Traffic(self.up + other.up, self.down + other.down, self.wire_up + other.wire_up,
                        self.wire_down + other.wire_down)


@dataclass
class _Round:
    reqs: dict[int, _Request]
    reply: pb.AdapterDown
    event: dict
    traffic: _Traffic
    final: bool  # the last round of the run, or of this server process


class Coordinator:
    """The server's training loop, and the state the gRPC handlers share with it (under ``cond``)."""

    def __init__(self, cfg: RunConfig, side: ServerSide, opts: ServeOptions, out: Path):
        self.cfg, self.side, self.opts, self.out = cfg, side, opts, out
        self.server = side.server
        self.cond = threading.Condition()
        self.members: dict[int, Member] = {}
        self.joins: dict[int, _Request] = {}
        self.step_inbox: dict[int, _Request] = {}
        self.upload_inbox: dict[int, _Request] = {}
        self.step = 0  # the next step to run
        self.upload_step: int | None = None  # the step whose round-end uploads are accepted now
        self.round = 0
        self.client_state = dict(side.init_client_state)  # the last averaged client adapter
        self.participants: list[tuple[int, int]] = []  # (client id, samples) of the last average
        self.last_checkpoint = -1
        self.consistent = True  # server and client_state reflect the same steps (a checkpoint point)
        self.finished = False
        self.closed = False
        self.stop_event = threading.Event()
        self.stop_reason = ""
        self.totals = _Totals()
        self.first_loss = self.last_loss = float("nan")
        self.refused = 0  # calls refused for authentication (for tests and the summary)
        self.invalid = 0  # messages refused as malformed
        self._metrics_lock = threading.Lock()
        self.spec = run_spec(cfg)
        self.metrics: MetricsLog | None = None
        self.adapter_dir = out / "adapter"
        self._clock = time.perf_counter()
        self._bar = None

    # ---- start-up: fresh or resumed ---------------------------------------------------------
    def open(self, state: dict | None) -> None:
        """Start fresh (``state`` None) or from a checkpoint (see :func:`read_resume_state`)."""
        if state is None:
            self.cfg.save(self.out / "config.yaml")
            self.metrics = MetricsLog(self.out)
            return
        load_lora_state(self.server.part, state["server_lora"])
        self.server.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        self.step = self.last_checkpoint = int(state["step"])
        self.round = int(state["round"])
        self.client_state = {k: v.clone() for k, v in state["client_state"].items()}
        self.participants = [(int(c), int(n)) for c, n in state["participants"]]
        self.totals = _Totals(**state["totals"])
        self.first_loss, self.last_loss = float(state["first_loss"]), float(state["last_loss"])
        self.finished = self.step >= self.cfg.steps
        rows = _truncate_metrics(self.out / "metrics.jsonl", int(state["metrics_bytes"]))
        self.metrics = MetricsLog(self.out, append=True)
        self.metrics.rows = rows
        self._write({"event": "resume", "step": self.step, "round": self.round})

    # ---- called by handlers (any thread) ----------------------------------------------------
    def submit_join(self, cid: int, msg: pb.HelloRequest) -> _Request:
        if msg.base_fingerprint and msg.base_fingerprint != self.side.fingerprint:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          "the client's base model weights differ from the server's")
        req = _Request("join", cid, 0, int(msg.num_samples))
        with self.cond:
            if self.closed or self.stop_event.is_set():
                raise Refused(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
            old = self.joins.pop(cid, None)
            if old is not None:
                old.fail(grpc.StatusCode.ABORTED, "superseded by a newer Hello from the same client")
            member = self.members.get(cid)
            if member is not None and not member.dead:
                member.dead = "reconnected"  # the old connection is stale: drop it, admit the new one
            if self.finished:
                req.resolve(self._hello_reply(cid, 0, finished=True))
            else:
                self.joins[cid] = req
            self.cond.notify_all()
        return req

    def submit_step(self, cid: int, msg: pb.ActivationsUp, wire_bytes: int) -> _Request:
        req = _Request("step", cid, msg.session, None, wire_bytes,
                       decode=lambda: activations_from_proto(msg, cid, self.side.limits))
        req.payload_bytes = payload_bytes(msg.hidden, msg.attention_mask, msg.labels)
        with self.cond:
            self._check_member(cid, msg.session)
            if msg.step != self.step or self.upload_step is not None:
                raise Refused(grpc.StatusCode.ABORTED, f"step {msg.step} is not the step the server runs "
                                                       f"now ({self.step}): say Hello again")
            if cid in self.step_inbox:
                raise Refused(grpc.StatusCode.ABORTED, f"step {msg.step} was already sent")
            self.step_inbox[cid] = req
            self.cond.notify_all()
        return req

    def submit_upload(self, cid: int, msg: pb.AdapterUp, wire_bytes: int) -> _Request:
        req = _Request("upload", cid, msg.session, None, wire_bytes,
                       decode=lambda: update_from_proto(msg, cid, self.side.client_shapes))
        req.payload_bytes = state_payload_bytes(msg.state)
        with self.cond:
            member = self._check_member(cid, msg.session)
            if self.upload_step is None or msg.step != self.upload_step:
                raise Refused(grpc.StatusCode.ABORTED, f"no aggregation is open for step {msg.step}")
            if cid in self.upload_inbox:
                raise Refused(grpc.StatusCode.ABORTED, "this round's adapter was already sent")
            if msg.num_samples != member.num_samples:
                raise WireError(f"num_samples {msg.num_samples} differs from the {member.num_samples} "
                                f"announced in Hello")
            self.upload_inbox[cid] = req
            self.cond.notify_all()
        return req

    def leave(self, cid: int, msg: pb.Done) -> None:
        with self.cond:
            member = self.members.get(cid)
            if member is not None and member.session == msg.session and not member.dead:
                member.dead = f"left with an error: {msg.error[:200]}" if msg.error else "left"
                self.cond.notify_all()

    def call_ended(self, req: _Request) -> None:
        """A call's RPC ended; if its answer did not go out, the client is gone.

        A call the server failed on purpose (a refused message, a drop) has had its state cleaned up
        by whoever failed it; its client is still there.
        """
        if req.delivered or req.error is not None:
            return
        with self.cond:
            req.cancelled = True
            if req.kind == "join" and self.joins.get(req.client_id) is req:
                del self.joins[req.client_id]
            session = req.session if req.kind != "join" else getattr(req.reply, "session", 0)
            member = self.members.get(req.client_id)
            if member is not None and session and member.session == session and not member.dead:
                member.dead = "disconnected"
            self.cond.notify_all()

    def _check_member(self, cid: int, session: int) -> Member:
        member = self.members.get(cid)
        if member is None or member.session != session or member.dead:
            raise Refused(grpc.StatusCode.ABORTED, "not in the run (dropped, or an old session): say Hello again")
        return member

    # ---- the loop (one thread) --------------------------------------------------------------
    def run(self) -> None:
        self._clock = time.perf_counter()
        self._bar = tqdm(total=self.cfg.steps, initial=self.step, desc="serve", unit="step",
                         disable=not self.opts.progress, dynamic_ncols=True)
        try:
            if not self.finished:
                self._admit(initial=True)
            self._clock = time.perf_counter()  # training time starts when the clients are in
            while self.step < self.cfg.steps:
                t = self.step
                if self.stop_event.is_set() and self.consistent:  # at a round boundary
                    raise _Stopped(self.stop_reason or "stopped")
                if t % self.cfg.aggregate_every == 0 or self._alive() < self.opts.min_clients:
                    self._admit(initial=False)
                self._run_step(t)
            self.finished = True
        except _Stopped as stop:
            self._say(f"stopping at step {self.step}: {stop}")
        finally:
            self._bar.close()

    def _alive(self) -> int:
        return sum(1 for m in self.members.values() if not m.dead)

    def _admit(self, initial: bool) -> None:
        """Admit waiting clients; wait for enough of them (all at the start, else ``min_clients``)."""
        need = self.cfg.clients if initial else self.opts.min_clients
        deadline = None if self.opts.join_timeout is None else time.monotonic() + self.opts.join_timeout
        announced = False
        with self.cond:
            while True:
                self._reap()
                waiting = sorted(c for c, r in self.joins.items() if not r.cancelled)
                free = self.cfg.clients - len(self.members)
                enough = len(self.members) + min(len(waiting), free) >= need
                late = deadline is not None and time.monotonic() >= deadline
                if enough or (late and len(self.members) + min(len(waiting), free) >= self.opts.min_clients):
                    break
                if late:
                    raise _Stopped(f"only {len(self.members) + len(waiting)} clients after "
                                   f"{self.opts.join_timeout:.0f}s, need {need}")
                if self.stop_event.is_set():
                    raise _Stopped(self.stop_reason)
                if not announced:
                    self._say(f"waiting for clients to join ({len(self.members) + len(waiting)}/{need})")
                    announced = True
                self.cond.wait(0.25)
            admitted = []
            for cid in waiting[:max(free, 0)]:
                req = self.joins.pop(cid)
                member = Member(cid, secrets.randbits(62) + 1, req.payload, self.step)
                self.members[cid] = member
                reply = self._hello_reply(cid, member.session)
                req.resolve(reply)
                admitted.append((cid, state_payload_bytes(reply.client_state)))
        for cid, nbytes in admitted:
            self._write({"event": "join", "client": cid, "step": self.step, "round": self.round,
                         "bytes_down": nbytes})
            self._say(f"client {cid} joined at step {self.step}")

    def _hello_reply(self, cid: int, session: int, finished: bool = False) -> pb.HelloReply:
        return pb.HelloReply(protocol_version=PROTOCOL_VERSION, run=self.spec, session=session,
                             start_step=self.step, round=self.round,
                             client_state=[] if finished else state_to_proto(self.client_state),
                             base_fingerprint=self.side.fingerprint, finished=finished)

    def _reap(self) -> None:
        """Drop members marked dead (under ``cond``)."""
        for cid, member in list(self.members.items()):
            if member.dead:
                self._drop(cid, member.dead)

    def _drop(self, cid: int, reason: str) -> None:
        member = self.members.pop(cid, None)
        if member is None:
            return
        for box in (self.step_inbox, self.upload_inbox):
            req = box.pop(cid, None)
            if req is not None:
                req.fail(grpc.StatusCode.ABORTED, f"dropped from the run ({reason}): say Hello again")
        self._write({"event": "drop", "client": cid, "step": self.step, "reason": reason})
        log.warning("client %d dropped at step %d: %s", cid, self.step, reason)

    def _collect(self, box: dict[int, _Request], what: str) -> dict[int, _Request]:
        """Wait until every member has a decoded request in ``box`` (or is dropped); take them all."""
        deadline = time.monotonic() + self.opts.client_timeout
        while True:
            self._decode(box)
            with self.cond:
                self._reap()
                if any(r.decode is not None for r in box.values()):
                    continue  # arrived while the others were decoded
                missing = [c for c in self.members if c not in box]
                if missing and time.monotonic() < deadline:
                    self.cond.wait(min(0.25, max(deadline - time.monotonic(), 0.001)))
                    continue
                for cid in missing:
                    self._drop(cid, f"no {what} within {self.opts.client_timeout:g}s")
                taken = dict(box)
                box.clear()
                return taken

    def _decode(self, box: dict[int, _Request]) -> None:
        """Check and build the tensors of the requests in ``box`` that are still raw messages.

        This runs here, on the loop thread, and not in the gRPC handler threads, so that every torch
        op of the process runs on one thread. An op run from a second thread gives OpenMP a second
        thread team; libgomp then manages more threads than there are cores and stops spinning
        between parallel regions, which slowed the model's own steps by about 15% on 2 CPU cores
        (docs/benchmarks.md, "Transport"). A bad message fails its call with INVALID_ARGUMENT and
        leaves the client's step open, as a message refused on arrival would.
        """
        with self.cond:
            raw = [r for r in box.values() if r.decode is not None]
        for req in raw:
            try:
                req.payload = req.decode()
            except WireError as exc:
                with self.cond:
                    if box.get(req.client_id) is req:
                        del box[req.client_id]
                    self.invalid += 1
                log.warning("invalid %s from client %d: %s", "Step" if req.kind == "step" else "Aggregate",
                            req.client_id, exc)
                req.fail(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            finally:
                req.decode = None

    def _run_step(self, t: int) -> None:
        reqs = self._collect(self.step_inbox, f"activations for step {t}")
        if not reqs:
            return  # everyone left: wait for joins and run step t again
        ups = [reqs[c].payload for c in sorted(reqs)]
        try:
            grads = self.server.process(ups)
        except Exception:
            with self.cond:
                for req in reqs.values():
                    req.fail(grpc.StatusCode.INTERNAL, "the server failed on this step")
            raise
        self.consistent = False
        loss, tokens = weighted_loss([(g.loss, g.tokens) for g in grads])
        last = t + 1 == self.cfg.steps
        regular = (t + 1) % self.cfg.aggregate_every == 0
        aggregate = regular or last
        replies = {g.client_id: gradients_to_proto(g, self.cfg.wire_dtype, aggregate) for g in grads}
        with self.cond:
            self.step = t + 1
            self.upload_step = t if aggregate else None
            for cid, req in reqs.items():
                req.resolve(replies[cid])
        traffic = _Traffic(sum(r.payload_bytes for r in reqs.values()), sum(payload_bytes(r.grad) for r in replies.values()),
                           sum(r.wire_bytes for r in reqs.values()), sum(r.ByteSize() for r in replies.values()))
        self._count(traffic)
        self.totals.tokens += tokens
        self.first_loss = loss if t == 0 else self.first_loss
        self.last_loss = loss
        round_ = self._aggregate(t) if aggregate else None
        if round_ is not None and regular:  # as in the simulation, a regular round counts in its step's row
            self._count(round_.traffic)
            traffic = traffic + round_.traffic
        elapsed = self._elapsed()
        if (t + 1) % self.cfg.log_every == 0 or last:
            self._write({"step": t + 1, "loss": loss, "lr": self.server.optimizer.lr, "tokens": tokens,
                         "tokens_total": self.totals.tokens, "bytes_up": traffic.up, "bytes_down": traffic.down,
                         "bytes_up_total": self.totals.bytes_up, "bytes_down_total": self.totals.bytes_down,
                         "elapsed_s": round(elapsed, 4),
                         "tokens_per_s": self.totals.tokens / elapsed if elapsed else 0.0,
                         "clients": len(grads), "wire_bytes_up": traffic.wire_up, "wire_bytes_down": traffic.wire_down})
        self._bar.set_postfix(loss=f"{loss:.3f}", clients=len(grads))
        self._bar.update(1)
        if round_ is not None:
            if not regular:
                self._count(round_.traffic)
            self._finish_round(round_)

    def _aggregate(self, t: int) -> "_Round":
        """Collect the round's adapters and average them (the answers go out in :meth:`_finish_round`)."""
        reqs = self._collect(self.upload_inbox, f"adapter for step {t}")
        with self.cond:
            self.upload_step = None
        updates = [reqs[c].payload for c in sorted(reqs)]
        aggregated = len(updates) >= self.opts.min_clients
        if aggregated:
            self.client_state = fedavg(updates)
            self.participants = [(u.client_id, u.num_samples) for u in updates]
            self.consistent = True
        self.round += 1
        finished = t + 1 >= self.cfg.steps
        stopping = self.stop_event.is_set() and not finished
        reply = pb.AdapterDown(round=self.round, aggregated=aggregated,
                               state=state_to_proto(self.client_state) if aggregated else [],
                               clients=len(updates), next_step=self.step, finished=finished, stop=stopping)
        traffic = _Traffic(sum(r.payload_bytes for r in reqs.values()), state_payload_bytes(reply.state) * len(reqs),
                           sum(r.wire_bytes for r in reqs.values()), reply.ByteSize() * len(reqs))
        event = {"event": "aggregate" if aggregated else "aggregate_skipped", "step": t, "round": self.round,
                 "clients": len(updates), "samples": [u.num_samples for u in updates],
                 "bytes_up": traffic.up, "bytes_down": traffic.down}
        return _Round(reqs, reply, event, traffic, finished or stopping)

    def _finish_round(self, round_: "_Round") -> None:
        """Log the round, checkpoint when due, then send the average back."""
        self._write(round_.event)
        every = self.opts.checkpoint_every or self.cfg.aggregate_every
        if self.consistent and (round_.final or self.step - max(self.last_checkpoint, 0) >= every):
            self._checkpoint()
        round_.reply.checkpoint_step = max(self.last_checkpoint, 0)
        with self.cond:
            for req in round_.reqs.values():
                req.resolve(round_.reply)
        if round_.event["event"] == "aggregate_skipped":
            log.warning("round %d: only %d clients sent their adapter (min %d): not aggregated",
                        self.round, round_.event["clients"], self.opts.min_clients)

    # ---- persistence ------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        self._write({"event": "checkpoint", "step": self.step, "round": self.round})
        with self._metrics_lock:
            offset = self.metrics.jsonl.tell()
        totals = self.totals
        totals.elapsed = self._elapsed()
        save_checkpoint(self.out / CHECKPOINT_DIR, {
            "config": self.cfg.to_dict(), "step": self.step, "round": self.round,
            "server_lora": lora_state(self.server.part), "optimizer": self.server.optimizer.state_dict(),
            "client_state": self.client_state, "participants": [list(p) for p in self.participants],
            "rng": torch.get_rng_state(), "totals": dict(vars(totals)), "first_loss": self.first_loss,
            "last_loss": self.last_loss, "metrics_bytes": offset})
        self._clock = time.perf_counter()  # elapsed now lives in totals.elapsed
        self.last_checkpoint = self.step

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The whole-model adapter: the clients' adapters averaged as the simulation does, plus the server's."""
        if self.participants:
            clients = fedavg([AdapterUpdate(c, self.round, self.client_state, n) for c, n in self.participants])
        else:
            clients = self.client_state
        return {**clients, **lora_state(self.server.part)}

    def save_adapter(self) -> Path:
        return save_adapter(self.adapter_state(), self.side.whole_config, self.side.base_path, self.adapter_dir)

    # ---- shutdown ---------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.stop_event.set()
        with self.cond:
            self.cond.notify_all()

    def close(self) -> None:
        """Refuse everything still waiting; no new call gets in."""
        with self.cond:
            self.closed = True
            for box in (self.joins, self.step_inbox, self.upload_inbox):
                for req in box.values():
                    req.fail(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
                box.clear()
            self.cond.notify_all()
        if self.metrics is not None:
            with self._metrics_lock:
                self.metrics.close()

    # ---- helpers ----------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return self.totals.elapsed + (time.perf_counter() - self._clock)

    def _count(self, traffic: "_Traffic") -> None:
        t = self.totals
        t.bytes_up, t.bytes_down = t.bytes_up + traffic.up, t.bytes_down + traffic.down
        t.wire_up, t.wire_down = t.wire_up + traffic.wire_up, t.wire_down + traffic.wire_down

    def _write(self, record: dict) -> None:
        with self._metrics_lock:
            self.metrics.write(record)

    def _say(self, text: str) -> None:
        if self.opts.progress:
            tqdm.write(f"serve: {text}", file=sys.stderr)
        else:
            log.info("%s", text)


def read_resume_state(cfg: RunConfig, out: Path, resume: bool) -> dict | None:
    """The checkpoint to continue from (``resume``), after checking it belongs to this config."""
    ckpt_dir = out / CHECKPOINT_DIR
    state = load_checkpoint(ckpt_dir)
    if not resume:
        if state is not None:
            raise UserError(f"{ckpt_dir} holds a checkpoint of an earlier run: continue it with --resume, "
                            "or choose another --out")
        return None
    if state is None:
        raise UserError(f"--resume: no checkpoint in {ckpt_dir}")
    saved, now = state["config"], cfg.to_dict()
    if saved != now:
        key = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))[0]
        raise UserError(f"--resume: the config differs from the checkpoint's (key {key!r})")
    return state


def _truncate_metrics(path: Path, offset: int) -> list[dict]:
    """Cut ``metrics.jsonl`` back to the checkpoint (steps after it will run again); its step rows."""
    if path.is_file():
        with path.open("r+b") as fh:
            fh.truncate(min(offset, path.stat().st_size))
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "event" not in record:
                rows.append(record)
    return rows


# ---- gRPC ------------------------------------------------------------------------------------

class Servicer(pb_grpc.SplitLoRAServicer):
    """Authenticate, read, hand over, wait, answer. Never touches a model or runs a torch op."""

    def __init__(self, coord: Coordinator, tokens: dict[int, str], max_message_bytes: int):
        self.coord = coord
        self.tokens = {cid: tok.encode() for cid, tok in tokens.items()}
        self._dummy = secrets.token_hex(32).encode()
        lim = coord.side.limits
        self.step_limit = min(lim.max_activation_bytes() + _OVERHEAD, max_message_bytes)
        self.upload_limit = min(state_wire_bytes(coord.side.client_shapes) * 2 + _OVERHEAD, max_message_bytes)

    # -- the four RPCs --
    def Hello(self, request_iterator, context):
        cid = self._authenticate(context, "Hello")
        msg, _ = self._read(request_iterator, pb.HelloRequest, HELLO_LIMIT, context, cid, "Hello")
        if msg.protocol_version != PROTOCOL_VERSION:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"protocol version {msg.protocol_version} is not supported (server: {PROTOCOL_VERSION})")
        if msg.num_samples < 1 or msg.num_samples > 1 << 40:
            self._invalid(context, cid, "Hello", f"num_samples {msg.num_samples} out of range")
        if not msg.join:
            reply = pb.HelloReply(protocol_version=PROTOCOL_VERSION, run=self.coord.spec,
                                  base_fingerprint=self.coord.side.fingerprint, start_step=self.coord.step,
                                  round=self.coord.round, finished=self.coord.finished)
            yield from to_chunks(reply)
            return
        req = self._submit(context, lambda: self.coord.submit_join(cid, msg), cid, "Hello")
        yield from self._answer(req, context)

    def Step(self, request_iterator, context):
        cid = self._authenticate(context, "Step")
        msg, size = self._read(request_iterator, pb.ActivationsUp, self.step_limit, context, cid, "Step")
        req = self._submit(context, lambda: self.coord.submit_step(cid, msg, size), cid, "Step")
        yield from self._answer(req, context)

    def Aggregate(self, request_iterator, context):
        cid = self._authenticate(context, "Aggregate")
        msg, size = self._read(request_iterator, pb.AdapterUp, self.upload_limit, context, cid, "Aggregate")
        req = self._submit(context, lambda: self.coord.submit_upload(cid, msg, size), cid, "Aggregate")
        yield from self._answer(req, context)

    def Leave(self, request, context):
        cid = self._authenticate(context, "Leave")
        self.coord.leave(cid, request)
        return pb.Ack()

    # -- helpers --
    def _authenticate(self, context, method: str) -> int:
        md = {}
        for key, value in context.invocation_metadata() or ():
            md.setdefault(key, value)
        raw_id = md.get(CLIENT_ID_KEY, "")
        header = md.get(AUTH_KEY, "")
        token = header[len("Bearer "):].encode() if header.startswith("Bearer ") else b""
        ok_id = isinstance(raw_id, str) and raw_id.isascii() and raw_id.isdigit() and len(raw_id) <= 9
        cid = int(raw_id) if ok_id else None
        expected = self.tokens.get(cid) if cid is not None else None
        # Always one constant-time comparison, also for unknown ids, so timing says nothing.
        match = hmac.compare_digest(token, expected if expected is not None else self._dummy)
        if not (match and token and expected is not None):
            why = "no token" if not token else ("unknown client id" if expected is None else "wrong token")
            with self.coord.cond:
                self.coord.refused += 1
            log.warning("refused %s from %s (client id %r): %s", method, context.peer(), raw_id[:20], why)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token for this client id")
        return cid

    def _read(self, chunks, cls, limit, context, cid, method):
        try:
            return from_chunks(chunks, cls, limit, what=cls.__name__)
        except WireError as exc:
            self._invalid(context, cid, method, str(exc))

    def _invalid(self, context, cid, method, text):
        with self.coord.cond:
            self.coord.invalid += 1
        log.warning("invalid %s from client %d: %s", method, cid, text)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, text)

    def _submit(self, context, submit, cid, method) -> _Request:
        try:
            req = submit()
        except Refused as exc:
            if exc.code != grpc.StatusCode.ABORTED:
                log.warning("refused %s from client %d: %s", method, cid, exc.text)
            context.abort(exc.code, exc.text)
        except WireError as exc:
            self._invalid(context, cid, method, str(exc))
        if not context.add_callback(lambda: self.coord.call_ended(req)):
            self.coord.call_ended(req)
        return req

    def _answer(self, req: _Request, context):
        while not req.done.wait(0.25):
            if not context.is_active():
                return
        if req.error is not None:
            context.abort(*req.error)
        chunks = list(to_chunks(req.reply))
        for i, chunk in enumerate(chunks):
            if i == len(chunks) - 1:
                # The last chunk is on its way: the caller may close the call as soon as it has it.
                req.delivered = True
            yield chunk


def grpc_options(frame_limit: int = GRPC_FRAME_LIMIT) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", frame_limit), ("grpc.max_send_message_length", frame_limit),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000)]


def start_grpc(servicer: Servicer, opts: ServeOptions) -> tuple[grpc.Server, int]:
    workers = 3 * len(opts.tokens) + 8
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splitlora-rpc"),
                         options=grpc_options(), maximum_concurrent_rpcs=workers)
    pb_grpc.add_SplitLoRAServicer_to_server(servicer, server)
    try:
        if opts.tls_cert is not None:
            creds = grpc.ssl_server_credentials([(opts.tls_key, opts.tls_cert)])
            port = server.add_secure_port(opts.listen, creds)
        else:
            port = server.add_insecure_port(opts.listen)
    except RuntimeError:
        port = 0
    if not port:
        raise UserError(f"cannot listen on {opts.listen} (address in use or invalid)")
    server.start()
    return server, port


def _write_endpoint(out: Path, listen: str, port: int) -> None:
    host = listen.rsplit(":", 1)[0]
    tmp = out / f".{ENDPOINT_FILE}.tmp"
    tmp.write_text(f"{host}:{port}\n")
    os.replace(tmp, out / ENDPOINT_FILE)


# ---- the command ------------------------------------------------------------------------------

def serve(cfg: RunConfig, opts: ServeOptions, out_dir: str | Path, loaded: LoadedModel | None = None,
          on_ready=None, coordinator_box: list | None = None) -> ServeResult:
    """Run the server side of ``cfg`` until the run is done, stopped, or out of clients.

    Writes ``DIR/config.yaml``, ``DIR/metrics.jsonl`` (+ ``.csv``), ``DIR/adapter/`` and
    ``DIR/checkpoint/``; ``DIR/endpoint`` tells where it listens. ``on_ready(port)`` is called once
    it listens; ``coordinator_box`` (a list) receives the :class:`Coordinator` (for tests).
    """
    opts.validate(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ENDPOINT_FILE).unlink(missing_ok=True)
    state = read_resume_state(cfg, out, opts.resume)
    setup_torch(cfg)
    side = build_server_side(cfg, loaded or load_model(cfg.model))
    loaded = None  # from here on the process holds the server part only (and the client init slice)
    coord = Coordinator(cfg, side, opts, out)
    coord.open(state)
    if coordinator_box is not None:
        coordinator_box.append(coord)
    servicer = Servicer(coord, opts.tokens, opts.max_message_bytes)
    server, port = start_grpc(servicer, opts)
    _write_endpoint(out, opts.listen, port)
    coord._say(f"listening on {opts.listen.rsplit(':', 1)[0]}:{port} "
               f"({'TLS' if opts.tls_cert else 'no TLS'}); {cfg.clients} clients, {cfg.steps} steps")
    if on_ready is not None:
        on_ready(port)
    restore = _install_signals(coord) if opts.handle_signals else None
    interrupted = False
    try:
        coord.run()
    except KeyboardInterrupt:  # a second Ctrl-C: leave at once; the last checkpoint stands
        interrupted = True
        raise
    finally:
        if restore is not None:
            restore()
        if not interrupted:
            if coord.consistent and coord.step > max(coord.last_checkpoint, 0):
                coord._checkpoint()
            coord.save_adapter()
        coord.close()
        server.stop(grace=3).wait(5)
    elapsed = coord._elapsed()
    result = ServeResult(out, coord.adapter_dir, coord.step, coord.finished, coord.totals.tokens, elapsed,
                         coord.first_loss, coord.last_loss, coord.totals.bytes_up, coord.totals.bytes_down,
                         coord.totals.wire_up, coord.totals.wire_down, port)
    if not coord.finished:
        if coord.stop_reason == "interrupted":
            raise KeyboardInterrupt
        raise UserError(f"serve stopped at step {coord.step} of {cfg.steps}: {coord.stop_reason or 'too few clients'}"
                        f"; the last checkpoint is at step {max(coord.last_checkpoint, 0)} (serve --resume)")
    return result


def _install_signals(coord: Coordinator):
    """First Ctrl-C (or SIGTERM): finish the round, checkpoint, save, exit. Second: exit now."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def first(signum, frame):
        coord.request_stop("interrupted")
        tqdm.write("serve: stopping at the end of this round (with a checkpoint); Ctrl-C again to quit at once",
                   file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)

    signal.signal(signal.SIGINT, first)
    signal.signal(signal.SIGTERM, first)

    def restore():
        for s, handler in previous.items():
            signal.signal(s, handler)

    return restore


__all__ = ["ServeOptions", "ServeResult", "serve", "read_token_file", "build_server_side", "Coordinator"]
