"""Messages on the wire: the grid's commands and replies as protobuf, checked before use, and framing.

Nothing here unpickles anything: a tensor is ``(dtype enum, shape, bytes)`` and is rebuilt with
``torch.frombuffer`` only after its dtype, shape and byte count have been checked against what the
receiver expects, and then its values (finite, within :attr:`Limits.max_abs`). Every reply is checked
against the command it answers (:class:`Expect`), every command against what the client did
(:class:`ClientView`). A message is serialised once and cut into :data:`CHUNK_BYTES` frames; the
receiver refuses a declared size above its limit before reading the rest.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, fields
from functools import singledispatch
from typing import Callable, Iterator, Mapping

import torch
from google.protobuf.message import DecodeError, Message

from ..data.batching import IGNORE
from ..messages import (ASKED, COMMANDS, HELLO, LABEL_WIRE_DTYPE, MASK_WIRE_DTYPE, REPLIES, REPLY_OF, SECAGG_MAX_BYTES,
                        STATE_WIRE_DTYPE, WIRE_DTYPES, BatchTensor, Choice, Count, FirstMoments, Flag, Hidden, Kind,
                        Labels, Mask, Nested, Real, SecAggData, SecondMoments, State, Text, kinds)
from ..runtime.optim import BETAS
from . import splitlora_pb2 as pb

PROTOCOL_VERSION = 2
CHUNK_BYTES = 1 << 20  # 1 MiB frames, well below gRPC's default 4 MiB message limit
GRPC_FRAME_LIMIT = CHUNK_BYTES + (64 << 10)  # what a gRPC channel accepts per frame

_TO_ENUM = {torch.float32: pb.FLOAT32, torch.bfloat16: pb.BFLOAT16, torch.float16: pb.FLOAT16,
            torch.uint8: pb.UINT8, torch.int32: pb.INT32}
_FROM_ENUM = {v: k for k, v in _TO_ENUM.items()}

if sys.byteorder != "little":  # the format is little-endian; so are x86 and ARM hosts
    raise ImportError("splitlora's wire format needs a little-endian host")


class WireError(ValueError):
    """A message that does not match what the receiver expects (gRPC INVALID_ARGUMENT)."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- tensors ----------------------------------------------------------------------------------

def tensor_to_proto(t: torch.Tensor, dtype: torch.dtype | None = None) -> pb.Tensor:
    """``t`` as raw bytes (converted to ``dtype`` first when given)."""
    t = t.detach()
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if t.dtype not in _TO_ENUM:
        raise TypeError(f"dtype {t.dtype} cannot travel on the wire")
    t = t.contiguous().cpu()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(dtype=_TO_ENUM[t.dtype], shape=list(t.shape), data=data)


def tensor_from_proto(p: pb.Tensor, name: str, dtype: torch.dtype, ndim: int | None = None,
                      shape: tuple[int | None, ...] | None = None, max_dims: tuple[int, ...] | None = None,
                      finite: bool = False, max_abs: float | None = None) -> torch.Tensor:
    """Rebuild a tensor after checking it. ``shape`` entries of ``None`` are free; ``max_dims``
    bounds each dimension; ``finite`` rejects NaN and infinities, ``max_abs`` any larger magnitude.
    Raises :class:`WireError`."""
    if p.dtype != _TO_ENUM[dtype]:
        got = _FROM_ENUM.get(p.dtype)
        raise WireError(f"{name}: dtype {dtype_name(got) if got else p.dtype}, expected {dtype_name(dtype)}")
    dims = tuple(int(d) for d in p.shape)
    want_ndim = ndim if ndim is not None else (len(shape) if shape is not None else None)
    if want_ndim is not None and len(dims) != want_ndim:
        raise WireError(f"{name}: {len(dims)} dimensions, expected {want_ndim}")
    if any(d < 1 for d in dims):
        raise WireError(f"{name}: shape {list(dims)} has an empty or negative dimension")
    if shape is not None:
        for i, (d, want) in enumerate(zip(dims, shape)):
            if want is not None and d != want:
                raise WireError(f"{name}: shape {list(dims)}, dimension {i} must be {want}")
    if max_dims is not None:
        for i, (d, most) in enumerate(zip(dims, max_dims)):
            if d > most:
                raise WireError(f"{name}: shape {list(dims)}, dimension {i} exceeds the limit {most}")
    count = math.prod(dims)
    expected = count * dtype.itemsize
    if len(p.data) != expected:
        raise WireError(f"{name}: {len(p.data)} bytes for shape {list(dims)} of {dtype_name(dtype)}, "
                        f"expected {expected} (truncated or padded data)")
    t = torch.frombuffer(bytearray(p.data), dtype=dtype).reshape(dims)
    if (finite or max_abs is not None) and t.is_floating_point() and t.numel():
        worst = float(t.abs().max())  # NaN propagates
        if not math.isfinite(worst):
            raise WireError(f"{name}: holds NaN or infinite values")
        if max_abs is not None and worst > max_abs:
            raise WireError(f"{name}: a value of magnitude {worst:.3g} exceeds the bound {max_abs:.3g}")
    return t


def state_to_proto(state: Mapping[str, torch.Tensor]) -> pb.State:
    """A LoRA state (float32 on the wire, in key order)."""
    return pb.State(tensors=[pb.NamedTensor(name=k, tensor=tensor_to_proto(v, STATE_WIRE_DTYPE))
                             for k, v in sorted(state.items())])


def state_from_proto(msg: pb.State, expected: Mapping[str, tuple[int, ...]], what: str = "adapter",
                     max_abs: float | None = None) -> dict[str, torch.Tensor]:
    """A LoRA state that must hold exactly the keys and shapes of ``expected``, finite float32."""
    out: dict[str, torch.Tensor] = {}
    for item in msg.tensors:
        if item.name in out:
            raise WireError(f"{what}: tensor {item.name!r} sent twice")
        if item.name not in expected:
            raise WireError(f"{what}: unexpected tensor {item.name!r}")
        out[item.name] = tensor_from_proto(item.tensor, f"{what}[{item.name}]", STATE_WIRE_DTYPE,
                                           shape=tuple(expected[item.name]), finite=True, max_abs=max_abs)
    missing = sorted(set(expected) - set(out))
    if missing:
        raise WireError(f"{what}: {len(missing)} tensors missing, e.g. {missing[0]!r}")
    return out


def state_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def state_wire_bytes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) * STATE_WIRE_DTYPE.itemsize for s in shapes.values())


# ---- what a receiver accepts ------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """The sizes and bounds the config implies for what crosses the cut."""

    batch_size: int
    max_length: int
    hidden_size: int
    vocab_size: int
    wire_dtype: str
    max_abs: float  # the largest magnitude of any value received (Aggregation.value_bound)
    u_shape: bool

    @property
    def dtype(self) -> torch.dtype:
        return WIRE_DTYPES[self.wire_dtype]

    def max_step_bytes(self) -> int:
        """The largest activation (or gradient) message a client may send."""
        b, t = self.batch_size, self.max_length
        return b * t * (self.hidden_size * self.dtype.itemsize + MASK_WIRE_DTYPE.itemsize + LABEL_WIRE_DTYPE.itemsize)


# AdamW's moments (runtime/optim.py's betas b1, b2): m = sum (1-b1) b1^k g_k and
# v = sum (1-b2) b2^k g_k^2 per value, so by Cauchy-Schwarz m^2 <= MOMENT_RATIO * v whatever the
# gradients were. Moments that break it were not made by AdamW: loaded, they make the next step as large
# as the sender likes (m / sqrt(v) is unbounded); an sl client handing over exp_avg 1e10 with exp_avg_sq
# 0 (inside the value bound) blew up the next client's adapter and got it dropped (issue 11).
_BETA1, _BETA2 = BETAS
MOMENT_RATIO = (1 - _BETA1) ** 2 / ((1 - _BETA2) * (1 - _BETA1 ** 2 / _BETA2))  # about 52.9


class _Receiver:
    """The values a receiver holds messages to, by the names :mod:`splitlora.messages` declares
    (``STEPS``, ``BATCH_TOKENS``, ``LOSS_TOKENS``; ``ASKED``, ``HELLO``)."""

    lim: Limits
    steps: int
    shapes: Mapping[str, tuple[int, ...]]

    @property
    def batch_shape(self) -> tuple[int, ...] | None:
        """(B, T, H) of the batch the exchange is about (None: there is none)."""
        hidden = getattr(getattr(self, "command", None), "hidden", None)
        return tuple(hidden.shape) if hidden is not None else None

    @property
    def batch_tokens(self) -> int:
        return self.lim.batch_size * self.lim.max_length

    @property
    def loss_tokens(self) -> int:
        b, t = self.batch_shape[:2]
        return b * max(t - 1, 0)

    def said(self, source: str, name: str):
        """What a field ``name`` must repeat: the command's field (ASKED) or this client's Hello (HELLO)."""
        return getattr(self.command if source == ASKED else self, name)


_REPEAT_ERRORS = {ASKED: "reply for {name} {value}, the command was for {name} {want}",
                  HELLO: "{name} {value} differs from the {want} announced in Hello"}


@dataclass
class ClientView(_Receiver):
    """What a client checks the server's commands against: its own LoRA shapes and open batch."""

    shapes: Mapping[str, tuple[int, ...]]
    lim: Limits
    steps: int
    open_shape: tuple[int, ...] | None = None  # (B, T, H) of the batch between Forward and Backward

    @property
    def batch_shape(self) -> tuple[int, ...] | None:
        return self.open_shape


@dataclass(frozen=True)
class Expect(_Receiver):
    """What the server asked a client for, so that it can check the answer."""

    command: object  # the command sent
    lim: Limits
    steps: int
    shapes: Mapping[str, tuple[int, ...]]  # the client's LoRA state shapes
    num_samples: int  # what the client declared in Hello


# ---- any declared message: one encoder, one decoder ------------------------------------------------
# Each kind of splitlora.messages has a _put (value -> protobuf field) and a _get (protobuf field ->
# checked value); a message is the walk over its declared fields.

def encode_message(msg, p: Message, wire_dtype: str) -> None:
    """Writes ``msg`` (a message declared as in :mod:`splitlora.messages`) into ``p``, its protobuf
    message (fields of the same names), tensors of :class:`~splitlora.messages.Hidden` in ``wire_dtype``."""
    for name, kind in kinds(msg).items():
        value = getattr(msg, name)
        if value is not None:
            _put(kind, p, name, value, wire_dtype)
            if getattr(kind, "flag", None):
                setattr(p, kind.flag, True)


def _into(p: Message, name: str) -> Message:
    """``p``'s message field ``name``, set (even when all its fields are defaults)."""
    field = getattr(p, name)
    field.SetInParent()
    return field


@dataclass(frozen=True)
class _Field:
    """One field being decoded: where it is, what it is called in errors, whom it is checked for."""

    p: Message
    name: str
    label: str
    at: _Receiver
    default: object
    sibling: Callable[[str], object]  # another field of the same message, checked

    @property
    def raw(self):
        return getattr(self.p, self.name)


_TENSORS = (BatchTensor, State, Nested)


def decode_message(cls: type, p: Message, at: _Receiver, prefix: str = ""):
    """A ``cls`` (declared as in :mod:`splitlora.messages`) read from ``p`` and checked field by field
    as declared, for the receiver ``at`` (raises :class:`WireError`); numbers before any tensor is built."""
    declared = kinds(cls)
    defaults = {f.name: f.default for f in fields(cls)}
    got: dict[str, object] = {}

    def sibling(name: str):  # a field may be checked against another, decoded first
        if name not in got:
            got[name] = _get(declared[name], _Field(p, name, prefix + name, at, defaults[name], sibling))
        return got[name]

    for name in sorted(declared, key=lambda n: isinstance(declared[n], _TENSORS)):
        sibling(name)
    return cls(**got)


def _put(kind: Kind, p: Message, name: str, value, wire_dtype: str) -> None:
    if isinstance(kind, BatchTensor):
        getattr(p, name).CopyFrom(tensor_to_proto(value, kind.dtype or WIRE_DTYPES[wire_dtype]))
    elif isinstance(kind, State):
        getattr(p, name).CopyFrom(state_to_proto(value))
    elif isinstance(kind, Nested):
        encode_message(value, _into(p, name), wire_dtype)
    else:  # numbers, flags, text, bytes
        setattr(p, name, value)


@singledispatch
def _get(kind: Kind, f: _Field):
    raise TypeError(f"{f.label}: no decoder for {type(kind).__name__}")


def _repeated(kind, f: _Field, value):
    want = f.at.said(kind.equals, f.name)
    if value != want:
        raise WireError(_REPEAT_ERRORS[kind.equals].format(name=f.label, value=value, want=want))
    return value


@_get.register
def _(kind: Count, f):
    if kind.flag and not getattr(f.p, kind.flag):
        return None
    if kind.equals:
        return int(_repeated(kind, f, f.raw))
    most = getattr(f.at, kind.most)
    if not 0 <= f.raw <= most:
        raise WireError(f"{f.label}: {f.raw} is outside [0, {most}]")
    return int(f.raw)


@_get.register
def _(kind: Real, f):
    if (kind.flag and not getattr(f.p, kind.flag)) or (kind.when and not getattr(f.at.lim, kind.when)):
        return None if kind.flag else f.default
    if not math.isfinite(f.raw) or f.raw < kind.low:
        raise WireError(f"{f.label}: {f.raw!r} must be a finite number >= {kind.low:g}")
    return float(f.raw)


@_get.register
def _(kind: Flag, f):
    return bool(f.raw)


@_get.register
def _(kind: Text, f):
    return f.raw[:kind.most]


@_get.register
def _(kind: Choice, f):
    if f.raw not in kind.options:
        raise WireError(f"{f.label}: {f.raw[:20]!r} is not one of {', '.join(kind.options)}")
    return _repeated(kind, f, f.raw) if kind.equals else f.raw


@_get.register
def _(kind: Hidden, f):
    lim, shape = f.at.lim, f.at.batch_shape if kind.same_batch else (None, None, f.at.lim.hidden_size)
    if shape is None:
        raise WireError(f"{f.label} for a batch this client has not sent")
    return tensor_from_proto(f.raw, f.label, lim.dtype, shape=shape, max_abs=lim.max_abs,
                             max_dims=(lim.batch_size, lim.max_length, lim.hidden_size)).to(torch.float32)


@_get.register
def _(kind: Mask, f):
    b, t = f.sibling(kind.like).shape[:2]
    mask = tensor_from_proto(f.raw, f.label, MASK_WIRE_DTYPE, shape=(b, t))
    if bool((mask > 1).any()):
        raise WireError(f"{f.label}: values must be 0 or 1")
    if not bool((mask[:, 0] == 1).all()) or bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise WireError(f"{f.label}: every row must be right-padded and start with a real token")
    return mask.to(torch.long)


@_get.register
def _(kind: Labels, f):
    lim = f.at.lim
    if lim.u_shape:
        if f.p.HasField(f.name):
            raise WireError(f"{f.label}: the U-shaped split keeps labels on the client; do not send them")
        return None
    if not f.p.HasField(f.name):
        raise WireError(f"{f.label}: missing (the two-part split computes the loss on the server)")
    b, t = f.sibling(kind.like).shape[:2]
    labels = tensor_from_proto(f.raw, f.label, LABEL_WIRE_DTYPE, shape=(b, t))
    if bool(((labels != IGNORE) & ((labels < 0) | (labels >= lim.vocab_size))).any()):
        raise WireError(f"{f.label}: values must be -100 or token ids below {lim.vocab_size}")
    if not bool((labels[:, 1:] != IGNORE).any()):
        raise WireError(f"{f.label}: the batch carries no loss token (its loss would be 0/0)")
    return labels.to(torch.long)


@_get.register
def _(kind: State, f):
    if kind.optional and not f.p.HasField(f.name):
        return None
    return state_from_proto(f.raw, f.at.shapes, f.label, f.at.lim.max_abs)


@_get.register
def _(kind: SecondMoments, f):
    sq = state_from_proto(f.raw, f.at.shapes, f.label)
    if any(bool((v < 0).any()) for v in sq.values()):
        raise WireError(f"{f.label}: second moments must be >= 0")
    return sq


@_get.register
def _(kind: FirstMoments, f):
    sq = f.sibling(kind.second)
    avg = state_from_proto(f.raw, f.at.shapes, f.label, f.at.lim.max_abs)
    for k, m in avg.items():
        # (slack for float32 rounding, and for squares that underflow to 0)
        if bool((m.double().square() > MOMENT_RATIO * (1 + 1e-4) * sq[k].double() + 1e-30).any()):
            raise WireError(f"{f.label}[{k}]: first moments too large for their second moments "
                            "(not AdamW's: m^2 <= 52.9 v)")
    return avg


@_get.register
def _(kind: Nested, f):
    if kind.optional and not f.p.HasField(f.name):
        return None
    return decode_message(kind.cls, f.raw, f.at, f.label + ".")


@_get.register
def _(kind: SecAggData, f):
    data, stage = bytes(f.raw), f.sibling("stage")
    if stage != "mask" and len(data) > SECAGG_MAX_BYTES:
        raise WireError(f"secure aggregation: {len(data)} bytes for stage {stage!r}")
    if kind.answer and stage == "mask":  # one value per LoRA coordinate and the weight, 8 bytes each
        want = 8 * (sum(math.prod(s) for s in f.at.shapes.values()) + 1)
        if len(data) != want:
            raise WireError(f"secure aggregation: a masked input of {len(data)} bytes, expected {want}")
    elif kind.answer and stage == "keys" and len(data) != 64:
        raise WireError("secure aggregation: keys must be two 32-byte X25519 public keys")
    return data


# ---- server -> client: commands; client -> server: replies --------------------------------------------

def command_to_proto(cmd, command_id: int, wire_dtype: str) -> pb.Command:
    """``cmd`` (a :mod:`splitlora.messages` command) as a protobuf ``Command``."""
    if COMMANDS.get(getattr(cmd, "wire_name", None)) is not type(cmd):
        raise TypeError(f"not a command: {type(cmd).__name__}")
    msg = pb.Command(id=command_id)
    encode_message(cmd, _into(msg, cmd.wire_name), wire_dtype)
    return msg


WAIT = "wait"  # what command_from_proto returns for a Wait: nothing to do, call again


def command_from_proto(msg: pb.Command, view: ClientView):
    """A checked command (raises :class:`WireError`), or :data:`WAIT`."""
    kind = msg.WhichOneof("kind")
    if kind == "wait":
        return WAIT
    if kind not in COMMANDS:
        raise WireError(f"unknown command {kind!r}")
    return decode_message(COMMANDS[kind], getattr(msg, kind), view)


def reply_to_proto(reply, session: int, reply_to: int, wire_dtype: str) -> pb.ClientMessage:
    msg = pb.ClientMessage(session=session, reply_to=reply_to)
    if reply is None:
        return msg
    if REPLIES.get(getattr(reply, "wire_name", None)) is not type(reply):
        raise TypeError(f"not a reply: {type(reply).__name__}")
    encode_message(reply, _into(msg, reply.wire_name), wire_dtype)
    return msg


def reply_from_proto(msg: pb.ClientMessage, expect: Expect):
    """The checked reply to ``expect.command`` (raises :class:`WireError`)."""
    cls = REPLY_OF[type(expect.command)]
    kind = msg.WhichOneof("payload")
    if kind != cls.wire_name:
        asked = type(expect.command).__name__
        raise WireError(f"the reply to {asked} must be {cls.wire_name}, got {kind or 'nothing'}")
    return decode_message(cls, getattr(msg, kind), expect)


def message_payload_bytes(msg: Message) -> int:
    """Payload bytes of a protobuf message (every bytes field in it: tensor data, secure-aggregation
    data), as the simulation counts them."""
    total = 0
    for field_desc, value in msg.ListFields():
        items = value if field_desc.is_repeated else [value]
        if field_desc.type == field_desc.TYPE_BYTES:
            total += sum(len(item) for item in items)
        elif field_desc.message_type is not None:
            total += sum(message_payload_bytes(item) for item in items)
    return total


# ---- framing ----------------------------------------------------------------------------------

def to_chunks(msg: Message, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.Chunk]:
    return bytes_to_chunks(msg.SerializeToString(), chunk_bytes)


def bytes_to_chunks(data: bytes, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.Chunk]:
    """A serialised message as frames: the first states the total size."""
    view = memoryview(data)
    if not data:
        yield pb.Chunk(data=b"", total_bytes=0)
        return
    for start in range(0, len(data), chunk_bytes):
        yield pb.Chunk(data=bytes(view[start:start + chunk_bytes]), total_bytes=len(data) if start == 0 else 0)


def from_chunks(chunks: Iterator[pb.Chunk], cls: type[Message], limit: int, what: str = "message") -> tuple[Message, int]:
    """Read one message of ``cls`` from ``chunks``; returns it and its size in bytes.

    Reads only as many chunks as the first one announces; refuses an announced size above ``limit``,
    a stream that ends early, and chunks that overrun the announced size.
    """
    first = next(chunks, None)
    if first is None:
        raise WireError(f"{what}: empty stream")
    total = int(first.total_bytes)
    if total > limit:
        raise WireError(f"{what}: {total} bytes exceeds the limit of {limit} bytes")
    buf = bytearray(first.data)
    while len(buf) < total:
        nxt = next(chunks, None)
        if nxt is None:
            raise WireError(f"{what}: stream ended after {len(buf)} of {total} bytes (truncated)")
        if nxt.total_bytes:
            raise WireError(f"{what}: a second message started before the first was complete")
        buf += nxt.data
    if len(buf) != total:
        raise WireError(f"{what}: {len(buf)} bytes received, {total} announced")
    try:
        return cls.FromString(bytes(buf)), total
    except DecodeError:
        raise WireError(f"{what}: not a valid {cls.__name__} message") from None
