"""Shared helpers of the malicious-client tests over gRPC (tests/test_attacks_*.py): one attacker with a
valid token beside an honest client, on 127.0.0.1.

Client ``0`` (index 0 of the token file) attacks, client ``1`` (index 1) is an ordinary
:class:`RemoteClient`. Each test shows that the run finishes, that the honest client returns normally,
and that the final adapter is the one the honest client alone produces (the same config and token file,
served with only client ``1`` joining: a short join timeout starts the run with ``min_clients=1``;
client 1 keeps its index, so its data order is the same), or, where the attacker took an honest part
before attacking, the documented result, checked exactly. The in-process attacks (bounded influence)
have their own helpers in tests/attack_sim.py.

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

from deploy_helpers import (TOKENS, ThreadServer, adapter, deploy_config, honest_client, max_abs_diff, md,
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


# ---- FedAvg: what the server aggregated, and the documented rule ----------------------------------------

def capture_aggregations(monkeypatch) -> list:
    """Record what every aggregation of the run is given (and the norm reference it starts from) and
    what it returns."""
    from splitlora.runtime.aggregator import Aggregator

    seen = []
    real = Aggregator.__call__

    def recorded(self, uploads, current, min_clients=1):
        reference = self.reference
        out = real(self, uploads, current, min_clients)
        seen.append(([(n, i, d, {k: v.clone() for k, v in st.items()}) for n, i, d, st in uploads],
                     {k: v.clone() for k, v in current.items()}, (self.rules, reference), out))
        return out

    monkeypatch.setattr(Aggregator, "__call__", recorded)
    return seen


def documented_fedavg(uploads, current, rules) -> dict[str, torch.Tensor]:
    """The rule docs/deployment.md states (What the server checks, Aggregation), written out here:
    weights capped at max_samples_per_client and at max_weight_ratio times the lower median claim; the
    norm reference is the lower median of the changes ||s - avg||, at most max_norm_growth times the
    previous round's; a change above max_update_ratio times it is left out (reject) or scaled to that
    bound (clip); the rest are averaged with their weights, in index order."""
    rules, previous = rules

    def norm(state, ref):
        return sum(float((v.float() - ref[k].float()).pow(2).sum()) for k, v in state.items()) ** 0.5

    uploads = sorted(uploads, key=lambda u: u[1])
    change = {name: norm(state, current) for name, _, _, state in uploads}
    ordered = sorted(change.values())
    ref = ordered[(len(ordered) - 1) // 2]
    if previous:
        ref = min(ref, rules.max_norm_growth * previous)
    bound = rules.max_update_ratio * ref
    claims = sorted(min(d, rules.max_samples_per_client) for _, _, d, _ in uploads)
    cap = rules.max_weight_ratio * claims[(len(claims) - 1) // 2]
    kept = []
    for name, _, declared, state in uploads:
        if change[name] > bound:
            if rules.outliers == "reject":
                continue
            state = {k: current[k] + (v - current[k]) * (bound / change[name]) for k, v in state.items()}
        kept.append((state, min(declared, rules.max_samples_per_client, cap)))
    total = float(sum(n for _, n in kept))
    return {k: current[k] + sum((n / total) * (st[k] - current[k]) for st, n in kept) for k in current}


def same_rule(out, want) -> bool:
    """Equal up to float32 summation order (the server sums flattened updates)."""
    return all(torch.allclose(out.state[k], want[k], rtol=1e-5, atol=1e-7) for k in want)


def checkpoint_state(out: Path) -> dict:
    return torch.load(out / "checkpoint" / "state.pt", weights_only=True)


def fill_upload(value):
    def tamper(command, reply):
        if isinstance(reply, AdapterUpdate):
            reply.state = {k: torch.full_like(v, value) for k, v in reply.state.items()}
        return reply
    return tamper
