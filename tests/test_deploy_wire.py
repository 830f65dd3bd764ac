"""The deployment protocol without a network: tensors as bytes, checks, framing, tokens, checkpoints."""

import pytest
import torch

from splitlora.errors import UserError
from splitlora.messages import (WIRE_DTYPES, Activations, AdapterUpdate, Backward, Forward, HandOut, Load, Tail,
                                TailGrad, Upload, payload_nbytes, wire_precision)
from splitlora.runtime.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from splitlora.transport import splitlora_pb2 as pb
from splitlora.transport.wire import (WAIT, ClientView, Expect, Limits, WireError, command_from_proto,
                                      command_to_proto, from_chunks, message_payload_bytes, reply_from_proto,
                                      reply_to_proto, state_from_proto, state_to_proto, tensor_from_proto,
                                      tensor_to_proto, to_chunks)

LIM = Limits(batch_size=4, max_length=16, hidden_size=8, vocab_size=100, wire_dtype="fp32", max_abs=1e4,
             u_shape=False)
SHAPES = {"a.lora_A.weight": (2, 8), "a.lora_B.weight": (8, 2)}


def acts(b=2, t=5, h=8, labels=True):
    torch.manual_seed(0)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 3:] = 0
    lab = torch.full((b, t), -100, dtype=torch.long)
    lab[:, 2:] = 7
    return Activations(3, torch.randn(b, t, h), mask, lab if labels else None)


def expect(command, lim=LIM):
    return Expect(command, lim, steps=10, shapes=SHAPES, num_samples=5)


def round_trip_reply(reply, command, lim=LIM, wire="fp32"):
    msg = reply_to_proto(reply, session=1, reply_to=1, wire_dtype=wire)
    return reply_from_proto(pb.ClientMessage.FromString(msg.SerializeToString()), expect(command, lim)), msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int32])
def test_tensor_round_trip_is_exact(dtype):
    t = (torch.randn(3, 4, 5) * 50).to(dtype)
    p = tensor_to_proto(t)
    assert len(p.data) == t.numel() * t.element_size()
    back = tensor_from_proto(pb.Tensor.FromString(p.SerializeToString()), "t", dtype, shape=(3, 4, 5))
    assert back.dtype == dtype and torch.equal(back, t)


@pytest.mark.parametrize("wire", ["fp32", "bf16", "fp16"])
def test_messages_like_the_simulation(wire):
    """What the receiver gets equals the simulation's wire-precision copy, and the tensor bytes on the
    wire equal the simulation's count, for every wire dtype."""
    from dataclasses import replace

    lim = replace(LIM, wire_dtype=wire)
    dtype = WIRE_DTYPES[wire]
    a = acts()
    got, msg = round_trip_reply(a, Forward(3), lim, wire)
    sim = wire_precision(a, dtype)
    assert torch.equal(got.hidden, sim.hidden) and got.hidden.dtype == torch.float32
    assert torch.equal(got.attention_mask, a.attention_mask) and got.attention_mask.dtype == torch.long
    assert torch.equal(got.labels, a.labels) and got.labels.dtype == torch.long
    assert message_payload_bytes(msg) == payload_nbytes(a, dtype)
    g = Backward(3, torch.randn(2, 5, 8), 1.5, 6)
    proto = command_to_proto(g, 0, wire)
    back = command_from_proto(pb.Command.FromString(proto.SerializeToString()),
                              ClientView(SHAPES, lim, 10, open_shape=(2, 5, 8)))
    assert torch.equal(back.grad, wire_precision(g, dtype).grad) and back.loss == 1.5 and back.tokens == 6
    assert message_payload_bytes(proto) == payload_nbytes(g, dtype)


def test_bf16_halves_the_hidden_bytes():
    a = acts()
    fp32 = reply_to_proto(a, 1, 1, "fp32").activations
    bf16 = reply_to_proto(a, 1, 1, "bf16").activations
    assert len(bf16.hidden.data) * 2 == len(fp32.hidden.data)
    assert len(bf16.attention_mask.data) == a.attention_mask.numel()  # uint8
    assert len(bf16.labels.data) == a.labels.numel() * 4  # int32


def _bad(mutate, lim=LIM, command=None):
    msg = reply_to_proto(acts(labels=not lim.u_shape), 1, 1, "fp32")
    mutate(msg.activations)
    with pytest.raises(WireError) as err:
        reply_from_proto(msg, expect(command or Forward(3), lim))
    return str(err.value)


def test_malformed_activations_are_refused():
    from dataclasses import replace

    assert "dimension 2 must be 8" in _bad(lambda m: m.hidden.CopyFrom(tensor_to_proto(torch.zeros(2, 5, 9))))
    assert "dtype float16, expected float32" in _bad(
        lambda m: m.hidden.CopyFrom(tensor_to_proto(torch.zeros(2, 5, 8, dtype=torch.float16))))
    assert "truncated" in _bad(lambda m: setattr(m.hidden, "data", m.hidden.data[:-3]))
    assert "exceeds the limit 4" in _bad(lambda m: m.hidden.CopyFrom(tensor_to_proto(torch.zeros(5, 5, 8))))
    assert "exceeds the limit 16" in _bad(lambda m: m.hidden.CopyFrom(tensor_to_proto(torch.zeros(2, 17, 8))))
    assert "NaN" in _bad(lambda m: m.hidden.CopyFrom(tensor_to_proto(torch.full((2, 5, 8), float("nan")))))
    assert "exceeds the bound" in _bad(lambda m: m.hidden.CopyFrom(tensor_to_proto(torch.full((2, 5, 8), 3.4e38))))
    assert "expected 3" in _bad(lambda m: m.hidden.CopyFrom(tensor_to_proto(torch.zeros(10, 8))))
    assert "attention_mask" in _bad(lambda m: m.attention_mask.CopyFrom(
        tensor_to_proto(torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.uint8))))
    assert "attention_mask" in _bad(lambda m: m.attention_mask.CopyFrom(tensor_to_proto(torch.ones(2, 4, dtype=torch.uint8))))
    assert "labels" in _bad(lambda m: m.labels.CopyFrom(tensor_to_proto(torch.full((2, 5), 100, dtype=torch.int32))))
    assert "no loss token" in _bad(lambda m: m.labels.CopyFrom(tensor_to_proto(torch.full((2, 5), -100, dtype=torch.int32))))
    assert "dtype" in _bad(lambda m: m.labels.CopyFrom(tensor_to_proto(torch.zeros(2, 5, dtype=torch.long).float())))
    assert "empty" in _bad(lambda m: m.hidden.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[0, 5, 8])))
    assert "dtype" in _bad(lambda m: setattr(m.hidden, "dtype", 0))
    assert "missing" in _bad(lambda m: m.ClearField("labels"))
    assert "for step 4" in _bad(lambda m: None, command=Forward(4))
    # The U-shape keeps labels home: a client that sends them is refused.
    assert "keeps labels" in _bad(lambda m: m.labels.CopyFrom(tensor_to_proto(torch.zeros(2, 5, dtype=torch.int32))),
                                  lim=replace(LIM, u_shape=True))


def test_replies_must_answer_the_command_they_claim_to():
    a = reply_to_proto(acts(), 1, 1, "fp32")
    with pytest.raises(WireError, match="must be adapter"):
        reply_from_proto(a, expect(Upload(0)))
    tail = Tail(3, torch.zeros(2, 5, 8))
    good = reply_to_proto(TailGrad(3, torch.zeros(2, 5, 8), 1.0, 6), 1, 1, "fp32")
    assert reply_from_proto(good, expect(tail)).tokens == 6
    for bad, needle in [(TailGrad(3, torch.zeros(2, 4, 8), 1.0, 6), "dimension 1 must be 5"),
                        (TailGrad(3, torch.zeros(2, 5, 8), float("nan"), 6), "loss"),
                        (TailGrad(3, torch.zeros(2, 5, 8), 1.0, 10 ** 6), "tokens")]:
        with pytest.raises(WireError, match=needle):
            reply_from_proto(reply_to_proto(bad, 1, 1, "fp32"), expect(tail))
    up = AdapterUpdate(0, {k: torch.zeros(s) for k, s in SHAPES.items()}, 5)
    assert reply_from_proto(reply_to_proto(up, 1, 1, "fp32"), expect(Upload(0))).num_samples == 5
    with pytest.raises(WireError, match="announced in Hello"):
        reply_from_proto(reply_to_proto(AdapterUpdate(0, up.state, 2 ** 40), 1, 1, "fp32"), expect(Upload(0)))
    with pytest.raises(WireError, match="exceeds the bound"):
        reply_from_proto(reply_to_proto(AdapterUpdate(0, {k: torch.full(s, 1e30) for k, s in SHAPES.items()}, 5),
                                        1, 1, "fp32"), expect(Upload(0)))
    with pytest.raises(WireError, match="must be handover"):
        reply_from_proto(reply_to_proto(up, 1, 1, "fp32"), expect(HandOut(3)))


def test_commands_checked_by_the_client():
    view = ClientView(SHAPES, LIM, 10, open_shape=(2, 5, 8))
    wait = pb.Command(wait=pb.WaitMsg())
    assert command_from_proto(wait, view) is WAIT
    bad_grad = command_to_proto(Backward(3, torch.full((2, 5, 8), float("inf")), 1.0, 2), 0, "fp32")
    with pytest.raises(WireError, match="NaN or infinite"):
        command_from_proto(bad_grad, view)
    wrong_shape = command_to_proto(Backward(3, torch.zeros(2, 6, 8), 1.0, 2), 0, "fp32")
    with pytest.raises(WireError, match="dimension 1 must be 5"):
        command_from_proto(wrong_shape, view)
    with pytest.raises(WireError, match="has not sent"):
        command_from_proto(command_to_proto(Backward(3, torch.zeros(2, 5, 8)), 0, "fp32"),
                           ClientView(SHAPES, LIM, 10))
    evil = command_to_proto(Load(1, {"evil": torch.zeros(1)}), 0, "fp32")
    with pytest.raises(WireError, match="unexpected tensor"):
        command_from_proto(evil, view)
    with pytest.raises(WireError, match="outside"):
        command_from_proto(command_to_proto(Forward(11), 1, "fp32"), view)


def test_adapter_state_checked_against_the_expected_keys_and_shapes():
    state = {"a.lora_A.weight": torch.randn(2, 4), "a.lora_B.weight": torch.zeros(4, 2)}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    items = list(state_to_proto(state).tensors)
    back = state_from_proto(pb.State(tensors=items), shapes)
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(WireError, match="missing"):
        state_from_proto(pb.State(tensors=items[:1]), shapes)
    with pytest.raises(WireError, match="unexpected"):
        state_from_proto(pb.State(tensors=[*items, pb.NamedTensor(name="evil", tensor=tensor_to_proto(torch.zeros(1)))]),
                         shapes)
    with pytest.raises(WireError, match="twice"):
        state_from_proto(pb.State(tensors=[*items, items[0]]), shapes)
    with pytest.raises(WireError, match="must be 4"):
        state_from_proto(state_to_proto({**state, "a.lora_A.weight": torch.randn(2, 5)}), shapes)
    with pytest.raises(WireError, match="NaN"):
        state_from_proto(state_to_proto({**state, "a.lora_B.weight": torch.full((4, 2), float("inf"))}), shapes)


def test_chunking_round_trip_and_refusals():
    msg = reply_to_proto(acts(4, 16, 8), 1, 1, "fp32")
    chunks = list(to_chunks(msg, chunk_bytes=100))
    assert len(chunks) > 5 and all(len(c.data) <= 100 for c in chunks)
    assert chunks[0].total_bytes == msg.ByteSize() and all(c.total_bytes == 0 for c in chunks[1:])
    back, size = from_chunks(iter(chunks), pb.ClientMessage, limit=1 << 20)
    assert back == msg and size == msg.ByteSize()
    with pytest.raises(WireError, match="exceeds the limit"):
        from_chunks(iter(chunks), pb.ClientMessage, limit=msg.ByteSize() - 1)
    with pytest.raises(WireError, match="truncated"):
        from_chunks(iter(chunks[:-1]), pb.ClientMessage, limit=1 << 20)
    with pytest.raises(WireError, match="second message"):
        from_chunks(iter([chunks[0], chunks[0]]), pb.ClientMessage, limit=1 << 20)
    with pytest.raises(WireError, match="empty"):
        from_chunks(iter([]), pb.ClientMessage, limit=1 << 20)
    with pytest.raises(WireError, match="not a valid"):
        from_chunks(iter([pb.Chunk(data=b"\xff" * 10, total_bytes=10)]), pb.ClientMessage, limit=100)


def test_token_files(tmp_path):
    from splitlora.transport.auth import read_client_token, read_token_file

    f = tmp_path / "tokens"
    t1, t2 = "a" * 16, "b" * 20
    f.write_text(f"# name token\nalice {t1}\n\n12 {t2}\nsite-1.x_y {'c' * 16}\n")
    assert list(read_token_file(f)) == ["alice", "12", "site-1.x_y"]  # file order = each client's index
    assert read_token_file(f)["12"] == t2
    f.write_text(f"\ufeffalice {t1}\n")  # a BOM is not part of the first name
    assert list(read_token_file(f)) == ["alice"]
    for text, needle in [(f"a {t1}\na {t2}\n", "twice"), (f"al/ice {t1}\n", "client name"),
                         (f"{'x' * 65} {t1}\n", "client name"), (f"a {t1} x\n", "NAME TOKEN"),
                         (f"a {t1}\nb {t1}\n", "share"), ("\n# nothing\n", "no clients"), ("a b\n", "16 to 512"),
                         ("a \u00e9" + "x" * 20 + "\n", "printable ASCII")]:
        f.write_text(text, encoding="utf-8")
        with pytest.raises(UserError, match=needle):
            read_token_file(f)
    with pytest.raises(UserError, match="not found"):
        read_token_file(tmp_path / "nope")
    f.write_text(f" {t1} \n")
    assert read_client_token(f) == t1
    f.write_text(f"\ufeff{t1}\n")
    assert read_client_token(f) == t1
    f.write_text("a b\n")
    with pytest.raises(UserError, match="alone"):
        read_client_token(f)
    f.write_bytes(b"\xff\xfe" + b"x" * 20)
    with pytest.raises(UserError, match="not UTF-8"):
        read_client_token(f)


def test_log_text_from_clients_is_escaped():
    from splitlora.transport.auth import safe_text

    forged = "bye\nWARNING splitlora.transport.server: client bob dropped\r\x1b[2J"
    line = safe_text(forged)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert line.startswith("bye\\n") and len(safe_text("x" * 1000)) == 200


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    state = {"step": 4, "lora": {"x": torch.arange(3.0)}, "nested": [[1, 2]], "rng": torch.get_rng_state()}
    save_checkpoint(tmp_path, state)
    back = load_checkpoint(tmp_path)
    assert back["step"] == 4 and torch.equal(back["lora"]["x"], torch.arange(3.0))

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)  # a write that dies half-way leaves the old file
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, {**state, "step": 6})
    assert load_checkpoint(tmp_path)["step"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    checkpoint_path(tmp_path).write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot be read"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "none") is None


def test_generated_code_matches_the_proto():
    """The committed modules come from the committed .proto (regenerate with scripts/gen_proto.sh)."""
    from pathlib import Path

    from google.protobuf import descriptor_pb2

    proto = Path(pb.__file__).with_name("splitlora.proto").read_text()
    fd = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    for message in fd.message_type:
        assert f"message {message.name} {{" in proto
        for f in message.field:
            assert f" {f.name} = {f.number};" in proto, (message.name, f.name)
    assert {m.name for m in fd.service[0].method} == {"Hello", "Exchange", "Leave"}


def test_messages_beyond_grpcs_frame_limit_travel_in_chunks():
    """A 9 MiB message crosses a real gRPC channel whose frames are capped near 1 MiB."""
    from concurrent import futures

    import grpc

    from splitlora.transport.service import grpc_options
    from splitlora.transport.wire import GRPC_FRAME_LIMIT

    def echo(chunks, context):
        msg, _ = from_chunks(chunks, pb.AdapterMsg, limit=64 << 20)
        yield from to_chunks(msg)

    handler = grpc.method_handlers_generic_handler("test.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(
        echo, request_deserializer=pb.Chunk.FromString, response_serializer=pb.Chunk.SerializeToString)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=grpc_options())
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=grpc_options()) as channel:
            call = channel.stream_stream("/test.Echo/Echo", request_serializer=pb.Chunk.SerializeToString,
                                         response_deserializer=pb.Chunk.FromString)
            big = pb.AdapterMsg(num_samples=1, state=state_to_proto({"w": torch.randn(3, 768, 1024)}))
            assert big.ByteSize() > 8 * GRPC_FRAME_LIMIT
            back, size = from_chunks(call(to_chunks(big), timeout=60), pb.AdapterMsg, limit=64 << 20)
            assert back == big and size == big.ByteSize()
            with pytest.raises(grpc.RpcError) as err:  # one unchunked frame of that size is refused by gRPC
                list(call(iter([pb.Chunk(data=big.SerializeToString(), total_bytes=big.ByteSize())]), timeout=60))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop(0)
