"""Messages declared once (splitlora.messages): the one encoder and decoder of transport/wire.py carry
every declared message with no code of its own, write the bytes protocol 2 always wrote, and hold every
declared number and tensor to a bound that a value outside it does not pass."""

import dataclasses
import hashlib
import math
from dataclasses import replace

import pytest
import torch

from splitlora.messages import (ASKED, BATCH_TOKENS, COMMANDS, HELLO, LOSS_TOKENS, REPLIES, REPLY_OF, SECAGG_MAX_BYTES,
                                STEPS, Activations, AdapterUpdate, Backward, Choice, Count, FirstMoments, Finish, Flag,
                                Forward, HandIn, HandOut, Handover, Hidden, Labels, Load, LocalStep, Mask, Nested, Real,
                                SecAgg, SecAggData, SecAggReply, SecondMoments, State, StepDone, Sync, Tail, TailGrad,
                                Text, Upload, command, kinds, payload_nbytes, wire, wire_precision)
from splitlora.runtime.client import ClientApp, handlers
from splitlora.transport import splitlora_pb2 as pb
from splitlora.transport.wire import (PROTOCOL_VERSION, ClientView, Expect, Limits, WireError, command_from_proto,
                                      command_to_proto, decode_message, encode_message, message_payload_bytes,
                                      reply_from_proto, reply_to_proto, state_from_proto, state_to_proto,
                                      tensor_to_proto)

TWO_PART = Limits(batch_size=4, max_length=16, hidden_size=8, vocab_size=100, wire_dtype="fp32", max_abs=1e4,
                  u_shape=False)
U_SHAPE = replace(TWO_PART, u_shape=True)
SHAPES = {"a.lora_A.weight": (2, 8), "a.lora_B.weight": (8, 2)}
BATCH = (2, 5, 8)  # (B, T, H) of the open batch
RUN_STEPS, HELLO_SAMPLES = 10, 5


# ---- a valid message of any declared type, from its declaration alone ------------------------------

def _randn(*shape, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * scale


def _state(scale=0.1, square=False):
    return {k: _randn(*s, scale=scale).square() + 1 if square else _randn(*s, scale=scale) for k, s in SHAPES.items()}


def _mask(b, t):
    mask = torch.ones(b, t, dtype=torch.long)
    mask[-1, t - 2:] = 0
    return mask


def _labels(b, t):
    labels = torch.full((b, t), -100, dtype=torch.long)
    labels[:, 2:] = 7
    return labels


def _data(kind, stage):
    if kind.answer and stage == "keys":
        return bytes(range(64))
    if kind.answer and stage == "mask":
        return bytes(8 * (sum(math.prod(s) for s in SHAPES.values()) + 1))
    return b"stage input"


EXAMPLES = {  # kind -> (kind, field name, receiver, the fields so far) -> a value within the kind's bounds
    Count: lambda k, n, at, got: at.said(k.equals, n) if k.equals else getattr(at, k.most),  # at the bound
    Real: lambda k, n, at, got: 0.5,
    Flag: lambda k, n, at, got: True,
    Text: lambda k, n, at, got: "why",
    Choice: lambda k, n, at, got: at.said(k.equals, n) if k.equals else k.options[0],
    Hidden: lambda k, n, at, got: _randn(*(at.batch_shape if k.same_batch else BATCH)),
    Mask: lambda k, n, at, got: _mask(*got[k.like].shape[:2]),
    Labels: lambda k, n, at, got: None if at.lim.u_shape else _labels(*got[k.like].shape[:2]),
    State: lambda k, n, at, got: _state(),
    FirstMoments: lambda k, n, at, got: _state(1e-3),
    SecondMoments: lambda k, n, at, got: _state(1.0, square=True),
    Nested: lambda k, n, at, got: example(k.cls, at),
    SecAggData: lambda k, n, at, got: _data(k, got["stage"]),
}


def example(cls, at):
    """A ``cls`` its receiver ``at`` accepts, built from the declaration (fields read only where a limit
    holds get their default)."""
    got = {}
    for f in dataclasses.fields(cls):
        kind = f.metadata["wire"]
        skipped = getattr(kind, "when", None) and not getattr(at.lim, kind.when)
        got[f.name] = f.default if skipped else EXAMPLES[type(kind)](kind, f.name, at, got)
    return cls(**got)


def view(lim):
    return ClientView(SHAPES, lim, RUN_STEPS, open_shape=BATCH)


def expect(reply_type, lim):
    asked = next(c for c, r in REPLY_OF.items() if r is reply_type)
    return Expect(example(asked, view(lim)), lim, RUN_STEPS, SHAPES, HELLO_SAMPLES)


def same(a, b) -> bool:
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return type(a) is type(b) and a == b


# ---- every declared message, no code of its own ----------------------------------------------------------

@pytest.mark.parametrize("lim", [TWO_PART, U_SHAPE], ids=["two-part", "u-shape"])
@pytest.mark.parametrize("cls", [*COMMANDS.values(), *REPLIES.values()], ids=lambda c: c.__name__)
def test_every_declared_message_round_trips(cls, lim):
    if cls in COMMANDS.values():
        at = view(lim)
        sent = example(cls, at)
        msg = command_to_proto(sent, 7, "fp32")
        got = command_from_proto(pb.Command.FromString(msg.SerializeToString()), at)
    else:
        at = expect(cls, lim)
        sent = example(cls, at)
        msg = reply_to_proto(sent, 1, 7, "fp32")
        got = reply_from_proto(pb.ClientMessage.FromString(msg.SerializeToString()), at)
    assert same(got, sent), (got, sent)
    assert message_payload_bytes(msg) == payload_nbytes(sent, torch.float32)


def _proto_fields(descriptor) -> set[str]:
    return {f.name for f in descriptor.fields}


def _matches_proto(cls, descriptor) -> None:
    flags = {k.flag for k in kinds(cls).values() if getattr(k, "flag", None)}
    assert _proto_fields(descriptor) == set(kinds(cls)) | flags, cls.__name__
    for name, kind in kinds(cls).items():
        if isinstance(kind, Nested):
            _matches_proto(kind.cls, descriptor.fields_by_name[name].message_type)


def test_declarations_match_the_proto_and_every_command_has_a_handler():
    for envelope, oneof, declared in [(pb.Command, "kind", COMMANDS), (pb.ClientMessage, "payload", REPLIES)]:
        carried = {f.name: f.message_type for f in envelope.DESCRIPTOR.oneofs_by_name[oneof].fields}
        assert set(carried) - {"wait"} == set(declared)  # Wait is the transport's own: nothing to carry out
        for name, cls in declared.items():
            _matches_proto(cls, carried[name])
    assert set(handlers(ClientApp)) == set(COMMANDS.values())
    assert set(REPLY_OF) <= set(COMMANDS.values()) and set(REPLY_OF.values()) == set(REPLIES.values())


def test_a_declaration_is_complete_and_its_name_unique():
    class Bare:
        n: int

    with pytest.raises(TypeError, match="say nothing of how they travel"):
        command("bare")(Bare)
    with pytest.raises(ValueError, match="already names Forward"):
        command("forward")(type("Again", (), {}))
    assert "bare" not in COMMANDS


# ---- bounds --------------------------------------------------------------------------------------------------

def _all_fields(cls, prefix=""):
    """(path, kind) of every declared field, nested messages' fields included."""
    for name, kind in kinds(cls).items():
        if isinstance(kind, Nested):
            yield from _all_fields(kind.cls, f"{prefix}{name}.")
        else:
            yield prefix + name, kind


ALL_FIELDS = [(cls, path, kind) for cls in [*COMMANDS.values(), *REPLIES.values()] for path, kind in _all_fields(cls)]


def test_every_number_and_tensor_is_bounded():
    """Each declared field says what bounds it; a kind this test does not know needs its bound added here."""
    for cls, path, kind in ALL_FIELDS:
        what = f"{cls.__name__}.{path}"
        if isinstance(kind, Count):
            assert (kind.most in (STEPS, BATCH_TOKENS, LOSS_TOKENS)) != (kind.equals in (ASKED, HELLO)), what
        elif isinstance(kind, Real):
            assert math.isfinite(kind.low), what
        elif isinstance(kind, Text):
            assert 0 < kind.most <= 1000, what
        elif isinstance(kind, Choice):
            assert kind.options, what
        else:  # bounded by the receiver's Limits, LoRA shapes, AdamW or the stage; only a bool has none
            assert isinstance(kind, (Hidden, Mask, Labels, State, SecAggData, Flag)), f"{what}: unknown {kind}"


def _setting(value):
    return lambda p, name: setattr(p, name, value)


def _copying(make):
    return lambda p, name: getattr(p, name).CopyFrom(make(getattr(p, name)))


def _with_state(p, change):
    state = state_from_proto(p, SHAPES, "s")
    change(state)
    return state_to_proto(state)


def _outside(kind, at, lim):
    """(what, mutation of the protobuf field) for values outside ``kind``'s bounds."""
    b, t, h = BATCH
    if isinstance(kind, Count):
        if kind.equals:
            return [("another value", lambda p, name: setattr(p, name, getattr(p, name) + 1))]
        return [("above the bound", _setting(getattr(at, kind.most) + 1)), ("negative", _setting(-1))]
    if isinstance(kind, Real):
        if kind.when and not getattr(lim, kind.when):
            return []  # not read here
        return [("NaN", _setting(float("nan"))), ("infinite", _setting(float("inf"))), ("low", _setting(kind.low - 1))]
    if isinstance(kind, Choice):
        other = next(o for o in kind.options if o != kind.options[0] and o != "mask")
        return [("unknown", _setting("nope"))] + ([("another", _setting(other))] if kind.equals else [])
    if isinstance(kind, Hidden):
        cases = [("NaN", _copying(lambda p: tensor_to_proto(torch.full(BATCH, float("nan"))))),
                 ("above max_abs", _copying(lambda p: tensor_to_proto(torch.full(BATCH, 10 * lim.max_abs)))),
                 ("hidden size", _copying(lambda p: tensor_to_proto(torch.zeros(b, t, h + 1)))),
                 ("dtype", _copying(lambda p: tensor_to_proto(torch.zeros(BATCH, dtype=torch.float16)))),
                 ("batch", _copying(lambda p: tensor_to_proto(torch.zeros(lim.batch_size + 1, t, h)))),
                 ("length", _copying(lambda p: tensor_to_proto(torch.zeros(b, lim.max_length + 1, h))))]
        if kind.same_batch:
            cases.append(("not the batch", _copying(lambda p: tensor_to_proto(torch.zeros(b, t - 1, h)))))
        return cases
    if isinstance(kind, Mask):
        left = _mask(b, t).flip(1)
        return [("value 2", _copying(lambda p: tensor_to_proto(torch.full((b, t), 2, dtype=torch.uint8)))),
                ("left-padded", _copying(lambda p: tensor_to_proto(left, torch.uint8))),
                ("shape", _copying(lambda p: tensor_to_proto(torch.ones(b, t + 1, dtype=torch.uint8))))]
    if isinstance(kind, Labels):
        if lim.u_shape:
            return [("sent in the U-shape", _copying(lambda p: tensor_to_proto(_labels(b, t), torch.int32)))]
        return [("token id", _copying(lambda p: tensor_to_proto(torch.full((b, t), lim.vocab_size), torch.int32))),
                ("no loss token", _copying(lambda p: tensor_to_proto(torch.full((b, t), -100), torch.int32))),
                ("missing", lambda p, name: p.ClearField(name))]
    if isinstance(kind, State):
        key = next(iter(SHAPES))
        cases = [("NaN", _copying(lambda p: _with_state(p, lambda s: s[key].fill_(float("nan"))))),
                 ("extra key", _copying(lambda p: _with_state(p, lambda s: s.update(evil=torch.zeros(1))))),
                 ("missing key", _copying(lambda p: _with_state(p, lambda s: s.pop(key)))),
                 ("shape", _copying(lambda p: _with_state(p, lambda s: s.update({key: torch.zeros(3, 8)}))))]
        if isinstance(kind, SecondMoments):
            return cases + [("negative", _copying(lambda p: _with_state(p, lambda s: s[key].fill_(-1.0))))]
        cases.append(("above max_abs", _copying(lambda p: _with_state(p, lambda s: s[key].fill_(10 * lim.max_abs)))))
        if isinstance(kind, FirstMoments):  # within max_abs, but not AdamW's for these second moments
            cases.append(("not AdamW's", _copying(lambda p: _with_state(p, lambda s: s[key].fill_(lim.max_abs)))))
        return cases
    if isinstance(kind, SecAggData):
        cases = [("too large", _setting(bytes(SECAGG_MAX_BYTES + 1)))]
        return cases + [("size of its stage", _setting(bytes(63)))] if kind.answer else cases
    return []  # Flag: a bool; Text: cut, not refused (below)


def _cases():
    for cls, path, kind in ALL_FIELDS:
        for lim, lim_id in [(TWO_PART, "two-part"), (U_SHAPE, "u-shape")]:
            at = view(lim) if cls in COMMANDS.values() else expect(cls, lim)
            for what, mutate in _outside(kind, at, lim):
                yield pytest.param(cls, path, lim, mutate, id=f"{cls.__name__}.{path}-{what}-{lim_id}")


@pytest.mark.parametrize("cls,path,lim,mutate", list(_cases()))
def test_a_value_outside_its_bound_is_refused(cls, path, lim, mutate):
    if cls in COMMANDS.values():
        at = view(lim)
        msg = command_to_proto(example(cls, at), 7, "fp32")
        decode = command_from_proto
    else:
        at = expect(cls, lim)
        msg = reply_to_proto(example(cls, at), 1, 7, "fp32")
        decode = reply_from_proto
    p = getattr(msg, cls.wire_name)
    *outer, name = path.split(".")
    for part in outer:
        p = getattr(p, part)
    mutate(p, name)
    with pytest.raises(WireError) as err:
        decode(msg, at)
    assert name in str(err.value) or "secure aggregation" in str(err.value), str(err.value)


def test_text_is_cut_to_its_bound():
    msg = command_to_proto(Finish(True, "x" * 10_000), 0, "fp32")
    assert command_from_proto(msg, view(TWO_PART)).reason == "x" * 500


# ---- the point: a new message is its declaration (and its protobuf message) -------------------------------

def _probe_proto():
    """A protobuf message no splitlora code knows, as a new .proto would define it."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    pool = descriptor_pool.Default()
    try:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName("probe.ProbeMsg"))
    except KeyError:
        pass
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="tests/probe.proto", package="probe", syntax="proto3",
                                             dependency=[pb.DESCRIPTOR.name])
    m = fdp.message_type.add(name="ProbeMsg")
    for number, (name, type_, type_name) in enumerate(
            [("step", F.TYPE_INT64, ""), ("hidden", F.TYPE_MESSAGE, ".splitlora.v2.Tensor"),
             ("temperature", F.TYPE_DOUBLE, ""), ("state", F.TYPE_MESSAGE, ".splitlora.v2.State"),
             ("note", F.TYPE_STRING, "")], 1):
        field = m.field.add(name=name, number=number, type=type_, label=F.LABEL_OPTIONAL)
        if type_name:
            field.type_name = type_name
    pool.AddSerializedFile(fdp.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("probe.ProbeMsg"))


@dataclasses.dataclass
class Probe:
    """Declared here and nowhere else: a step, a hidden state of the open batch, a number, an adapter."""

    step: int = wire(Count(STEPS))
    hidden: torch.Tensor = wire(Hidden(same_batch=True))
    temperature: float = wire(Real(low=0.0))
    state: dict | None = wire(State(optional=True), None)
    note: str = wire(Text(8), "")


def test_a_new_message_needs_only_its_declaration():
    ProbeMsg = _probe_proto()
    at = view(replace(TWO_PART, wire_dtype="bf16"))
    sent = Probe(4, _randn(*BATCH), 0.7, _state(), "a long note")
    p = ProbeMsg()
    encode_message(sent, p, "bf16")
    got = decode_message(Probe, ProbeMsg.FromString(p.SerializeToString()), at)
    assert same(got, replace(wire_precision(sent, torch.bfloat16), note="a long n"))
    assert message_payload_bytes(p) == payload_nbytes(sent, torch.bfloat16)
    for field, value, needle in [("step", RUN_STEPS + 1, "outside"), ("temperature", float("nan"), "finite"),
                                 ("hidden", tensor_to_proto(torch.zeros(2, 6, 8), torch.bfloat16), "must be 5")]:
        bad = ProbeMsg.FromString(p.SerializeToString())
        if isinstance(value, (int, float)):
            setattr(bad, field, value)
        else:
            getattr(bad, field).CopyFrom(value)
        with pytest.raises(WireError, match=needle):
            decode_message(Probe, bad, at)
    p.ClearField("state")
    assert decode_message(Probe, p, at).state is None


# ---- protocol 2's bytes ---------------------------------------------------------------------------------------

def _t(*shape):
    return (torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape) * 0.37 - 1.5).to(torch.float32)


def _golden_state():
    return {"a.lora_A.weight": _t(2, 8), "a.lora_B.weight": _t(8, 2) * 0.1}


def _golden_handover():
    s = _golden_state()
    return Handover(s, {k: v * 0.01 for k, v in s.items()}, {k: v.square() for k, v in s.items()}, 7)


def _golden_messages():
    mask, labels = _mask(2, 5), _labels(2, 5)
    commands = [Sync(3, 4, 1), Sync(3, 4, 1, _golden_state()), Sync(3, 4, 1, None, _golden_handover()), Forward(2),
                Backward(3, _t(2, 5, 8)), Backward(3, _t(2, 5, 8), 1.25, 6), Backward(3, _t(2, 5, 8), 1.25, 6, 0.5),
                Backward(3, _t(2, 5, 8), 0.0, 0), Tail(3, _t(2, 5, 8)), LocalStep(5), Upload(2), Load(2, None),
                Load(2, _golden_state(), 4), HandOut(6), HandIn(6, _golden_handover()), Finish(), Finish(True, "bye"),
                SecAgg(1, "keys", b"\x01\x02"), SecAgg(0, "share")]
    replies = [None, Activations(3, _t(2, 5, 8), mask, labels), Activations(3, _t(2, 5, 8), mask),
               TailGrad(3, _t(2, 5, 8), 0.5, 6), StepDone(4, 1.5, 9), AdapterUpdate(1, _golden_state(), 5),
               _golden_handover(), SecAggReply(1, "mask", b"x" * 16)]
    return commands, replies


# sha256 (first 12 hex digits) of each message above in fp32 then bf16, as the per-message encoders of
# protocol 2 wrote them (before the messages were declared once)
PROTOCOL_2 = ["59a52f733869", "f59b165ec258", "e637d237ee78", "8fd5c4248bc0", "560116479748", "fa86fdd59b6a",
              "144af4c46655", "83317272a84d", "fa65dc64d9ca", "d40120af3279", "69f3c391e518", "126ff8646ab6",
              "ccbe49b39c27", "37598952050a", "aa6e11b28ffd", "f2678afc450b", "e50df8cf97a6", "7f8b29bf23b4",
              "6b3245389e62", "0b6b6e5496ce", "e3956a6a151b", "1552ce9239b2", "0977bd4953a4", "4d9ed3fc779c",
              "420d64d1991b", "7cddbb67d39b", "5d26f4afff02"]


def test_the_bytes_on_the_wire_are_protocol_2s():
    """A change of these bytes needs a new PROTOCOL_VERSION (and new digests)."""
    commands, replies = _golden_messages()

    def digest(encode):
        return hashlib.sha256(b"".join(encode(w).SerializeToString() for w in ("fp32", "bf16"))).hexdigest()[:12]

    got = [digest(lambda w, i=i, c=c: command_to_proto(c, i, w)) for i, c in enumerate(commands)]
    got += [digest(lambda w, r=r: reply_to_proto(r, 9, 2, w)) for r in replies]
    assert PROTOCOL_VERSION == 2 and got == PROTOCOL_2
