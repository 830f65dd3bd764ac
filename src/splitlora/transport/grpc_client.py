"""``splitlora client``: one data owner. Holds the client part of the model and its own data only.

The run's config comes from the server (Hello). Each local step is :meth:`SplitClient.forward`,
a ``Step`` call (activations up, gradient down) and :meth:`SplitClient.backward`; when the server
says so, the adapter goes up for FedAvg and the average comes back (``Aggregate``).

Faults: when the server goes away the client reconnects (up to ``reconnect_timeout``); when the
server drops it, it says Hello again. The server then names the step to continue from: a client that
is ahead rewinds to the snapshot it took at that round boundary (optimiser state, position in its
data), one that is behind skips the batches it missed. So a server resumed from its checkpoint
continues exactly where it left off.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml
from tqdm.auto import tqdm

from ..config import RunConfig
from ..data.batching import BatchStream, encode_all
from ..data.e2e import load_e2e
from ..errors import UserError
from ..models.loading import LoadedModel, load_model
from ..models.lora import add_lora, lora_state, side_lora_config
from ..models.split import architecture_of, check_cut, make_part
from ..runtime.client import SplitClient
from ..runtime.optim import Optimizer
from ..train import resolve_device, setup_torch
from . import splitlora_pb2 as pb
from . import splitlora_pb2_grpc as pb_grpc
from .grpc_server import AUTH_KEY, CLIENT_ID_KEY, grpc_options
from .wire import (PROTOCOL_VERSION, WireError, activations_to_proto, base_fingerprint, from_chunks,
                   gradients_from_proto, payload_bytes, state_from_proto, state_payload_bytes, state_shapes,
                   state_to_proto, state_wire_bytes, to_chunks)

log = logging.getLogger(__name__)

HELLO_REPLY_LIMIT = 2 << 30
_OVERHEAD = 256 << 10
MAX_REJOINS = 50


def read_client_token(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"token file not found: {path}")
    token = path.read_text(encoding="utf-8").strip()
    if not token or len(token.split()) != 1:
        raise UserError(f"token file {path} must hold the token alone")
    return token


@dataclass
class ClientOptions:
    server: str  # host:port
    client_id: int
    token: str
    data: str  # an E2E CSV (or folder): all of it is this client's training data, in file order
    tls_ca: bytes | None = None  # PEM of the CA that signed the server's certificate; None = no TLS
    reconnect_timeout: float = 300.0  # seconds to keep trying to reach the server
    progress: bool = True
    device: str | None = None  # None: the run's device when this machine has it, else cpu


@dataclass
class ClientResult:
    client_id: int
    finished: bool
    steps: int = 0  # local steps this process ran
    tokens: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    rejoins: int = 0
    losses: list[float] = field(default_factory=list)


class _Rejoin(Exception):
    """The server dropped this client or forgot it: say Hello again."""


class _Unreachable(Exception):
    """The server is not there (yet, or any more)."""


class RemoteClient:
    def __init__(self, opts: ClientOptions, loaded: LoadedModel | None = None):
        if opts.client_id < 0:
            raise UserError(f"--client-id must be >= 0 (got {opts.client_id})")
        self.opts = opts
        self._loaded = loaded
        self.result = ClientResult(opts.client_id, finished=False)
        self.metadata = ((AUTH_KEY, f"Bearer {opts.token}"), (CLIENT_ID_KEY, str(opts.client_id)))
        if opts.tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=opts.tls_ca)
            self.channel = grpc.secure_channel(opts.server, creds, options=grpc_options())
        else:
            self.channel = grpc.insecure_channel(opts.server, options=grpc_options())
        self.stub = pb_grpc.SplitLoRAStub(self.channel)
        self.session = 0
        self.position = 0  # batches drawn = the next local step this client would run
        self.snapshots: dict[int, dict] = {}  # step -> optimiser state at that round boundary
        self.client: SplitClient | None = None
        self._bar = None

    # ---- the run ----------------------------------------------------------------------------
    def run(self) -> ClientResult:
        try:
            self.examples = load_e2e(self.opts.data)  # bad data fails before anything is sent
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
                    self._sync(reply)
                    if self._train():
                        self.result.finished = True
                        self._leave("")
                        return self.result
                    self._say("the server stopped; reconnecting")
                except _Unreachable as exc:
                    self._say(f"lost the server ({exc}); reconnecting")
                except _Rejoin as exc:
                    rejoins += 1
                    self.result.rejoins = rejoins
                    if rejoins > MAX_REJOINS:
                        raise UserError(f"client {self.opts.client_id}: dropped {rejoins} times, giving up ({exc})")
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
        """Load the model named by the server, keep the client part, encode this client's data."""
        if spec.protocol_version != PROTOCOL_VERSION:
            raise UserError(f"the server speaks protocol {spec.protocol_version}, this client {PROTOCOL_VERSION}")
        try:
            cfg = RunConfig.from_dict(yaml.safe_load(spec.run.config_yaml) or {})
        except (UserError, yaml.YAMLError) as exc:
            raise UserError(f"the server sent an unusable config: {exc}") from None
        self.cfg, self._config_yaml = cfg, spec.run.config_yaml
        setup_torch(cfg)
        loaded = self._loaded or load_model(cfg.model)
        model = loaded.model
        model.requires_grad_(False)
        check_cut(model, cfg.cut_layer)
        part = make_part(model, "client", cfg.cut_layer)
        self.fingerprint = base_fingerprint(part)
        if spec.base_fingerprint and spec.base_fingerprint != self.fingerprint:
            raise UserError(f"model {cfg.model!r} here differs from the server's (weights fingerprint)")
        add_lora(part, side_lora_config(cfg.client_lora, architecture_of(model)))
        part.to(self._device(cfg))
        self.shapes = state_shapes(lora_state(part))
        self.pad_id = model.config.pad_token_id
        tokenizer = loaded.tokenizer
        loaded = model = None  # only the client part stays
        self._loaded = None
        self.items = encode_all(self.examples, tokenizer, cfg.prompt_template, cfg.max_length)
        self.client = SplitClient(self.opts.client_id, part, self._stream(), len(self.items), cfg, cfg.steps)
        self.grad_limit = cfg.batch_size * cfg.max_length * part.config.hidden_size * 4 + _OVERHEAD
        self.adapter_limit = state_wire_bytes(self.shapes) * 2 + _OVERHEAD
        self._bar = tqdm(total=cfg.steps, desc=f"client {self.opts.client_id}", unit="step",
                         disable=not self.opts.progress, dynamic_ncols=True)

    def _device(self, cfg: RunConfig):
        """Where this client computes: its own choice; by default the run's device if present here."""
        if self.opts.device is not None:
            return resolve_device(self.opts.device)
        try:
            return resolve_device(cfg.device)
        except UserError:
            self._say(f"the run's device {cfg.device!r} is not available here: using cpu")
            return resolve_device("cpu")

    def _stream(self) -> BatchStream:
        return BatchStream(self.items, self.cfg.batch_size, self.pad_id, seed=(self.cfg.seed, self.opts.client_id))

    def _sync(self, reply: pb.HelloReply) -> None:
        """Take the adapter the server hands over and line up with its step."""
        if reply.run.config_yaml != self._config_yaml:
            raise UserError("the server now runs a different config; start this client again")
        state = self._check(lambda: state_from_proto(reply.client_state, self.shapes, "client_state"))
        self.result.bytes_down += state_payload_bytes(reply.client_state)
        client, s = self.client, int(reply.start_step)
        client._hidden = None
        for p in client.part.parameters():
            p.grad = None
        if s < self.position:  # the server went back to a checkpoint: rewind to the same point
            if s in self.snapshots:
                client.optimizer.load_state_dict(copy.deepcopy(self.snapshots[s]))
            else:
                client.optimizer = _optimizer_at(client.part, self.cfg, s)
            client.stream, self.position = self._stream(), 0
            self.snapshots = {k: v for k, v in self.snapshots.items() if k <= s}  # a future that did not happen
        else:
            _advance(client.optimizer, s - self.position)  # missed steps: keep moments, follow the schedule
        for _ in range(s - self.position):
            next(client.stream)
        self.position = s
        client.load(state)
        self.snapshots.setdefault(s, copy.deepcopy(client.optimizer.state_dict()))
        self.session = reply.session
        self._bar.n = s
        self._bar.refresh()
        self._say(f"joined at step {s} (round {reply.round})")

    def _train(self) -> bool:
        """Local steps until the run ends (True) or the server stops (False)."""
        client, cfg = self.client, self.cfg
        while True:
            t = self.position
            acts = client.forward(t)
            self.position += 1
            msg = activations_to_proto(acts, self.session, cfg.wire_dtype)
            self.result.bytes_up += payload_bytes(msg.hidden, msg.attention_mask, msg.labels)
            down = self._call("Step", msg, pb.GradientsDown, self.grad_limit)
            if down.step != t:
                raise UserError(f"the server answered step {down.step} for step {t}")
            grads = self._check(lambda: gradients_from_proto(down, self.opts.client_id, tuple(acts.hidden.shape),
                                                             cfg.wire_dtype))
            grads.grad = grads.grad.to(acts.hidden.device)
            self.result.bytes_down += payload_bytes(down.grad)
            client.backward(grads)
            self.result.steps += 1
            self.result.tokens += grads.tokens
            self.result.losses.append(grads.loss)
            self._bar.set_postfix(loss=f"{grads.loss:.3f}")
            self._bar.update(1)
            if not down.aggregate:
                continue
            # End of a round: remember where we are (to rewind here if the server resumes here).
            self.snapshots[self.position] = copy.deepcopy(client.optimizer.state_dict())
            up = pb.AdapterUp(session=self.session, round=0, step=t, num_samples=client.num_samples,
                              state=state_to_proto(lora_state(client.part)))
            self.result.bytes_up += state_payload_bytes(up.state)
            avg = self._call("Aggregate", up, pb.AdapterDown, self.adapter_limit)
            if avg.aggregated:
                state = self._check(lambda: state_from_proto(avg.state, self.shapes, "average"))
                self.result.bytes_down += state_payload_bytes(avg.state)
                client.load(state)
            for step in [k for k in self.snapshots if k < avg.checkpoint_step]:
                del self.snapshots[step]
            if avg.finished:
                return True
            if avg.stop:
                return False
            if avg.next_step != self.position:
                raise _Rejoin(f"the server continues at step {avg.next_step}, this client is at {self.position}")

    # ---- calls ------------------------------------------------------------------------------
    def _hello(self, join: bool) -> pb.HelloReply:
        msg = pb.HelloRequest(protocol_version=PROTOCOL_VERSION, num_samples=len(getattr(self, "items", ())) or 1,
                              base_fingerprint=getattr(self, "fingerprint", ""), join=join)
        return self._call("Hello", msg, pb.HelloReply, HELLO_REPLY_LIMIT)

    def _call(self, method: str, msg, reply_cls, limit: int):
        try:
            responses = getattr(self.stub, method)(to_chunks(msg), metadata=self.metadata)
            reply, _ = from_chunks(responses, reply_cls, limit, what=reply_cls.__name__)
            for _ in responses:  # the end of the stream (and any trailing error)
                pass
            return reply
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.RESOURCE_EXHAUSTED):
                raise _Unreachable(f"{code.name}: {details}") from None
            if code == grpc.StatusCode.ABORTED:
                raise _Rejoin(details) from None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise UserError(f"server {self.opts.server} refused client {self.opts.client_id}: {details}") from None
            raise UserError(f"server {self.opts.server} refused {method} ({code.name}): {details}") from None
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
                    raise UserError(f"cannot reach the server at {self.opts.server} "
                                    f"for {self.opts.reconnect_timeout:g}s ({exc})") from None
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

    @staticmethod
    def _check(parse):
        try:
            return parse()
        except WireError as exc:
            raise UserError(f"bad reply from the server: {exc}") from None

    def _say(self, text: str) -> None:
        if self.opts.progress:
            tqdm.write(f"client {self.opts.client_id}: {text}", file=sys.stderr)
        else:
            log.info("client %d: %s", self.opts.client_id, text)


def _optimizer_at(part, cfg: RunConfig, step: int) -> Optimizer:
    """A fresh optimiser whose learning-rate schedule stands at ``step``."""
    opt = Optimizer(part, cfg, cfg.steps)
    _advance(opt, step)
    return opt


def _advance(opt: Optimizer, steps: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for _ in range(max(steps, 0)):
            opt.sched.step()


def run_client(opts: ClientOptions, loaded: LoadedModel | None = None) -> ClientResult:
    return RemoteClient(opts, loaded).run()


__all__ = ["ClientOptions", "ClientResult", "RemoteClient", "run_client", "read_client_token"]
