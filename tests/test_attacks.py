"""Malicious-client tests: one attacker with a valid token beside an honest client, on 127.0.0.1.

Issue 11 ("one authenticated client must not be able to wreck or freeze a run"). Client ``0`` (index 0
of the token file) attacks, client ``1`` (index 1) is an ordinary :class:`RemoteClient`. Each test
shows that the run finishes, that the honest client returns normally, and that the final adapter is
the one the honest client alone produces (the same config and token file, served with only client
``1`` joining: a short join timeout starts the run with ``min_clients=1``; client 1 keeps its index,
so its data order is the same), or, where the attacker took an honest part before attacking, the
documented result, checked exactly.

Every wait has a timeout; every server, client thread and channel is closed in a finalizer.
"""

import errno
import json
import logging
import math
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
import yaml

from test_deploy import (TOKENS, ThreadServer, adapter, deploy_config, honest_client, max_abs_diff, md,
                         poll_until_asked, read_records, rpc, step_rows, events, write_client_csvs)
from splitlora.messages import Activations, AdapterUpdate, Forward, Handover, TailGrad, Upload
from splitlora.transport import splitlora_pb2 as pb
from splitlora.transport import splitlora_pb2_grpc as pb_grpc
from splitlora.transport.wire import PROTOCOL_VERSION, tensor_to_proto, to_chunks

ATTACKER, HONEST = "0", "1"
# Short deadlines so that every attack is over in seconds.
FAST = dict(client_timeout=10.0, read_timeout=2.0, poll_interval=1.0, linger=1.0)
RUN_TIMEOUT = 90  # seconds for a whole attacked run of a few steps
# The honest-alone reference run starts once this has passed with the honest client in (min_clients 1);
# long enough for the client to start on a loaded 2-core machine.
SOLO_JOIN = 4.0


def attack_config(**overrides):
    """tiny-gpt2, 2 clients, 4 steps, FedAvg every 2 (the data split is the same for every config)."""
    base = dict(clients=2, steps=4, aggregate_every=2)
    base.update(overrides)
    return deploy_config(**base)


@pytest.fixture(scope="module")
def csvs(tmp_path_factory, tiny_gpt2):
    return write_client_csvs(attack_config(), tiny_gpt2.tokenizer, tmp_path_factory.mktemp("attack-data"))


@pytest.fixture
def later():
    """Finalizers, run last-registered first, even when the test fails."""
    todo = []
    yield todo.append
    for fn in reversed(todo):
        try:
            fn()
        except Exception:  # noqa: BLE001 - the other finalizers must run
            pass


def start_server(cfg, out: Path, later, **options) -> ThreadServer:
    server = ThreadServer(cfg, out, TOKENS, **{**FAST, "join_timeout": 60.0, **options})
    later(server.stop)
    return server


def start_honest(server, csv, later, errors: list, name: str = HONEST, **options) -> threading.Thread:
    thread = honest_client(server.port, name, csv, errors, **options)
    later(lambda: thread.join(30))
    return thread


def finish(server: ThreadServer, honest: threading.Thread, errors: list, timeout: float = RUN_TIMEOUT):
    """The honest client returns normally and the server finishes the run."""
    honest.join(timeout)
    assert not honest.is_alive(), "the honest client is still running"
    server.thread.join(timeout)
    assert not server.thread.is_alive(), "the server is still running"
    assert not errors, errors
    assert server.error is None, server.error
    assert server.result.finished and server.result.steps_done == server.grid.cfg.steps


_SOLO: dict[str, dict] = {}


@pytest.fixture(scope="module")
def solo(tmp_path_factory, csvs):
    """``solo(cfg)``: the adapter the honest client alone produces for ``cfg`` (cached per config)."""

    def get(cfg) -> dict[str, torch.Tensor]:
        key = yaml.safe_dump(cfg.to_dict(), sort_keys=True)
        if key not in _SOLO:
            out = tmp_path_factory.mktemp("solo")
            server = ThreadServer(cfg, out / "server", TOKENS, **{**FAST, "join_timeout": SOLO_JOIN})
            errors: list = []
            try:
                honest = start_honest(server, csvs[1], lambda fn: None, errors)
                finish(server, honest, errors)
                assert [e["client"] for e in events(read_records(out / "server"), "join")] == [HONEST]
                _SOLO[key] = adapter(server.result.adapter_dir)
            finally:
                server.stop()
        return _SOLO[key]

    return get


def same_as_solo(server, solo, what: str) -> float:
    diff = max_abs_diff(adapter(server.result.adapter_dir), solo(server.grid.cfg))
    print(f"\n{what}: max |adapter(attacked run) - adapter(honest client alone)| = {diff:.3g}")
    return diff


def finite_outputs(out: Path) -> None:
    """The adapter and the checkpoint hold finite values only; metrics.jsonl is strict JSON."""
    assert all(torch.isfinite(v).all() for v in adapter(out / "adapter").values())
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=True)
    tensors = [v for v in _leaves(state) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert tensors and all(torch.isfinite(v).all() for v in tensors)
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))


def _leaves(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    else:
        yield x


# ---- attackers -------------------------------------------------------------------------------------

class Raw:
    """A hand-made client on its own channel, speaking the protocol message by message."""

    def __init__(self, port: int, later, name: str = ATTACKER, token: str | None = None):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        later(self.channel.close)
        self.stub = pb_grpc.SplitLoRAStub(self.channel)
        self.md = md(name, token)
        self.session = 0

    def hello(self, join=True, num_samples=5, timeout=60) -> pb.HelloReply:
        reply = rpc(self.stub, "Hello", pb.HelloRequest(protocol_version=PROTOCOL_VERSION, num_samples=num_samples,
                                                        join=join), self.md, pb.HelloReply, timeout=timeout)
        if join:
            self.session = reply.session
        return reply

    def exchange(self, msg: pb.ClientMessage | None = None, timeout=60) -> pb.ServerMessage:
        msg = msg if msg is not None else pb.ClientMessage(session=self.session)
        return rpc(self.stub, "Exchange", msg, self.md, pb.ServerMessage, timeout=timeout)

    def asked(self, want="forward") -> pb.Command:
        return poll_until_asked(self.stub, self.session, self.md, want)

    def code(self, call) -> grpc.StatusCode:
        try:
            call()
        except grpc.RpcError as exc:
            return exc.code()
        raise AssertionError("the call was not refused")


def raw_attack(cfg, tmp_path, csvs, later):
    """A server, a raw attacker that joined and was asked its first forward, and the honest client."""
    server = start_server(cfg, tmp_path / "server", later)
    attacker = Raw(server.port, later)
    attacker.hello()
    errors = []
    honest = start_honest(server, csvs[1], later, errors)
    return server, attacker, honest, errors, attacker.asked("forward")


def activations(step: int, value: float = 0.1, b: int = 2, t: int = 10, h: int = 64, dtype=torch.float32,
                labels=True) -> pb.ActivationsMsg:
    """A well-formed Activations message (tiny-gpt2: hidden size 64), every hidden value ``value``."""
    lab = torch.full((b, t), -100, dtype=torch.int32)
    lab[:, t // 2:] = 11
    msg = pb.ActivationsMsg(step=step, hidden=tensor_to_proto(torch.full((b, t, h), value), dtype),
                            attention_mask=tensor_to_proto(torch.ones(b, t, dtype=torch.uint8)))
    if labels:
        msg.labels.CopyFrom(tensor_to_proto(lab))
    return msg


def tampering_client(port, csv, later, errors: list, tamper=None, declare: int | None = None) -> threading.Thread:
    """A real client (its own data, the real model) whose replies pass through ``tamper(command, reply)``;
    ``declare``: the sample count it claims (in Hello and in every upload)."""
    from splitlora.config import ClientOptions
    from splitlora.transport.remote_client import RemoteClient

    class Tampering(RemoteClient):
        def _setup(self, spec):
            super()._setup(spec)
            real = self.app.handle
            if declare is not None:
                self.app.num_samples = declare
            if tamper is not None:
                self.app.handle = lambda command: tamper(command, real(command))

        def _hello(self, join):
            if declare is None or self.app is None:
                return super()._hello(join)
            msg = pb.HelloRequest(protocol_version=PROTOCOL_VERSION, num_samples=declare,
                                  base_fingerprint=self.fingerprint, join=join)
            return self._call("Hello", msg, pb.HelloReply, 16 << 20, timeout=60)

    def run():
        try:
            Tampering(ClientOptions(server=f"127.0.0.1:{port}", client_id=ATTACKER, token=TOKENS[ATTACKER],
                                    data=str(csv), progress=False, reconnect_timeout=10)).run()
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True, name="attacker")
    thread.start()
    later(lambda: thread.join(30))
    return thread


def drops(out: Path, name: str = ATTACKER) -> list[str]:
    return [e["reason"] for e in events(read_records(out), "drop") if e["client"] == name]


# ==== 1. finite but absurd activations ==================================================================

@pytest.mark.parametrize("wire,mode,shape,value", [
    ("fp32", "sequential", "two-part", 3.4e38),
    ("fp32", "batched", "two-part", 3.4e38),
    ("bf16", "sequential", "two-part", 3.0e38),
    ("fp32", "batched", "u-shape", 3.4e38),
])
def test_absurd_activations_are_refused(tmp_path, csvs, solo, later, wire, mode, shape, value):
    """Finding 1: activations of magnitude 3.4e38 (finite) are refused before they reach the model; the
    attacker is dropped, no non-finite value reaches anyone, and the adapter is the honest one alone."""
    extra = {"split_shape": "u-shape", "tail_layers": 1, "cut_layer": 1} if shape == "u-shape" else {}
    cfg = attack_config(wire_dtype=wire, server_mode=mode, **extra)
    server = start_server(cfg, tmp_path / "server", later)
    errors, attacker_errors = [], []

    def absurd(command, reply):
        if isinstance(reply, Activations):
            reply.hidden = torch.full_like(reply.hidden, value)
        return reply

    attacker = tampering_client(server.port, csvs[0], later, attacker_errors, absurd)
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    attacker.join(30)
    assert attacker_errors and "INVALID_ARGUMENT" in str(attacker_errors[0])
    (reason,) = drops(tmp_path / "server")
    assert "exceeds the bound" in reason
    finite_outputs(tmp_path / "server")
    assert same_as_solo(server, solo, f"activations of {value:g} ({wire}, {mode}, {shape})") == 0



@pytest.mark.parametrize("mode", ["sequential", "batched"])
def test_absurd_tail_gradient_drops_only_its_sender(tmp_path, csvs, solo, later, mode):
    """Finding 1, U-shape: a tail gradient just inside the value bound (0.99 of it, everywhere) makes the
    server's gradients unusable. Only its sender is dropped, also when the server steps over every
    client's batch at once (batched: it used to drop every client of the step); the adapter is the
    honest one alone."""
    cfg = attack_config(server_mode=mode, split_shape="u-shape", tail_layers=1, cut_layer=1)
    bound = cfg.aggregation.value_bound(64)
    server = start_server(cfg, tmp_path / "server", later)
    errors, attacker_errors = [], []

    def huge(command, reply):
        if isinstance(reply, TailGrad):
            reply.grad = torch.full_like(reply.grad, 0.99 * bound)
        return reply

    tampering_client(server.port, csvs[0], later, attacker_errors, huge)
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    reasons = drops(tmp_path / "server")
    assert reasons and all(r == "the server's gradients were not finite" for r in reasons), reasons
    assert set(drops(tmp_path / "server", HONEST)) <= {"left"}  # never dropped (its Leave may come after the end)
    finite_outputs(tmp_path / "server")
    assert same_as_solo(server, solo, f"tail gradients of {0.99 * bound:.3g} (u-shape, {mode})") == 0


# ==== 8f. a client that comes after the end of the run ==========================================================

def test_late_client_learns_that_the_run_is_over(tmp_path, csvs, later):
    """Finding 8: a client started after the end of the run learns that it is over (exit 0, at once)
    while the server lingers, instead of retrying for its whole reconnect timeout."""
    cfg = attack_config(steps=2)
    server = start_server(cfg, tmp_path / "server", later, join_timeout=SOLO_JOIN, linger=8.0)
    errors, late_errors, results = [], [], []
    honest = start_honest(server, csvs[1], later, errors)
    honest.join(RUN_TIMEOUT)
    assert not errors and not honest.is_alive(), errors
    start = time.monotonic()
    late = start_honest(server, csvs[0], later, late_errors, name=ATTACKER, reconnect_timeout=60, results=results)
    late.join(30)
    took = time.monotonic() - start
    assert not late.is_alive() and not late_errors, late_errors
    assert results[0].finished and results[0].steps == 0
    assert took < 10, took
    server.thread.join(30)
    assert server.error is None and server.result.finished


# ==== 4. freezing everyone: half-sent calls, call storms ======================================================

class Flood:
    """Calls of one kind, kept open (or repeated) from many threads until :meth:`stop`; records how each ended."""

    def __init__(self, port: int, later, method: str, metadata, threads: int, half_sent: bool, pause: float = 0.0):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stop_event = threading.Event()
        later(self.stop)
        path = f"/splitlora.v2.SplitLoRA/{method}"
        if method == "Leave":  # unary on the wire; stream-unary here so that it can stay half-sent
            self.call = self.channel.stream_unary(path, request_serializer=pb.Done.SerializeToString,
                                                  response_deserializer=pb.Ack.FromString)
            self.first = None if half_sent else pb.Done(session=12345)
        else:
            self.call = self.channel.stream_stream(path, request_serializer=pb.Chunk.SerializeToString,
                                                   response_deserializer=pb.Chunk.FromString)
            msg = (pb.HelloRequest(protocol_version=PROTOCOL_VERSION, num_samples=5) if method == "Hello"
                   else pb.ClientMessage(session=12345))
            data = msg.SerializeToString()
            # Half-sent: the first chunk announces more bytes than ever come.
            self.first = (pb.Chunk(data=data, total_bytes=len(data) + 1000) if half_sent
                          else pb.Chunk(data=data, total_bytes=len(data)))
        self.unary, self.half_sent, self.metadata, self.pause = method == "Leave", half_sent, metadata, pause
        self.outcomes: list[tuple[grpc.StatusCode, float]] = []
        self.details: set = set()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _requests(self):
        if self.first is not None:
            yield self.first
        if self.half_sent:
            self.stop_event.wait(60)  # ... and nothing more

    def _loop(self):
        while not self.stop_event.is_set():
            start = time.monotonic()
            try:
                if self.unary:
                    self.call(self._requests(), metadata=self.metadata, timeout=60)
                else:
                    for _ in self.call(self._requests(), metadata=self.metadata, timeout=60):
                        pass
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.details.add(exc.details())
            with self.lock:
                self.outcomes.append((code, time.monotonic() - start))
            if self.pause:
                self.stop_event.wait(self.pause)

    def codes(self) -> dict[grpc.StatusCode, int]:
        with self.lock:
            out: dict = {}
            for code, _ in self.outcomes:
                out[code] = out.get(code, 0) + 1
            return out

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(30)
        self.channel.close()


@pytest.mark.parametrize("method,token", [("Exchange", "valid"), ("Hello", "valid"), ("Leave", "valid"),
                                          ("Leave", "wrong")])
def test_half_sent_calls_do_not_freeze_the_server(tmp_path, csvs, solo, later, method, token):
    """Finding 4: 24 half-sent calls at a time (more than the server's worker threads), reopened as soon as
    they end, for the whole run. At most ``calls_per_client`` (2) of them are held, each for at most
    ``read_timeout``; the others are refused at once. The honest client trains as if alone.
    (Half-sent unary Leave calls, even with a wrong token, used to hold every worker without a deadline.)"""
    cfg = attack_config()
    server = start_server(cfg, tmp_path / "server", later, join_timeout=SOLO_JOIN)
    metadata = md(ATTACKER) if token == "valid" else md(ATTACKER, "a-wrong-token-" + "z" * 20)
    flood = Flood(server.port, later, method, metadata, threads=24, half_sent=True, pause=0.05)
    errors = []
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    flood.stop()
    codes = flood.codes()
    print(f"\n{method} ({token} token), half-sent: {codes}")
    held = [t for c, t in flood.outcomes if c in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)]
    if token == "valid":
        assert codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0) > 24  # refused at once, over and over
        assert held and max(held) < FAST["read_timeout"] + 3  # cut after read_timeout
    else:
        assert codes[grpc.StatusCode.UNAUTHENTICATED] > 24  # refused at once, unread
        # (UNAVAILABLE, CANCELLED: calls the server's end cut)
        assert set(codes) - {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED} == {grpc.StatusCode.UNAUTHENTICATED}
    assert same_as_solo(server, solo, f"24 half-sent {method} calls at a time ({token} token)") == 0


@pytest.mark.parametrize("method", ["Hello", "Exchange", "Leave"])
def test_call_storm_does_not_knock_out_the_honest_client(tmp_path, csvs, solo, later, method):
    """A token holder calls as fast as it can from 64 threads for the whole run (complete, tiny calls:
    polls with a stale session, Hellos, Leaves). The honest client trains as if alone."""
    cfg = attack_config()
    server = start_server(cfg, tmp_path / "server", later, join_timeout=SOLO_JOIN)
    flood = Flood(server.port, later, method, md(ATTACKER), threads=64, half_sent=False)
    errors, results = [], []
    honest = start_honest(server, csvs[1], later, errors, results=results)
    finish(server, honest, errors)
    flood.stop()
    print(f"\n{method} storm: {flood.codes()}; honest client rejoined {results[0].rejoins} times, "
          f"dropped for {drops(tmp_path / 'server', HONEST)}")
    assert sum(flood.codes().values()) > 100
    assert results[0].rejoins == 0 and set(drops(tmp_path / "server", HONEST)) <= {"left"}
    assert same_as_solo(server, solo, f"{method} storm from 64 threads") == 0


def test_busy_refusals_cost_the_honest_client_nothing(tmp_path, csvs, solo, later, monkeypatch):
    """The storm above, made certain: gRPC refuses every other call of the honest client with
    RESOURCE_EXHAUSTED ("Concurrent RPC limit exceeded!", what a flood of calls from another client
    gets it). The refused call is unread, so the client sends it again; it used to say Hello again
    instead, which cost it its step and, flood after flood, its place in the run."""
    from splitlora.transport import service

    class Crowded(service.TokenInterceptor):
        calls = 0

        def intercept_service(self, continuation, details):
            handler = super().intercept_service(continuation, details)
            name = dict(details.invocation_metadata or ()).get("splitlora-client-id")
            if name == HONEST and not details.method.endswith("/Leave"):
                Crowded.calls += 1
                if Crowded.calls % 2 == 0:
                    def refuse(request_iterator, context):
                        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!")
                    return grpc.stream_stream_rpc_method_handler(refuse)
            return handler

    monkeypatch.setattr(service, "TokenInterceptor", Crowded)
    cfg = attack_config()
    server = start_server(cfg, tmp_path / "server", later, join_timeout=SOLO_JOIN)
    errors, results = [], []
    honest = start_honest(server, csvs[1], later, errors, results=results)
    finish(server, honest, errors)
    assert Crowded.calls > 10
    assert results[0].rejoins == 0 and set(drops(tmp_path / "server", HONEST)) <= {"left"}
    assert same_as_solo(server, solo, "every other call of the honest client refused as busy") == 0


# ==== 2, 3. poisoned FedAvg, sample counts =================================================================

def capture_aggregations(monkeypatch) -> list:
    """Record what every aggregation of the run is given and what it returns."""
    from splitlora.registry import AGGREGATORS

    seen = []
    real = AGGREGATORS["fedavg"]

    def recorded(uploads, current, rules, min_clients=1):
        out = real(uploads, current, rules, min_clients)
        seen.append(([(n, i, d, {k: v.clone() for k, v in st.items()}) for n, i, d, st in uploads],
                     {k: v.clone() for k, v in current.items()}, rules, out))
        return out

    monkeypatch.setitem(AGGREGATORS, "fedavg", recorded)
    return seen


def documented_fedavg(uploads, current, rules) -> dict[str, torch.Tensor]:
    """The rule docs/deployment.md states (What the server checks, Aggregation), written out here:
    weights capped at max_samples_per_client; an upload whose change ||s - avg|| exceeds
    max_update_ratio * max(median change of the others, ||avg||) is left out (reject) or has its change
    scaled to that bound (clip); the rest are averaged with their weights, in index order."""
    def norm(state, ref=None):
        sq = 0.0
        for k, v in state.items():
            d = v.float() - ref[k].float() if ref is not None else v.float()
            sq += float(d.pow(2).sum())
        return sq ** 0.5

    uploads = sorted(uploads, key=lambda u: u[1])
    change = {name: norm(state, current) for name, _, _, state in uploads}
    kept = []
    for name, _, declared, state in uploads:
        others = sorted(c for n, c in change.items() if n != name)
        median = (others[(len(others) - 1) // 2] + others[len(others) // 2]) / 2 if others else 0.0
        bound = rules.max_update_ratio * max(median, norm(current))
        if change[name] > bound:
            if rules.outliers == "reject":
                continue
            state = {k: current[k] + (v - current[k]) * (bound / change[name]) for k, v in state.items()}
        kept.append((state, min(declared, rules.max_samples_per_client)))
    total = float(sum(n for _, n in kept))
    return {k: sum((n / total) * st[k] for st, n in kept) for k in current}


def checkpoint_state(out: Path) -> dict:
    return torch.load(out / "checkpoint" / "state.pt", weights_only=True)


def fill_upload(value):
    def tamper(command, reply):
        if isinstance(reply, AdapterUpdate):
            reply.state = {k: torch.full_like(v, value) for k, v in reply.state.items()}
        return reply
    return tamper


def test_fedavg_refuses_an_upload_beyond_the_value_bound(tmp_path, csvs, solo, later):
    """Finding 2: an adapter of all 1e30 (finite) is refused on arrival; its sender is dropped; the
    average, the adapter and the checkpoint are the honest client's alone."""
    cfg = attack_config(algorithm="fed")
    server = start_server(cfg, tmp_path / "server", later)
    errors, attacker_errors = [], []
    tampering_client(server.port, csvs[0], later, attacker_errors, fill_upload(1e30))
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    (reason,) = drops(tmp_path / "server")
    assert "invalid Upload reply" in reason and "exceeds the bound" in reason
    assert [e["used"] for e in events(read_records(tmp_path / "server"), "aggregate")] == [[HONEST], [HONEST]]
    finite_outputs(tmp_path / "server")
    assert same_as_solo(server, solo, "fed, an upload of all 1e30") == 0


@pytest.mark.parametrize("outliers", ["reject", "clip"])
def test_fedavg_outlier_upload_is_flagged_and_bounded(tmp_path, csvs, solo, later, monkeypatch, outliers):
    """Finding 2: an adapter of all 10.0 (inside the value bound; honest values stay below 1) in every
    round. reject: it is left out of every average (`rejected`), the adapter is the honest one alone.
    clip: its change is scaled to the bound (`clipped`) and the average is exactly the documented
    rule's; no value near 10 reaches the adapter or the checkpoint."""
    seen = capture_aggregations(monkeypatch)
    cfg = attack_config(algorithm="fed", aggregation={"outliers": outliers})
    server = start_server(cfg, tmp_path / "server", later)
    errors, attacker_errors = [], []
    attacker = tampering_client(server.port, csvs[0], later, attacker_errors, fill_upload(10.0))
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    attacker.join(30)
    assert not attacker_errors, attacker_errors  # it stays in the run: its uploads are well-formed
    aggs = events(read_records(tmp_path / "server"), "aggregate")
    assert len(aggs) == len(seen) == 2
    key = "rejected" if outliers == "reject" else "clipped"
    assert all(e.get(key) == [ATTACKER] for e in aggs), aggs
    assert all(e["used"] == ([HONEST] if outliers == "reject" else [ATTACKER, HONEST]) for e in aggs)
    final = adapter(server.result.adapter_dir)
    for uploads, current, rules, out in seen:
        want = documented_fedavg(uploads, current, rules)
        assert all(torch.equal(out.state[k], want[k]) for k in want)
    last = {"base_model.model." + k: v for k, v in seen[-1][3].state.items()}
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    ckpt = checkpoint_state(tmp_path / "server")["algorithm"]["global_state"]
    assert all(torch.equal(ckpt[k], seen[-1][3].state[k]) for k in ckpt)
    worst = max(float(v.abs().max()) for v in final.values())
    print(f"\nfed, uploads of all 10.0, {outliers}: largest |value| in the adapter {worst:.3g}; "
          f"documented rule reproduced exactly in {len(seen)} rounds")
    assert worst < 1.0
    if outliers == "reject":
        assert same_as_solo(server, solo, "fed, uploads of all 10.0, rejected") == 0


def test_sample_counts_are_capped(tmp_path, csvs, later, monkeypatch):
    """Finding 3: a Hello above 2^40 samples is refused; a declared 2^40 is capped at
    max_samples_per_client (logged as `capped`), and the average is exactly the documented rule's."""
    seen = capture_aggregations(monkeypatch)
    cfg = attack_config(algorithm="fed")
    server = start_server(cfg, tmp_path / "server", later)
    raw = Raw(server.port, later)
    assert raw.code(lambda: raw.hello(num_samples=(1 << 40) + 1)) == grpc.StatusCode.INVALID_ARGUMENT
    errors, attacker_errors = [], []
    attacker = tampering_client(server.port, csvs[0], later, attacker_errors, declare=1 << 40)
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    attacker.join(30)
    assert not attacker_errors, attacker_errors
    aggs = events(read_records(tmp_path / "server"), "aggregate")
    cap = cfg.aggregation.max_samples_per_client
    assert all(e["capped"] == {ATTACKER: 1 << 40} and e["samples"][0] == cap for e in aggs), aggs
    for uploads, current, rules, out in seen:
        assert [d for _, _, d, _ in uploads][0] == 1 << 40
        want = documented_fedavg(uploads, current, rules)
        assert all(torch.equal(out.state[k], want[k]) for k in want)
    final = adapter(server.result.adapter_dir)
    last = seen[-1][3].state
    assert all(torch.equal(final["base_model.model." + k], last[k]) for k in last)
    print(f"\nfed, 2^40 samples declared: weight capped at {cap}, documented rule reproduced exactly")


def test_upload_with_another_sample_count_is_refused(tmp_path, csvs, solo, later):
    """Finding 3: an upload whose sample count (2^40) is not the one the client declared in Hello is
    refused and its sender dropped; the adapter is the honest one alone."""
    def inflate(command, reply):
        if isinstance(reply, AdapterUpdate):
            reply.num_samples = 1 << 40
        return reply

    cfg = attack_config(algorithm="fed")
    server = start_server(cfg, tmp_path / "server", later)
    errors, attacker_errors = [], []
    tampering_client(server.port, csvs[0], later, attacker_errors, inflate)
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    (reason,) = drops(tmp_path / "server")
    assert "announced in Hello" in reason
    assert same_as_solo(server, solo, "fed, an upload claiming 2^40 samples") == 0



# ==== beyond the issue: sl hand-overs ==========================================================================

def test_sl_handover_with_forged_moments_is_refused(tmp_path, csvs, later):
    """sl: the turn's client hands back its adapter with AdamW's moments; the next client continues
    from them. Forged moments inside the value bound (exp_avg 1e10, exp_avg_sq 0: no AdamW makes them)
    are refused on arrival and their sender dropped; the server keeps its copy. They were accepted,
    checkpointed and handed on: the next (honest) client's adapter blew up and it was dropped."""
    from splitlora.transport.wire import MOMENT_RATIO

    cfg = attack_config(algorithm="sl")
    server = start_server(cfg, tmp_path / "server", later)
    errors, attacker_errors = [], []

    def forge(command, reply):
        if isinstance(reply, Handover):
            reply.exp_avg = {k: torch.full_like(v, 1e10) for k, v in reply.exp_avg.items()}
            reply.exp_avg_sq = {k: torch.zeros_like(v) for k, v in reply.exp_avg_sq.items()}
        return reply

    tampering_client(server.port, csvs[0], later, attacker_errors, forge)
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    reasons = drops(tmp_path / "server")
    assert reasons and all("invalid HandOut reply" in r and "first moments" in r for r in reasons), reasons
    assert set(drops(tmp_path / "server", HONEST)) <= {"left"}
    finite_outputs(tmp_path / "server")
    h = checkpoint_state(tmp_path / "server")["algorithm"]["handover"]
    assert all(bool((h["exp_avg"][k] ** 2 <= MOMENT_RATIO * h["exp_avg_sq"][k] + 1e-30).all()) for k in h["exp_avg"])
    assert max(float(v.abs().max()) for v in adapter(server.result.adapter_dir).values()) < 1.0


# ==== 5. disk full at a checkpoint ===========================================================================

@pytest.mark.parametrize("when", ["mid-run", "last"])
def test_disk_full_at_a_checkpoint(tmp_path, csvs, solo, later, monkeypatch, caplog, when):
    """Finding 5: ENOSPC at a checkpoint (simulated: the checkpoint writer raises it). The server stops
    with a one-line error (UserError: exit code 2), tells the client, releases its port; the previous
    checkpoint stands and metrics.jsonl has no `checkpoint` event for the failed one.
    mid-run (step 4 of 6; from then on every file write fails, the adapter's too): the client hears
    that the server stopped, waits for it to come back (serve --resume) for its reconnect timeout and
    then exits with a one-line error. last (step 6 of 6, only the checkpoint fails): the run is over,
    the client exits normally, and the adapter (the finished work) is saved, the honest one alone."""
    from splitlora.errors import UserError
    from splitlora.runtime.checkpoint import load_checkpoint
    from splitlora.transport import serve as serve_mod

    caplog.set_level(logging.INFO, logger="splitlora.transport.remote_client")
    cfg = attack_config(steps=6)
    alone = solo(cfg) if when == "last" else None  # before the disk fills
    fail_at = 4 if when == "mid-run" else 6
    real_save = serve_mod.save_checkpoint

    def save(directory, state):
        if state["step"] >= fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(directory, state)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(serve_mod, "save_checkpoint", save)
    if when == "mid-run":
        monkeypatch.setattr(serve_mod, "save_adapter", no_space)
    server = start_server(cfg, tmp_path / "server", later, join_timeout=SOLO_JOIN)
    port = server.port
    errors, results = [], []
    start = time.monotonic()
    honest = start_honest(server, csvs[1], later, errors, reconnect_timeout=4.0, results=results)
    server.thread.join(RUN_TIMEOUT)
    honest.join(RUN_TIMEOUT)
    assert not server.thread.is_alive() and not honest.is_alive()
    assert isinstance(server.error, UserError), server.error
    assert f"cannot write the checkpoint at step {fail_at}" in str(server.error)
    assert "the one at step" in str(server.error)
    # The port is free again: a new server binds it (no SO_REUSEPORT, so it would fail if held).
    probe = grpc.server(futures_pool(), options=[("grpc.so_reuseport", 0)])
    assert probe.add_insecure_port(f"127.0.0.1:{port}") == port
    probe.stop(None)
    # The previous checkpoint stands; no event for the failed one; metrics.jsonl is strict JSON.
    out = tmp_path / "server"
    assert load_checkpoint(out / "checkpoint")["step"] == fail_at - 2
    records = read_records(out)
    assert [e["step"] for e in events(records, "checkpoint")] == list(range(2, fail_at, 2))
    told = [r.getMessage() for r in caplog.records if "the server says" in r.getMessage()]
    assert told and "checkpoint" in told[0], told
    if when == "mid-run":
        assert len(errors) == 1 and "cannot reach the server" in str(errors[0]), errors
        assert "cannot save the adapter" in str(server.error)
        assert time.monotonic() - start < RUN_TIMEOUT
    else:
        assert not errors and results[0].finished, errors
        assert "the run finished and its adapter is in" in str(server.error)
        diff = max_abs_diff(adapter(out / "adapter"), alone)
        print(f"\nfinal checkpoint failed: max |adapter saved - adapter(honest client alone)| = {diff:.3g}")
        assert diff == 0


def futures_pool():
    from concurrent import futures

    return futures.ThreadPoolExecutor(max_workers=1)


# ==== 6, 7. processes: port sharing, log lines ===================================================================

def test_a_second_server_cannot_take_the_port(tmp_path, csvs, solo):
    """Finding 6: a second `splitlora serve` on the port of a running one refuses to start (exit 2,
    one line) instead of sharing it (SO_REUSEPORT) and taking some of its clients; the first one's run
    finishes with its honest client (exit 0), and its adapter is the honest client's alone."""
    from splitlora.transport.loopback import Loopback

    cfg = attack_config()
    with Loopback(cfg, csvs, tmp_path / "a") as a, Loopback(cfg, csvs, tmp_path / "b") as b:
        a.start_server("--join-timeout", "90", "--client-timeout", "20", "--poll-interval", "1", "--linger", "1")
        endpoint = a.endpoint()
        # The first server holds its port until its run ends, and its run waits for client 1, which
        # starts only once the second server gave up. (Client 0 joins, then leaves when asked to work.)
        attacker = Raw(int(endpoint.rsplit(":", 1)[1]), lambda fn: None, token=a.tokens[ATTACKER])
        try:
            attacker.hello()
            b.start_server(listen=endpoint)
            assert b.wait(b.server, 60, "second server") == 2, b.tail("server.log")
            assert f"error: cannot listen on {endpoint}" in b.tail("server.log")
            a.start_client(1, "--reconnect-timeout", "60", endpoint=endpoint)
            attacker.asked("forward")
            attacker.stub.Leave(pb.Done(session=attacker.session), metadata=attacker.md, timeout=30)
        finally:
            attacker.channel.close()
        assert a.wait(a.server, RUN_TIMEOUT, "first server") == 0, a.tail("server.log")
        assert a.wait(a.clients[1], 30, "client") == 0, a.tail(a.client_log(1))
        assert sorted(e["client"] for e in events(a.metrics(), "join")) == [ATTACKER, HONEST]
        diff = max_abs_diff(adapter(a.server_dir / "adapter"), solo(cfg))
    print(f"\nsecond server on the same port: exit 2; max |adapter(first server) - adapter(honest alone)| = {diff:.3g}")
    assert diff == 0


def test_leave_reason_cannot_forge_log_lines(tmp_path, csvs, solo):
    """Finding 7: a Leave reason with newlines, a carriage return and terminal escapes is logged on one
    line, escaped; no forged line appears in the server's log. The run goes on with the honest
    client (exit 0), whose adapter is its own alone."""
    from splitlora.transport.loopback import Loopback

    cfg = attack_config()
    forged = "ERROR splitlora.transport.server: client 1 dropped at step 0: forged"
    reason = f"bye\n{forged}\r\x1b[2K{forged}\u2028{forged}"
    with Loopback(cfg, csvs, tmp_path / "lb") as lb:
        lb.start_server("--join-timeout", "60", "--client-timeout", "20", "--poll-interval", "1", "--linger", "1")
        endpoint = lb.endpoint()
        attacker = Raw(int(endpoint.rsplit(":", 1)[1]), lambda fn: None, token=lb.tokens[ATTACKER])
        try:
            attacker.hello()
            lb.start_client(1, "--reconnect-timeout", "60", endpoint=endpoint)
            attacker.asked("forward")
            attacker.stub.Leave(pb.Done(session=attacker.session, error=reason), metadata=attacker.md, timeout=30)
        finally:
            attacker.channel.close()
        assert lb.wait(lb.server, RUN_TIMEOUT, "server") == 0, lb.tail("server.log")
        assert lb.wait(lb.clients[1], 30, "client") == 0, lb.tail(lb.client_log(1))
        log_text = (lb.root / "server.log").read_text()
        (drop,) = [e for e in events(lb.metrics(), "drop") if e["client"] == ATTACKER]
        diff = max_abs_diff(adapter(lb.server_dir / "adapter"), solo(cfg))
    lines = log_text.splitlines()
    assert not [line for line in lines if forged in line and not line.startswith("WARNING")]
    (line,) = [line for line in lines if "left with an error" in line]
    assert line.startswith("WARNING splitlora.transport.server: client 0 dropped")
    assert "bye\\nERROR" in line and "\\r\\x1b[2K" in line and "\\u2028" in line
    assert drop["reason"].startswith("left with an error: bye\\nERROR")
    print(f"\nforged log lines: {line[:90]}...; max |adapter - adapter(honest alone)| = {diff:.3g}")
    assert diff == 0


# ==== 8. smaller findings ====================================================================================

def test_batch_without_loss_tokens_is_refused(tmp_path, csvs, solo, later):
    """Finding 8: a batch whose labels are all -100 (its loss would be 0/0 = NaN) is refused and its
    sender dropped; metrics.jsonl stays strict JSON (no NaN); the adapter is the honest one alone."""
    cfg = attack_config()
    server, attacker, honest, errors, forward = raw_attack(cfg, tmp_path, csvs, later)
    acts = activations(0)
    acts.labels.CopyFrom(tensor_to_proto(torch.full((2, 10), -100, dtype=torch.int32)))
    reply = pb.ClientMessage(session=attacker.session, reply_to=forward.id, activations=acts)
    assert attacker.code(lambda: attacker.exchange(reply)) == grpc.StatusCode.INVALID_ARGUMENT
    finish(server, honest, errors)
    (reason,) = drops(tmp_path / "server")
    assert "no loss token" in reason
    finite_outputs(tmp_path / "server")
    assert same_as_solo(server, solo, "a batch whose labels are all -100") == 0


@pytest.mark.parametrize("line,needle", [
    ("alice x", "16 to 512 printable ASCII"),  # 1 character
    ("alice " + "é" * 20, "not all printable ASCII"),
    ("alice " + "a" * 15, "16 to 512"),
    ("\u0430lice " + "a" * 20, "client name"),  # Cyrillic a
    ("\uff41lice " + "a" * 20, "client name"),  # fullwidth a
    ("alice\u200b " + "a" * 20, "client name"),  # zero-width space
    ("alice " + "a" * 20 + "\nalice " + "b" * 20, "listed twice"),
    ("alice " + "a" * 20 + "\nbob " + "a" * 20, "share one token"),
])
def test_token_file_refuses_weak_tokens_and_look_alike_names(tmp_path, capsys, monkeypatch, line, needle):
    """Finding 8 and beyond: 1-character, short and non-ASCII tokens, names with unicode look-alikes
    or invisible characters, duplicates: `serve` refuses the token file (one line, exit 2)."""
    from splitlora import cli

    tokens = tmp_path / "tokens.txt"
    tokens.write_text(line + "\n", encoding="utf-8")
    monkeypatch.setattr(cli, "_EXTRA_COMMANDS", [])
    assert cli.main(["serve", "--token-file", str(tokens), "--clients", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_client_id_look_alike_is_refused():
    from splitlora.config import check_client_name
    from splitlora.errors import UserError

    for name in ("\u0430lice", "alice\u200b", "al ice", "", "a" * 65, "alice\n"):
        with pytest.raises(UserError, match="client name"):
            check_client_name(name, "--client-id")


def test_bom_in_token_files(tmp_path, csvs, solo, later):
    """Finding 8: a byte-order mark at the start of a token file (as some Windows editors write) is not
    part of the first name or token: the server reads its token file, the client its token, and the
    client trains as if the files had none."""
    from splitlora.transport.auth import read_client_token, read_token_file

    server_file, client_file = tmp_path / "tokens.txt", tmp_path / "1.token"
    server_file.write_bytes(b"\xef\xbb\xbf" + "".join(f"{n} {t}\n" for n, t in TOKENS.items()).encode())
    client_file.write_bytes(b"\xef\xbb\xbf" + TOKENS[HONEST].encode() + b"\r\n")
    assert read_token_file(server_file) == TOKENS
    assert read_client_token(client_file) == TOKENS[HONEST]
    cfg = attack_config()
    server = ThreadServer(cfg, tmp_path / "server", read_token_file(server_file),
                          **{**FAST, "join_timeout": SOLO_JOIN})
    later(server.stop)
    errors = []
    honest = start_honest(server, csvs[1], later, errors)
    finish(server, honest, errors)
    assert same_as_solo(server, solo, "token files with a BOM") == 0


def test_tls_failures_stop_the_client_at_once(tmp_path, csvs, solo, later):
    """Finding 8: a client whose TLS handshake fails (a CA that did not sign the server's certificate;
    TLS against a plain-text server) stops within seconds with one line, although its reconnect
    timeout is 60 s; the honest client with the right CA trains as if alone."""
    from test_deploy import self_signed_cert

    from splitlora.errors import UserError

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cert, key, ca = self_signed_cert(tmp_path / "a")
    _, _, other_ca = self_signed_cert(tmp_path / "b")
    cfg = attack_config()
    server = start_server(cfg, tmp_path / "server", later, join_timeout=SOLO_JOIN, tls_cert=cert.read_bytes(),
                          tls_key=key.read_bytes())
    plain = start_server(cfg, tmp_path / "plain", later)
    errors, wrong_ca, tls_to_plain = [], [], []
    start = time.monotonic()
    bad = [start_honest(server, csvs[0], later, wrong_ca, name=ATTACKER, reconnect_timeout=60,
                        tls_ca=other_ca.read_bytes()),
           start_honest(plain, csvs[0], later, tls_to_plain, name=ATTACKER, reconnect_timeout=60,
                        tls_ca=ca.read_bytes())]
    honest = start_honest(server, csvs[1], later, errors, tls_ca=ca.read_bytes())
    for t in bad:
        t.join(30)
    took = time.monotonic() - start
    for errs in (wrong_ca, tls_to_plain):
        assert len(errs) == 1 and isinstance(errs[0], UserError) and "TLS with" in str(errs[0]), errs
    assert took < 20, took
    finish(server, honest, errors)
    print(f"\nTLS failures reported after {took:.1f}s: {str(wrong_ca[0])[:100]} | {str(tls_to_plain[0])[:100]}")
    assert same_as_solo(server, solo, "over TLS, beside clients whose TLS fails") == 0


@pytest.mark.parametrize("valid", ["expired", "not yet valid"])
def test_server_refuses_an_expired_certificate(tmp_path, valid):
    """Finding 8: `serve` refuses an expired (or not yet valid) certificate at start, before it listens."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from splitlora.config import ServeOptions
    from splitlora.errors import UserError
    from splitlora.transport.serve import serve

    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    begin, end = (now - 3 * day, now - day) if valid == "expired" else (now + day, now + 3 * day)
    pkey = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    crt = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(pkey.public_key())
           .serial_number(x509.random_serial_number()).not_valid_before(begin).not_valid_after(end)
           .sign(pkey, hashes.SHA256()))
    opts = ServeOptions(tokens=TOKENS, listen="127.0.0.1:0", progress=False, handle_signals=False,
                        tls_cert=crt.public_bytes(serialization.Encoding.PEM),
                        tls_key=pkey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    with pytest.raises(UserError, match="expired" if valid == "expired" else "not valid before"):
        serve(attack_config(), opts, tmp_path / "server", on_ready=lambda port: pytest.fail("it listened"))


# ==== beyond the issue: protocol abuse ==========================================================================

def _abuse(case: str, attacker: Raw, server, forward: pb.Command):
    """Do ``case``; returns the gRPC code the server answered with, and whether the attacker is still in."""
    if case == "old session":
        old = attacker.session
        attacker.hello()  # a second Hello: a new session, the old one is over
        code = attacker.code(lambda: attacker.exchange(pb.ClientMessage(session=old)))
        return code, True
    if case == "someone else's session":
        theirs = server.grid.members[HONEST].session
        code = attacker.code(lambda: attacker.exchange(pb.ClientMessage(session=theirs)))
        attacker.stub.Leave(pb.Done(session=theirs, error="gone"), metadata=attacker.md, timeout=30)
        return code, True
    if case == "second Hello in the run":
        attacker.hello()
        attacker.asked("forward")  # admitted again at the next round boundary
        return None, True
    if case == "poll while a reply is owed":
        return attacker.code(lambda: attacker.exchange()), False
    if case == "oversized declared size":
        def call():
            chunks = iter([pb.Chunk(data=b"\x08\x01", total_bytes=(1 << 64) - 1)])
            for _ in attacker.stub.Exchange(chunks, metadata=attacker.md, timeout=30):
                pass
        return attacker.code(call), False
    reply = pb.ClientMessage(session=attacker.session, reply_to=forward.id, activations=activations(0))
    if case == "reply to a command not given":
        reply.reply_to = forward.id + 1  # the next command id: the honest client's, or none yet
    elif case == "wrong step":
        reply.activations.step = 1
    elif case == "absurd declared shape":
        reply.activations.hidden.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[1 << 40, 1 << 40, 64], data=b"\0" * 16))
    return attacker.code(lambda: attacker.exchange(reply)), False


@pytest.mark.parametrize("case,code,reason", [
    ("old session", grpc.StatusCode.ABORTED, "reconnected"),
    ("someone else's session", grpc.StatusCode.ABORTED, "left"),
    ("second Hello in the run", None, "reconnected"),
    ("poll while a reply is owed", grpc.StatusCode.ABORTED, "polled while it owed a reply"),
    ("reply to a command not given", grpc.StatusCode.INVALID_ARGUMENT, "a command it was not given"),
    ("wrong step", grpc.StatusCode.INVALID_ARGUMENT, "the command was for step 0"),
    ("oversized declared size", grpc.StatusCode.INVALID_ARGUMENT, "exceeds the limit"),
    ("absurd declared shape", grpc.StatusCode.INVALID_ARGUMENT, "exceeds the limit"),
])
def test_protocol_abuse(tmp_path, csvs, solo, later, case, code, reason):
    """Replayed and foreign sessions, a second Hello mid-run, polls while a reply is owed, replies to
    commands not given or for the wrong step, absurd declared sizes: each is refused with its code,
    touches only the attacker's own membership, and the honest client trains as if alone."""
    cfg = attack_config()
    server, attacker, honest, errors, forward = raw_attack(cfg, tmp_path, csvs, later)
    got, still_in = _abuse(case, attacker, server, forward)
    assert got == code
    if still_in:
        attacker.stub.Leave(pb.Done(session=attacker.session), metadata=attacker.md, timeout=30)
    finish(server, honest, errors)
    reasons = drops(tmp_path / "server")
    assert reasons and any(reason in r for r in reasons), reasons
    assert set(drops(tmp_path / "server", HONEST)) <= {"left"}
    assert same_as_solo(server, solo, case) == 0
