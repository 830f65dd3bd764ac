"""``splitlora client``: one data owner. Holds its part of the model and its own data, nothing else.

The run's config comes from the server (Hello). The client reads only its part's tensors from the
model's safetensors (:class:`~splitlora.models.parts.LeanModel`), builds the same
:class:`~splitlora.runtime.client.ClientApp` the simulation uses, and then does what the server's
commands say, one ``Exchange`` call per reply.

Faults: when the server goes away the client reconnects (up to ``reconnect_timeout``); when the
server drops it, it says Hello again. The server's ``Sync`` names the step to continue from: a
client that is ahead rewinds to the snapshot it took at that round boundary, one that is behind
skips the batches it missed. TLS and authentication failures are reported at once, not retried.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import grpc
import yaml
from tqdm.auto import tqdm

from ..algorithms import ALGORITHMS
from ..config import ClientOptions, RunConfig, check_client_name
from ..data import encode_data_file
from ..data.rows import load_rows
from ..device import resolve_device, setup_torch
from ..errors import UserError
from ..messages import Backward, Finish, LocalStep
from ..models.parts import LeanModel
from ..runtime.client import ClientApp, ProtocolError
from . import splitlora_pb2 as pb
from . import splitlora_pb2_grpc as pb_grpc
from .auth import call_metadata, safe_text
from .service import grpc_options
from .wire import (PROTOCOL_VERSION, WAIT, ClientView, Limits, WireError, command_from_proto, from_chunks,
                   message_payload_bytes, reply_to_proto, state_shapes, state_wire_bytes, to_chunks)

log = logging.getLogger(__name__)

HELLO_REPLY_LIMIT = 16 << 20
_OVERHEAD = 256 << 10
MAX_REJOINS = 50
# What gRPC says when TLS itself failed (wrong CA, wrong host, TLS against plain text): not transient.
# ("Handshake read failed ... Connection reset" is a server going away mid-handshake: retried.)
_TLS_FAILURES = ("tls handshake failed", "ssl_error_ssl", "verification check failed", "certificate_verify_failed")


@dataclass
class ClientResult:
    name: str
    finished: bool
    steps: int = 0  # local steps this process ran
    tokens: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    rejoins: int = 0
    losses: list[float] = field(default_factory=list)


class _Rejoin(Exception):
    """The server dropped this client or forgot it: say Hello again."""


class _Busy(Exception):
    """The server refused a call unread because it has too many open: the same call again later."""


class _Unreachable(Exception):
    """The server is not there (yet, or any more)."""


class RemoteClient:
    def __init__(self, opts: ClientOptions):
        self.opts = opts
        self.name = check_client_name(opts.client_id, "--client-id")
        self.result = ClientResult(self.name, finished=False)
        self.metadata = call_metadata(self.name, opts.token)
        if opts.tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=opts.tls_ca)
            self.channel = grpc.secure_channel(opts.server, creds, options=grpc_options())
        else:
            self.channel = grpc.insecure_channel(opts.server, options=grpc_options())
        self.stub = pb_grpc.SplitLoRAStub(self.channel)
        self.session = 0
        self.app: ClientApp | None = None
        self._bar = None

    # ---- the run ----------------------------------------------------------------------------
    def run(self) -> ClientResult:
        try:
            load_rows(self.opts.data)  # unreadable data fails before anything is sent
            spec = self._reachable(lambda: self._hello(join=False))
            if spec.finished:
                self._say("the run is already finished")
                self.result.finished = True
                return self.result
            self._setup(spec)
            rejoins = 0
            while True:
                try:
                    reply = self._reachable(lambda: self._hello(join=True))
                    if reply.finished:
                        self.result.finished = True
                        return self.result
                    if reply.config_yaml != self.config_yaml:
                        raise UserError("the server now runs a different config; start this client again")
                    self.session = reply.session
                    self._say("joined; waiting for the server's first command")
                    if self._serve():
                        self.result.finished = True
                        self._leave("")
                        return self.result
                    self._say("the server is stopping; waiting for it to come back (serve --resume)")
                except _Unreachable as exc:
                    self._say(f"lost the server ({exc}); reconnecting")
                except _Rejoin as exc:
                    rejoins += 1
                    self.result.rejoins = rejoins
                    if rejoins > MAX_REJOINS:
                        raise UserError(f"client {self.name}: dropped {rejoins} times, giving up ({exc})")
                    self._say(f"{exc}; joining again")
        except KeyboardInterrupt:
            self._leave("interrupted")
            raise
        except Exception as exc:
            self._leave(str(exc) if isinstance(exc, UserError) else f"client error: {type(exc).__name__}")
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
            self.channel.close()

    def _setup(self, spec: pb.HelloReply) -> None:
        """Read this client's part of the model named by the server and encode this client's data."""
        if spec.protocol_version != PROTOCOL_VERSION:
            raise UserError(f"the server speaks protocol {spec.protocol_version}, this client {PROTOCOL_VERSION}")
        try:
            cfg = RunConfig.from_dict(yaml.safe_load(spec.config_yaml) or {})
        except (UserError, yaml.YAMLError) as exc:
            raise UserError(f"the server sent an unusable config: {exc}") from None
        self.cfg, self.config_yaml, self.poll = cfg, spec.config_yaml, max(float(spec.poll_interval), 1.0)
        setup_torch(cfg.seed, cfg.threads)
        whole = ALGORITHMS[cfg.algorithm].whole_clients
        side = "whole" if whole else "client"
        source = LeanModel(cfg.model, cfg)
        self.fingerprint = source.fingerprint(side)
        if spec.base_fingerprint and spec.base_fingerprint != self.fingerprint:
            raise UserError(f"model {cfg.model!r} here differs from the server's (weights fingerprint)")
        part = source.lora_part(side, state={}, device=self._device(cfg))  # the state comes with Sync
        items = encode_data_file(cfg, source.tokenizer, self.opts.data)
        self.app = ClientApp(self.name, int(spec.index), part, items, cfg, whole, source.pad_id, source.num_blocks)
        hidden = source.config.hidden_size
        self.limits = Limits(cfg.batch_size, cfg.max_length, hidden, source.config.vocab_size, cfg.wire_dtype,
                             cfg.aggregation.value_bound(hidden), cfg.u_shape)
        self.shapes = state_shapes(self.app.lora_state())
        self.reply_limit = 3 * state_wire_bytes(self.shapes) + self.limits.max_step_bytes() + _OVERHEAD
        self._bar = tqdm(total=cfg.steps, desc=f"client {self.name}", unit="step", disable=not self.opts.progress,
                         dynamic_ncols=True)

    def _device(self, cfg: RunConfig):
        """Where this client computes: its own choice; by default the run's device if present here."""
        if self.opts.device is not None:
            return resolve_device(self.opts.device)
        try:
            return resolve_device(cfg.device)
        except UserError:
            self._say(f"the run's device {cfg.device!r} is not available here: using cpu")
            return resolve_device("cpu")

    def _serve(self) -> bool:
        """Carry out the server's commands until the run ends (True) or the server stops (False)."""
        app, msg = self.app, pb.ClientMessage(session=self.session)
        while True:
            out = self._call("Exchange", msg, pb.ServerMessage, self.reply_limit, timeout=2 * self.poll + 60)
            reply_to, reply = 0, None
            for proto in out.commands:
                view = ClientView(self.shapes, self.limits, self.cfg.steps, app.open_shape)
                try:
                    command = command_from_proto(proto, view)
                except WireError as exc:
                    raise UserError(f"bad command from the server: {exc}") from None
                if command is WAIT:
                    continue
                self.result.bytes_down += message_payload_bytes(proto)
                if isinstance(command, Finish):
                    if command.reason:
                        self._say(f"the server says: {safe_text(command.reason)}")
                    return not command.stop
                try:
                    result = app.handle(command)
                except ProtocolError as exc:
                    raise UserError(f"the server's command does not fit this client: {exc}") from None
                self._progress(command, result)
                if proto.id:
                    reply_to, reply = proto.id, result
            msg = reply_to_proto(reply, self.session, reply_to, self.cfg.wire_dtype)
            self.result.bytes_up += message_payload_bytes(msg)

    def _progress(self, command, result) -> None:
        if isinstance(command, Backward):  # a split step ends with its gradient
            loss, tokens = command.loss, command.tokens
        elif isinstance(command, LocalStep):
            loss, tokens = result.loss, result.tokens
        else:
            return
        self.result.steps += 1
        self.result.tokens += tokens or 0
        if loss is not None:
            self.result.losses.append(loss)
            self._bar.set_postfix(loss=f"{loss:.3f}")
        self._bar.n = command.step + 1
        self._bar.refresh()

    # ---- calls ------------------------------------------------------------------------------
    def _hello(self, join: bool) -> pb.HelloReply:
        num = len(self.app.items) if self.app is not None else 1
        msg = pb.HelloRequest(protocol_version=PROTOCOL_VERSION, num_samples=num,
                              base_fingerprint=getattr(self, "fingerprint", ""), join=join)
        return self._call("Hello", msg, pb.HelloReply, HELLO_REPLY_LIMIT, timeout=60)

    def _call(self, method: str, msg, reply_cls, limit: int, timeout: float):
        """One call; refused as busy (RESOURCE_EXHAUSTED), the same call again shortly.

        The server refuses a call with RESOURCE_EXHAUSTED before it reads it (gRPC's limit of
        concurrent calls, or this client's calls still open), so sending it again is safe. Saying
        Hello again instead, as this client did, cost it its step, and another client's flood of
        calls could get it dropped over and over (issue 11)."""
        deadline = time.monotonic() + self.opts.reconnect_timeout
        pause = 0.05
        while True:
            try:
                return self._call_once(method, msg, reply_cls, limit, timeout)
            except _Busy as exc:
                if time.monotonic() + pause > deadline:
                    raise _Rejoin(str(exc)) from None
                time.sleep(pause)
                pause = min(2 * pause, 1.0)

    def _call_once(self, method: str, msg, reply_cls, limit: int, timeout: float):
        try:
            responses = getattr(self.stub, method)(to_chunks(msg), metadata=self.metadata, timeout=timeout)
            reply, _ = from_chunks(responses, reply_cls, limit, what=reply_cls.__name__)
            for _ in responses:  # the end of the stream (and any trailing error)
                pass
            return reply
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code == grpc.StatusCode.UNAVAILABLE and any(w in details.lower() for w in _TLS_FAILURES):
                raise UserError(f"TLS with {self.opts.server} failed: {details.splitlines()[0][:300]}") from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise _Unreachable(f"{code.name}: {details[:200]}") from None
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise _Busy(details[:300]) from None
            if code == grpc.StatusCode.ABORTED:
                raise _Rejoin(details[:300]) from None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise UserError(f"server {self.opts.server} refused client {self.name}: {details}") from None
            raise UserError(f"server {self.opts.server} refused {method} ({code.name}): {details[:300]}") from None
        except WireError as exc:
            raise UserError(f"bad reply from the server: {exc}") from None

    def _reachable(self, call):
        """Retry ``call`` while the server is unreachable, up to ``reconnect_timeout`` seconds."""
        deadline = time.monotonic() + self.opts.reconnect_timeout
        pause, said = 0.2, False
        while True:
            try:
                return call()
            except _Unreachable as exc:
                if time.monotonic() >= deadline:
                    hint = "" if self.opts.tls_ca else "; if the server uses TLS, pass --tls-ca"
                    raise UserError(f"cannot reach the server at {self.opts.server} "
                                    f"for {self.opts.reconnect_timeout:g}s ({exc}){hint}") from None
                if not said:
                    self._say(f"server not reachable ({exc}); retrying")
                    said = True
                time.sleep(pause)
                pause = min(pause * 1.5, 2.0)

    def _leave(self, error: str) -> None:
        if not self.session:
            return
        try:
            self.stub.Leave(pb.Done(session=self.session, error=error[:200]), metadata=self.metadata, timeout=5)
        except grpc.RpcError:
            pass

    def _say(self, text: str) -> None:
        if self.opts.progress:
            tqdm.write(f"client {self.name}: {text}", file=sys.stderr)
        else:
            log.info("client %s: %s", self.name, text)


def run_client(opts: ClientOptions) -> ClientResult:
    return RemoteClient(opts).run()


__all__ = ["ClientOptions", "ClientResult", "RemoteClient", "run_client"]
