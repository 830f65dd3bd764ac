"""Deployment over gRPC on 127.0.0.1: same adapter as `splitlora train`, lean parties, security, faults.

Every wait has a timeout and every process is killed in a finalizer. The process tests run the
real commands (`python -m splitlora.cli serve|client`); the others run the server in a thread.
"""

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from splitlora.transport import splitlora_pb2 as pb
from splitlora.transport import splitlora_pb2_grpc as pb_grpc
from splitlora.transport.serve import CHECKPOINT_DIR
from splitlora.transport.loopback import Loopback, run_loopback
from splitlora.transport.wire import PROTOCOL_VERSION, from_chunks, tensor_to_proto, to_chunks

from deploy_helpers import (STEPS, TOKENS, ThreadServer, adapter, code_of, deploy_config, events, honest_client,  # noqa: F401
                            max_abs_diff, md, poll_until_asked, read_records, rpc, self_signed_cert, step_rows,
                            write_client_csvs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_gpt2):
    """The config, the clients' CSV files, and the adapter `splitlora train` makes in one process."""
    from splitlora.simulation.run import train

    root = tmp_path_factory.mktemp("deploy")
    cfg = deploy_config()
    csvs = write_client_csvs(cfg, tiny_gpt2.tokenizer, root / "data")
    result = train(cfg, root / "train", progress=False)
    return cfg, csvs, result


def same_rows(train_dir: Path, serve_dir: Path) -> bool:
    """Loss, tokens and bytes of every step row agree between train's and serve's metrics.jsonl."""
    keys = ("step", "loss", "lr", "tokens", "bytes_up", "bytes_down", "bytes_up_total", "bytes_down_total")
    rows = [[[r[k] for k in keys] for r in step_rows([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()])]
            for d in (train_dir, serve_dir)]
    assert rows[0] == rows[1]
    return True


# ---- lean parties ------------------------------------------------------------------------------

def _model_without(tmp_path: Path, name: str, drop) -> Path:
    """A copy of the tiny-gpt2 model directory whose safetensors lacks the tensors ``drop(key)`` names."""
    import shutil

    from safetensors.torch import save_file

    from splitlora.models.loading import resolve_model

    src = Path(resolve_model("tiny-gpt2"))
    dst = tmp_path / name
    shutil.copytree(src, dst)
    weights = load_file(str(src / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not drop(k)}, str(dst / "model.safetensors"))
    return dst


def _block(key: str) -> int | None:
    return int(key.split(".h.")[1].split(".")[0]) if ".h." in key else None


def test_each_lean_party_reads_only_its_part(tmp_path, tiny_gpt2):
    """A client starts from a checkpoint without the server's tensors, a server from one without the
    clients'; neither can build the other side; the lean parts equal the simulation's."""
    from splitlora.errors import UserError
    from splitlora.models.parts import LeanModel, SharedModel

    cut = 2
    server_only = lambda k: (_block(k) is not None and _block(k) >= cut) or k.startswith("transformer.ln_f")  # noqa: E731
    client_only = lambda k: (_block(k) is not None and _block(k) < cut) or k.startswith("transformer.wpe")  # noqa: E731
    for name, drop, works, fails in [("no-server", server_only, "client", "server"),
                                     ("no-client", client_only, "server", "client")]:
        path = _model_without(tmp_path, name, drop)
        cfg = deploy_config(model=str(path))
        lean = LeanModel(str(path), cfg)
        part = lean.part(works)
        shared = SharedModel(tiny_gpt2, cfg).part(works)
        got, want = dict(part.named_parameters()), dict(shared.named_parameters())
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        blocks = sorted(int(i) for i in part.transformer.h.keys())
        assert blocks == ([0, 1] if works == "client" else [2, 3])
        with pytest.raises(UserError, match="no weights"):
            lean.part(fails)
        # What one side reads of the other's file is enough to check the other's fingerprint.
        assert lean.fingerprint(works) == LeanModel("tiny-gpt2", cfg).fingerprint(works)


def test_lean_init_is_the_simulation_init(tiny_gpt2):
    """The server computes the run's initial adapter from a tensor-less skeleton: the same numbers."""
    from splitlora.models.parts import LeanModel, SharedModel

    cfg = deploy_config(client_lora={"rank": 4}, server_lora={"rank": 8})
    lean, shared = LeanModel("tiny-gpt2", cfg).initial_state(), SharedModel(tiny_gpt2, cfg).initial_state()
    assert lean.keys() == shared.keys() and all(torch.equal(lean[k], shared[k]) for k in lean)


# ---- in one process (threads) ------------------------------------------------------------------

def test_loopback_threads_matches_train(reference, tmp_path, monkeypatch):
    """run_loopback (the benchmark entry point) gives train's adapter and train's byte counts.

    And the server builds received tensors on its loop thread, never in a gRPC handler thread: a
    torch op there gives OpenMP a second thread team and slows every step (transport/sessions.py).
    """
    from splitlora.transport import sessions

    decoded_on = []

    def recorded(*args, _real=sessions.reply_from_proto):
        decoded_on.append(threading.current_thread().name)
        return _real(*args)

    monkeypatch.setattr(sessions, "reply_from_proto", recorded)
    cfg, csvs, result = reference
    out = run_loopback(cfg, csvs, tmp_path / "loop", wire_dtype="fp32", mode="threads", timeout=240)
    assert len(decoded_on) >= cfg.steps * cfg.clients
    assert set(decoded_on) == {"loopback-server"}, set(decoded_on)
    diff = max_abs_diff(adapter(result.adapter_dir), adapter(out["adapter_dir"]))
    print(f"\nmax |adapter(loopback threads) - adapter(train)| = {diff:.3g}")
    assert diff <= 1e-6
    assert same_rows(result.out_dir, tmp_path / "loop/server")
    assert out["steps"] == cfg.steps and out["tokens_per_s"] > 0


def test_loopback_bf16_matches_the_simulation_at_bf16(tmp_path, tiny_gpt2):
    from splitlora.simulation.run import train

    cfg = deploy_config(steps=3, clients=2, wire_dtype="bf16")
    csvs = write_client_csvs(cfg, tiny_gpt2.tokenizer, tmp_path / "data")
    sim = train(cfg, tmp_path / "train", progress=False)
    out = run_loopback(cfg, csvs, tmp_path / "loop", mode="threads", timeout=240)
    assert max_abs_diff(adapter(sim.adapter_dir), adapter(out["adapter_dir"])) <= 1e-6
    fp32 = run_loopback(cfg, csvs, tmp_path / "loop32", wire_dtype="fp32", mode="threads", timeout=240)
    assert same_rows(sim.out_dir, tmp_path / "loop/server")  # bytes counted as the simulation counts them
    assert out["bytes_up_per_step"] < 0.75 * fp32["bytes_up_per_step"]
    assert out["bytes_down_per_step"] < 0.75 * fp32["bytes_down_per_step"]


@pytest.mark.parametrize("algorithm", ["splitlora", "sl"])
def test_u_shape_server_never_receives_a_label_or_token(tmp_path, tiny_gpt2, monkeypatch, algorithm):
    """End to end on loopback: every message the U-shaped server receives holds floats (and the
    uint8 attention mask) only, never labels or token ids; and the adapter is the simulation's
    (`sl`: the hand-over carries the client's bottom and tail)."""
    from splitlora.simulation.run import train
    received = record_exchanges(monkeypatch)
    cfg = deploy_config(algorithm=algorithm, clients=2, steps=4, aggregate_every=2, split_shape="u-shape",
                        tail_layers=1, cut_layer=1)
    csvs = write_client_csvs(cfg, tiny_gpt2.tokenizer, tmp_path / "data")
    sim = train(cfg, tmp_path / "train", progress=False)
    out = run_loopback(cfg, csvs, tmp_path / "loop", mode="threads", timeout=240)
    diff = max_abs_diff(adapter(sim.adapter_dir), adapter(out["adapter_dir"]))
    print(f"\n{algorithm} u-shape: max |adapter(loopback) - adapter(train)| = {diff:.3g}")
    assert diff == 0
    kinds = [m.WhichOneof("payload") for m in received]
    batches = cfg.steps * (cfg.clients if algorithm == "splitlora" else 1)  # sl: one client per step
    assert kinds.count("activations") == kinds.count("tail_grad") == batches
    if algorithm == "sl":
        assert kinds.count("handover") >= 1

    assert_no_label_or_token(received)


def record_exchanges(monkeypatch) -> list:
    """Every message the server's grid receives in the run, decoded again from its bytes."""
    from splitlora.transport.sessions import GrpcGrid

    received = []
    real = GrpcGrid.exchange

    def exchange(self, name, msg, wire_bytes, active):
        received.append(pb.ClientMessage.FromString(msg.SerializeToString()))
        return real(self, name, msg, wire_bytes, active)

    monkeypatch.setattr(GrpcGrid, "exchange", exchange)
    return received


def assert_no_label_or_token(received) -> None:
    """Every tensor the server received is float32 (or the uint8 attention mask): no labels, no ids."""

    def tensors(msg):
        for field, value in msg.ListFields():
            for item in (value if field.is_repeated else [value]):
                if isinstance(item, pb.Tensor):
                    yield field.name, item
                elif hasattr(item, "ListFields"):
                    yield from tensors(item)

    seen = [(n, t.dtype) for m in received for n, t in tensors(m)]
    assert seen and not [n for n, _ in seen if n == "labels"]
    assert {d for n, d in seen if n != "attention_mask"} == {pb.FLOAT32}
    assert {d for n, d in seen if n == "attention_mask"} == {pb.UINT8}


def test_u_shape_conversational_jsonl_sends_no_label_or_token(tmp_path, tiny_gpt2, monkeypatch):
    """Each client reads its own conversational JSONL (chat template, loss on assistant turns): the
    U-shaped server still receives floats and the mask only, and the adapter is the simulation's."""
    from test_user_data import CHAT, conv_rows, write_jsonl
    from splitlora.data import prepare_data
    from splitlora.simulation.run import train
    received = record_exchanges(monkeypatch)
    path = write_jsonl(tmp_path / "chat.jsonl", conv_rows(12))
    cfg = deploy_config(clients=2, steps=3, aggregate_every=2, split_shape="u-shape", tail_layers=1, cut_layer=1,
                        data=str(path), max_length=96, data_format={"chat_template": CHAT})
    data = prepare_data(cfg, tiny_gpt2.tokenizer)
    files = [write_jsonl(tmp_path / f"site_{i}.jsonl", [{"messages": data.train_rows[j]["messages"]} for j in ix])
             for i, ix in enumerate(data.client_indices)]
    sim = train(cfg, tmp_path / "train", progress=False)
    out = run_loopback(cfg, files, tmp_path / "loop", mode="threads", timeout=240)
    assert max_abs_diff(adapter(sim.adapter_dir), adapter(out["adapter_dir"])) == 0
    assert_no_label_or_token(received)


def test_security_and_malformed_messages(tmp_path, tiny_gpt2, caplog):
    """Wrong/missing tokens: UNAUTHENTICATED. Malformed messages: INVALID_ARGUMENT, and the sender is
    dropped. The run goes on with the honest client; nothing of a client's data is on the server's disk."""
    caplog.set_level("WARNING", logger="splitlora.transport.server")
    cfg = deploy_config(clients=2, steps=4)
    csvs = write_client_csvs(cfg, tiny_gpt2.tokenizer, tmp_path / "data")
    server = ThreadServer(cfg, tmp_path / "server", TOKENS, client_timeout=60)
    client_thread = None
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        stub = pb_grpc.SplitLoRAStub(channel)
        hello = pb.HelloRequest(protocol_version=PROTOCOL_VERSION, num_samples=5)
        for metadata in [(), md("0", TOKENS["1"]), md("7", TOKENS["0"]), md("zero", TOKENS["0"]),
                         (("authorization", TOKENS["0"]), ("splitlora-client-id", "0"))]:
            assert code_of(lambda: rpc(stub, "Hello", hello, metadata, pb.HelloReply)) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: stub.Leave(pb.Done(), timeout=30)) == grpc.StatusCode.UNAUTHENTICATED
        assert server.grid.refused == 6
        assert sum("refused" in r.getMessage() for r in caplog.records) == 6
        assert not any(TOKENS["0"] in r.getMessage() or TOKENS["1"] in r.getMessage() for r in caplog.records)
        bad_version = pb.HelloRequest(protocol_version=99, num_samples=5)
        assert code_of(lambda: rpc(stub, "Hello", bad_version, md("0"), pb.HelloReply)) == grpc.StatusCode.FAILED_PRECONDITION

        # A real client 1, and a hand-made client 0 that sends garbage.
        errors = []
        client_thread = honest_client(server.port, "1", csvs[1], errors)
        joined = rpc(stub, "Hello", pb.HelloRequest(protocol_version=PROTOCOL_VERSION, num_samples=5, join=True),
                     md("0"), pb.HelloReply, timeout=120)
        assert joined.session and joined.index == 0 and "tiny-gpt2" in joined.config_yaml
        forward = poll_until_asked(stub, joined.session, md("0"))
        b, t, h = 2, 10, 64  # tiny-gpt2's hidden size
        nan = torch.randn(b, t, h)
        nan[0, 0, 0] = float("nan")
        labels = torch.full((b, t), -100, dtype=torch.int32)
        labels[:, 5:] = 11
        reply = pb.ClientMessage(session=joined.session, reply_to=forward.id, activations=pb.ActivationsMsg(
            step=0, hidden=tensor_to_proto(nan), attention_mask=tensor_to_proto(torch.ones(b, t, dtype=torch.uint8)),
            labels=tensor_to_proto(labels)))
        assert code_of(lambda: rpc(stub, "Exchange", reply, md("0"), pb.ServerMessage)) == grpc.StatusCode.INVALID_ARGUMENT
        assert server.grid.invalid == 1
        # Dropped: its session is gone.
        assert code_of(lambda: rpc(stub, "Exchange", pb.ClientMessage(session=joined.session), md("0"),
                                   pb.ServerMessage)) == grpc.StatusCode.ABORTED
        whole = reply.SerializeToString()

        def exchange_code(chunks):
            def call():
                from_chunks(stub.Exchange(iter(chunks), metadata=md("0"), timeout=60), pb.ServerMessage, 1 << 30)
            return code_of(call)

        framing = {
            "oversized": [pb.Chunk(data=whole[:1000], total_bytes=1 << 30)],
            "truncated stream": [pb.Chunk(data=whole[:1000], total_bytes=len(whole))],
            "not protobuf": [pb.Chunk(data=b"\xff" * 64, total_bytes=64)],
        }
        for name, chunks in framing.items():
            assert exchange_code(chunks) == grpc.StatusCode.INVALID_ARGUMENT, name
        assert server.grid.invalid == 1 + len(framing)

        # The run finishes with client 1, and the shared adapter is sound.
        client_thread.join(180)
        server.thread.join(180)
        assert not errors, errors
        assert server.error is None, server.error
        assert server.result.finished and server.result.steps_done == cfg.steps
        state = adapter(server.result.adapter_dir)
        assert all(torch.isfinite(v).all() for v in state.values())
        records = read_records(tmp_path / "server")
        (drop,) = events(records, "drop")
        assert drop["client"] == "0" and "invalid Forward reply" in drop["reason"]
        assert all(r["clients"] == 1 for r in step_rows(records))
        # Nothing of a client's data is on the server's disk: its outputs are exactly these.
        names = {p.relative_to(tmp_path / "server").as_posix() for p in (tmp_path / "server").rglob("*") if p.is_file()}
        names = {n for n in names if not n.startswith("tensorboard/")}
        assert names == {"config.yaml", "metrics.jsonl", "metrics.csv", "endpoint", "adapter/adapter_config.json",
                         "adapter/adapter_model.safetensors", f"{CHECKPOINT_DIR}/state.pt"}
        channel.close()
    finally:
        server.stop()
        if client_thread is not None:
            client_thread.join(30)


@pytest.mark.slow  # the real `client` command, in its own interpreter
def test_client_command_with_a_wrong_token_is_one_line_and_exit_2(tmp_path, tiny_gpt2):
    cfg = deploy_config(clients=2, steps=4)
    csvs = write_client_csvs(cfg, tiny_gpt2.tokenizer, tmp_path / "data")
    server = ThreadServer(cfg, tmp_path / "server", TOKENS, client_timeout=60)
    try:
        wrong = tmp_path / "wrong.token"
        wrong.write_text("not-the-token-at-all\n")
        proc = subprocess.run([sys.executable, "-m", "splitlora.cli", "client", "--server", f"127.0.0.1:{server.port}",
                               "--token-file", str(wrong), "--client-id", "0", "--data", str(csvs[0]), "--quiet",
                               "--reconnect-timeout", "5"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        errs = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errs) == 1 and "refused client 0" in errs[0], proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        server.stop()


def test_stalled_client_is_dropped(tmp_path, tiny_gpt2):
    """A client that joins and then sends nothing is dropped after --client-timeout; the run goes on."""
    cfg = deploy_config(clients=2, steps=3)
    csvs = write_client_csvs(cfg, tiny_gpt2.tokenizer, tmp_path / "data")
    server = ThreadServer(cfg, tmp_path / "server", TOKENS, client_timeout=2)
    errors = []
    client = honest_client(server.port, "1", csvs[1], errors)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            hello = pb.HelloRequest(protocol_version=PROTOCOL_VERSION, num_samples=5, join=True)
            joined = rpc(pb_grpc.SplitLoRAStub(channel), "Hello", hello, md("0"), pb.HelloReply, timeout=120)
            assert joined.session  # ... and then silence
            client.join(180)
            server.thread.join(60)
        assert not errors and server.error is None, (errors, server.error)
        (drop,) = events(read_records(tmp_path / "server"), "drop")
        assert drop["client"] == "0" and drop["step"] == 0 and "within 2s" in drop["reason"]
        assert [r["clients"] for r in step_rows(read_records(tmp_path / "server"))] == [1] * cfg.steps
    finally:
        server.stop()
        client.join(30)


# ---- separate processes ---------------------------------------------------------------------------

@pytest.fixture
def loopback(reference, tmp_path):
    made = []

    def make(**kwargs):
        cfg, csvs, _ = reference
        lb = Loopback(cfg, csvs, tmp_path / f"lb{len(made)}", **kwargs)
        made.append(lb)
        return lb

    yield make
    for lb in made:
        lb.close()


def resume_to_the_end(lb, serve_args, endpoint) -> list[dict]:
    """Start the server again with --resume; it and every client finish (exit 0). The metrics records."""
    lb.start_server(*serve_args, resume=True, listen=endpoint)
    assert lb.wait(lb.server, 180, "resumed server") == 0, lb.tail("server.log")
    for i, proc in lb.clients.items():
        assert lb.wait(proc, 60, f"client {i}") == 0, lb.tail(lb.client_log(i))
    return lb.metrics()


@pytest.mark.slow
def test_processes_tls_ctrl_c_kill_resume_equals_train(reference, loopback, tmp_path):
    """Server + 3 client processes over TLS. Ctrl-C on the server stops it at the end of the round with a
    checkpoint; --resume continues; SIGKILL after a later checkpoint; --resume finishes the run. The
    adapter equals `splitlora train`'s: no step lost, none applied twice."""
    cfg, csvs, result = reference
    lb = loopback(tls=self_signed_cert(tmp_path))
    serve_args = ("--client-timeout", "60", "--join-timeout", "120")
    lb.start_server(*serve_args)
    endpoint = lb.endpoint()
    for i in range(len(csvs)):
        lb.start_client(i, "--reconnect-timeout", "120", endpoint=endpoint)

    lb.wait_for(lambda rs: step_rows(rs), timeout=150, what="the first step")
    lb.server.send_signal(signal.SIGINT)  # Ctrl-C
    assert lb.wait(lb.server, 60, "interrupted server") == 130, lb.tail("server.log")
    assert "interrupted" in lb.tail("server.log")
    records = lb.metrics()
    stopped = step_rows(records)[-1]["step"]
    assert stopped % cfg.aggregate_every == 0 and stopped < cfg.steps
    assert events(records, "checkpoint")[-1]["step"] == stopped
    assert (lb.server_dir / "adapter" / "adapter_model.safetensors").is_file()

    lb.start_server(*serve_args, resume=True, listen=endpoint)
    lb.wait_for(lambda rs: any(c["step"] > stopped for c in events(rs, "checkpoint"))
                and step_rows(rs)[-1]["step"] > events(rs, "checkpoint")[-1]["step"],
                timeout=120, what="a step after a checkpoint of the resumed server")
    lb.kill(lb.server, signal.SIGKILL)  # a crash: the checkpoint on disk is all that is left
    killed = step_rows(lb.metrics())[-1]["step"]
    assert killed < cfg.steps, "the run finished before the kill; make it longer"

    records = resume_to_the_end(lb, serve_args, endpoint)
    assert [r["step"] for r in step_rows(records)] == list(range(1, cfg.steps + 1))
    assert len(events(records, "resume")) == 2
    diff = max_abs_diff(adapter(result.adapter_dir), adapter(lb.server_dir / "adapter"))
    print(f"\nmax |adapter(serve + 3 client processes over TLS, Ctrl-C at step {stopped}, SIGKILL at step "
          f"{killed}, resumed twice) - adapter(train)| = {diff:.3g}")
    assert diff <= 1e-6


@pytest.mark.parametrize("algorithm,extra", [("sl", {}), ("fed", {}),
                                             ("splitlora", {"split_shape": "u-shape", "tail_layers": 1})],
                         ids=["sl", "fed", "splitlora-u-shape"])
@pytest.mark.slow
def test_named_clients_kill_resume_equals_train(tmp_path, tiny_gpt2, algorithm, extra):
    """`serve` + clients named alice and bob, as docs/deployment.md shows; SIGKILL the server after a
    checkpoint, --resume: the adapter equals `splitlora train`'s, every step once."""
    from splitlora.simulation.run import train

    cfg = deploy_config(algorithm=algorithm, clients=2, steps=10, **extra)
    csvs = write_client_csvs(cfg, tiny_gpt2.tokenizer, tmp_path / "data")
    result = train(cfg, tmp_path / "train", progress=False)
    with Loopback(cfg, csvs, tmp_path / "lb", names=["alice", "bob"]) as lb:
        serve_args = ("--client-timeout", "60", "--join-timeout", "120")
        lb.start_server(*serve_args)
        endpoint = lb.endpoint()
        for i in range(2):
            lb.start_client(i, "--reconnect-timeout", "120", endpoint=endpoint)
        lb.wait_for(lambda rs: events(rs, "checkpoint") and step_rows(rs)[-1]["step"] > events(rs, "checkpoint")[-1]["step"],
                    timeout=150, what="a step after a checkpoint")
        lb.kill(lb.server, signal.SIGKILL)
        killed = step_rows(lb.metrics())[-1]["step"]
        assert killed < cfg.steps, "the run finished before the kill; make it longer"
        records = resume_to_the_end(lb, serve_args, endpoint)
        assert "client alice joined" in (lb.root / "server.log").read_text() or events(records, "join")
    assert [r["step"] for r in step_rows(records)] == list(range(1, cfg.steps + 1))
    assert {e["client"] for e in events(records, "join")} == {"alice", "bob"}
    assert same_rows(result.out_dir, tmp_path / "lb/server")
    diff = max_abs_diff(adapter(result.adapter_dir), adapter(tmp_path / "lb/server/adapter"))
    print(f"\n{algorithm} {extra}: max |adapter(serve, alice + bob, SIGKILL at step {killed}, resumed) - "
          f"adapter(train)| = {diff:.3g}")
    assert diff <= 1e-6


@pytest.mark.slow
def test_processes_client_killed_mid_round_rejoins(tmp_path, tiny_gpt2):
    """A client process killed mid-round is dropped; the round goes on without it; restarted, it rejoins."""
    cfg = deploy_config(clients=2)
    csvs = write_client_csvs(cfg, tiny_gpt2.tokenizer, tmp_path / "data")
    with Loopback(cfg, csvs, tmp_path / "lb") as lb:
        lb.start_server("--client-timeout", "8", "--join-timeout", "120", "--min-clients", "2")
        endpoint = lb.endpoint()
        for i in range(len(csvs)):
            lb.start_client(i, "--reconnect-timeout", "120", endpoint=endpoint)
        lb.wait_for(lambda rs: events(rs, "aggregate"), timeout=150, what="the first round")
        lb.kill(lb.clients[1], signal.SIGKILL)
        records = lb.wait_for(lambda rs: any(e["client"] == "1" for e in events(rs, "drop")), timeout=60,
                              what="client 1 dropped")
        dropped_at = [e for e in events(records, "drop") if e["client"] == "1"][0]["step"]
        lb.start_client(1, "--reconnect-timeout", "120", endpoint=endpoint)
        assert lb.wait(lb.server, 180, "server") == 0, lb.tail("server.log")
        for i, proc in lb.clients.items():
            assert lb.wait(proc, 60, f"client {i}") == 0, lb.tail(lb.client_log(i))
        records = lb.metrics()
    rejoined_at = [e for e in events(records, "join") if e["client"] == "1"][-1]["step"]
    assert 0 < dropped_at <= rejoined_at < cfg.steps
    assert [r["step"] for r in step_rows(records)] == list(range(1, cfg.steps + 1))
    assert all(r["clients"] == 2 for r in step_rows(records) if r["step"] <= dropped_at)
    assert events(records, "aggregate")[-1]["clients"] == 2  # the restarted client is in the last round
    assert all(torch.isfinite(v).all() for v in adapter(tmp_path / "lb/server/adapter").values())


def test_serve_and_client_bad_input(tmp_path, capsys, monkeypatch):
    from splitlora import cli

    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {'a' * 20}\n")
    token = tmp_path / "alice.token"
    token.write_text("a" * 20 + "\n")
    cases = [
        (["serve", "--token-file", str(tmp_path / "none")], "token file not found"),
        (["serve", "--token-file", str(tokens), "--model", "tiny-gpt2", "--clients", "2"], "lists 1 clients"),
        (["serve", "--token-file", str(tokens), "--clients", "1", "--listen", "nowhere"], "HOST:PORT"),
        (["serve", "--token-file", str(tokens), "--clients", "1", "--tls-cert", str(tokens)], "PEM"),
        (["serve", "--token-file", str(tokens), "--clients", "1", "--min-clients", "2"], "--min-clients"),
        (["serve", "--token-file", str(tokens), "--clients", "1", "--algorithm", "cen"], "nothing to send"),
        (["serve", "--token-file", str(tokens), "--clients", "1", "--resume", "--out", str(tmp_path / "o")],
         "no checkpoint"),
        (["client", "--server", "127.0.0.1:1", "--token-file", str(token), "--client-id", "alice",
          "--data", str(tmp_path / "none.csv")], "data file not found"),
        (["client", "--server", "127.0.0.1", "--token-file", str(token), "--client-id", "alice",
          "--data", str(tokens)], "HOST:PORT"),
        (["client", "--server", "127.0.0.1:1", "--token-file", str(token), "--client-id", "bad name!",
          "--data", str(tokens)], "client name"),
        (["client", "--server", "127.0.0.1:1", "--token-file", str(tokens), "--client-id", "alice",
          "--data", str(tokens)], "the token alone"),
    ]
    for argv, needle in cases:
        monkeypatch.setattr(cli, "_EXTRA_COMMANDS", [])  # main() registers the subcommands on every call
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err and err[-1].startswith("error:") and needle in err[-1], (argv, err)
