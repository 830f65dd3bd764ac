"""The deployment protocol without a network: tensors as bytes, checks, framing, tokens, checkpoints."""

import pytest
import torch

from splitlora.errors import UserError
from splitlora.runtime.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from splitlora.transport import splitlora_pb2 as pb
from splitlora.transport.inprocess import InProcessLink
from splitlora.transport.messages import Activations, Gradients
from splitlora.transport.wire import (CutLimits, WireError, activations_from_proto, activations_to_proto,
                                      from_chunks, gradients_from_proto, gradients_to_proto, payload_bytes,
                                      state_from_proto, state_to_proto, tensor_from_proto, tensor_to_proto,
                                      to_chunks)

LIM = CutLimits(batch_size=4, max_length=16, hidden_size=8, vocab_size=100, wire_dtype="fp32")


def acts(b=2, t=5, h=8):
    torch.manual_seed(0)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 3:] = 0
    labels = torch.full((b, t), -100, dtype=torch.long)
    labels[:, 2:] = 7
    return Activations(0, 3, torch.randn(b, t, h), mask, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8, torch.int32])
def test_tensor_round_trip_is_exact(dtype):
    t = (torch.randn(3, 4, 5) * 50).to(dtype)
    p = tensor_to_proto(t)
    assert len(p.data) == t.numel() * t.element_size()
    back = tensor_from_proto(pb.Tensor.FromString(p.SerializeToString()), "t", dtype, shape=(3, 4, 5))
    assert back.dtype == dtype and torch.equal(back, t)


@pytest.mark.parametrize("wire", ["fp32", "bf16", "fp16"])
def test_activations_like_the_simulation(wire):
    """Same values and the same byte count as InProcessLink, for every wire dtype."""
    a = acts()
    lim = CutLimits(4, 16, 8, 100, wire)
    msg = activations_to_proto(a, session=1, wire_dtype=wire)
    got = activations_from_proto(pb.ActivationsUp.FromString(msg.SerializeToString()), 0, lim)
    link = InProcessLink(wire)
    sim = link.up(a)
    assert torch.equal(got.hidden, sim.hidden) and got.hidden.dtype == torch.float32
    assert torch.equal(got.attention_mask, a.attention_mask) and got.attention_mask.dtype == torch.long
    assert torch.equal(got.labels, a.labels) and got.labels.dtype == torch.long
    assert payload_bytes(msg.hidden, msg.attention_mask, msg.labels) == link.bytes_up
    g = Gradients(0, 3, torch.randn(2, 5, 8), 1.5, 6)
    down = gradients_to_proto(g, wire, aggregate=False)
    back = gradients_from_proto(down, 0, (2, 5, 8), wire)
    assert torch.equal(back.grad, link.down(g).grad) and payload_bytes(down.grad) == link.bytes_down


def test_bf16_halves_the_hidden_bytes():
    a = acts()
    fp32 = activations_to_proto(a, 1, "fp32")
    bf16 = activations_to_proto(a, 1, "bf16")
    assert len(bf16.hidden.data) * 2 == len(fp32.hidden.data)
    assert len(bf16.attention_mask.data) == a.attention_mask.numel()  # uint8
    assert len(bf16.labels.data) == a.labels.numel() * 4  # int32


def _bad(mutate, lim=LIM):
    msg = activations_to_proto(acts(), 1, "fp32")
    mutate(msg)
    with pytest.raises(WireError) as err:
        activations_from_proto(msg, 0, lim)
    return str(err.value)


def test_malformed_activations_are_refused():
    assert "dimension 2 must be 8" in _bad(lambda m: m.hidden.CopyFrom(tensor_to_proto(torch.zeros(2, 5, 9))))
    assert "dtype float16, expected float32" in _bad(
        lambda m: m.hidden.CopyFrom(tensor_to_proto(torch.zeros(2, 5, 8, dtype=torch.float16))))
    assert "truncated" in _bad(lambda m: setattr(m.hidden, "data", m.hidden.data[:-3]))
    assert "exceeds the limit 4" in _bad(lambda m: m.hidden.CopyFrom(tensor_to_proto(torch.zeros(5, 5, 8))))
    assert "exceeds the limit 16" in _bad(lambda m: m.hidden.CopyFrom(tensor_to_proto(torch.zeros(2, 17, 8))))
    assert "NaN" in _bad(lambda m: m.hidden.CopyFrom(tensor_to_proto(torch.full((2, 5, 8), float("nan")))))
    assert "expected 3" in _bad(lambda m: m.hidden.CopyFrom(tensor_to_proto(torch.zeros(10, 8))))
    assert "attention_mask" in _bad(lambda m: m.attention_mask.CopyFrom(
        tensor_to_proto(torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.uint8))))
    assert "attention_mask" in _bad(lambda m: m.attention_mask.CopyFrom(tensor_to_proto(torch.ones(2, 4, dtype=torch.uint8))))
    assert "labels" in _bad(lambda m: m.labels.CopyFrom(tensor_to_proto(torch.full((2, 5), 100, dtype=torch.int32))))
    assert "dtype" in _bad(lambda m: m.labels.CopyFrom(tensor_to_proto(torch.zeros(2, 5, dtype=torch.long).float())))
    assert "empty" in _bad(lambda m: m.hidden.CopyFrom(pb.Tensor(dtype=pb.FLOAT32, shape=[0, 5, 8])))
    assert "dtype" in _bad(lambda m: setattr(m.hidden, "dtype", 0))


def test_adapter_state_checked_against_the_expected_keys_and_shapes():
    state = {"a.lora_A.weight": torch.randn(2, 4), "a.lora_B.weight": torch.zeros(4, 2)}
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    items = state_to_proto(state)
    back = state_from_proto(items, shapes)
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(WireError, match="missing"):
        state_from_proto(items[:1], shapes)
    with pytest.raises(WireError, match="unexpected"):
        state_from_proto([*items, pb.NamedTensor(name="evil", tensor=tensor_to_proto(torch.zeros(1)))], shapes)
    with pytest.raises(WireError, match="twice"):
        state_from_proto([*items, items[0]], shapes)
    with pytest.raises(WireError, match="must be 4"):
        state_from_proto(state_to_proto({**state, "a.lora_A.weight": torch.randn(2, 5)}), shapes)
    with pytest.raises(WireError, match="NaN"):
        state_from_proto(state_to_proto({**state, "a.lora_B.weight": torch.full((4, 2), float("inf"))}), shapes)


def test_chunking_round_trip_and_refusals():
    msg = activations_to_proto(acts(4, 16, 8), 1, "fp32")
    chunks = list(to_chunks(msg, chunk_bytes=100))
    assert len(chunks) > 5 and all(len(c.data) <= 100 for c in chunks)
    assert chunks[0].total_bytes == msg.ByteSize() and all(c.total_bytes == 0 for c in chunks[1:])
    back, size = from_chunks(iter(chunks), pb.ActivationsUp, limit=1 << 20)
    assert back == msg and size == msg.ByteSize()
    with pytest.raises(WireError, match="exceeds the limit"):
        from_chunks(iter(chunks), pb.ActivationsUp, limit=msg.ByteSize() - 1)
    with pytest.raises(WireError, match="truncated"):
        from_chunks(iter(chunks[:-1]), pb.ActivationsUp, limit=1 << 20)
    with pytest.raises(WireError, match="second message"):
        from_chunks(iter([chunks[0], chunks[0]]), pb.ActivationsUp, limit=1 << 20)
    with pytest.raises(WireError, match="empty"):
        from_chunks(iter([]), pb.ActivationsUp, limit=1 << 20)
    with pytest.raises(WireError, match="not a valid"):
        from_chunks(iter([pb.Chunk(data=b"\xff" * 10, total_bytes=10)]), pb.ActivationsUp, limit=100)


def test_token_files(tmp_path):
    from splitlora.transport.grpc_client import read_client_token
    from splitlora.transport.grpc_server import read_token_file

    f = tmp_path / "tokens"
    f.write_text("# id token\n0 abc\n\n12 def\n")
    assert read_token_file(f) == {0: "abc", 12: "def"}
    for text, needle in [("0 abc\n0 def\n", "twice"), ("x abc\n", "integer"), ("0 a b\n", "CLIENT_ID TOKEN"),
                         ("0 abc\n1 abc\n", "share"), ("\n# nothing\n", "no clients")]:
        f.write_text(text)
        with pytest.raises(UserError, match=needle):
            read_token_file(f)
    with pytest.raises(UserError, match="not found"):
        read_token_file(tmp_path / "nope")
    f.write_text(" secret \n")
    assert read_client_token(f) == "secret"
    f.write_text("a b\n")
    with pytest.raises(UserError, match="alone"):
        read_client_token(f)


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
    assert {m.name for m in fd.service[0].method} == {"Hello", "Step", "Aggregate", "Leave"}


def test_messages_beyond_grpcs_frame_limit_travel_in_chunks():
    """A 9 MiB message crosses a real gRPC channel whose frames are capped near 1 MiB."""
    from concurrent import futures

    import grpc

    from splitlora.transport.grpc_server import grpc_options
    from splitlora.transport.wire import GRPC_FRAME_LIMIT

    def echo(chunks, context):
        msg, _ = from_chunks(chunks, pb.AdapterUp, limit=64 << 20)
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
            big = pb.AdapterUp(session=1, state=state_to_proto({"w": torch.randn(3, 768, 1024)}))
            assert big.ByteSize() > 8 * GRPC_FRAME_LIMIT
            back, size = from_chunks(call(to_chunks(big), timeout=60), pb.AdapterUp, limit=64 << 20)
            assert back == big and size == big.ByteSize()
            with pytest.raises(grpc.RpcError) as err:  # one unchunked frame of that size is refused by gRPC
                list(call(iter([pb.Chunk(data=big.SerializeToString(), total_bytes=big.ByteSize())]), timeout=60))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop(0)
