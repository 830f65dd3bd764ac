"""Tensors on the wire: raw bytes with dtype and shape, checked before use, and chunked framing.

Nothing here unpickles anything: a tensor is ``(dtype enum, shape, bytes)`` and is rebuilt with
``torch.frombuffer`` only after its dtype, shape and byte count have been checked against what the
receiver expects. A message is serialised once and cut into :data:`CHUNK_BYTES` frames; the receiver
refuses a declared size above its limit before reading the rest.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch
from google.protobuf.message import DecodeError, Message

from ..data.batching import IGNORE
from . import splitlora_pb2 as pb
from .messages import LABEL_WIRE_DTYPE, MASK_WIRE_DTYPE, WIRE_DTYPES, Activations, AdapterUpdate, Gradients

PROTOCOL_VERSION = 1
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
                      finite: bool = False) -> torch.Tensor:
    """Rebuild a tensor after checking it. ``shape`` entries of ``None`` are free; ``max_dims``
    bounds each dimension; ``finite`` rejects NaN and infinities. Raises :class:`WireError`."""
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
    if finite and t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise WireError(f"{name}: holds NaN or infinite values")
    return t


def state_to_proto(state: Mapping[str, torch.Tensor]) -> list[pb.NamedTensor]:
    """A LoRA state (float32 on the wire, in key order)."""
    return [pb.NamedTensor(name=k, tensor=tensor_to_proto(v, torch.float32)) for k, v in sorted(state.items())]


def state_from_proto(items: Iterable[pb.NamedTensor], expected: Mapping[str, tuple[int, ...]],
                     what: str = "adapter") -> dict[str, torch.Tensor]:
    """A LoRA state that must hold exactly the keys and shapes of ``expected``, finite float32."""
    out: dict[str, torch.Tensor] = {}
    for item in items:
        if item.name in out:
            raise WireError(f"{what}: tensor {item.name!r} sent twice")
        if item.name not in expected:
            raise WireError(f"{what}: unexpected tensor {item.name!r}")
        out[item.name] = tensor_from_proto(item.tensor, f"{what}[{item.name}]", torch.float32,
                                           shape=tuple(expected[item.name]), finite=True)
    missing = sorted(set(expected) - set(out))
    if missing:
        raise WireError(f"{what}: {len(missing)} tensors missing, e.g. {missing[0]!r}")
    return out


def state_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def state_wire_bytes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) * 4 for s in shapes.values())


# ---- the cut ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CutLimits:
    """What the server accepts from a client's forward pass."""

    batch_size: int
    max_length: int
    hidden_size: int
    vocab_size: int
    wire_dtype: str

    @property
    def dtype(self) -> torch.dtype:
        return WIRE_DTYPES[self.wire_dtype]

    def max_activation_bytes(self) -> int:
        b, t = self.batch_size, self.max_length
        return b * t * (self.hidden_size * self.dtype.itemsize + MASK_WIRE_DTYPE.itemsize
                        + LABEL_WIRE_DTYPE.itemsize)


def activations_to_proto(a: Activations, session: int, wire_dtype: str) -> pb.ActivationsUp:
    return pb.ActivationsUp(session=session, step=a.step,
                            hidden=tensor_to_proto(a.hidden, WIRE_DTYPES[wire_dtype]),
                            attention_mask=tensor_to_proto(a.attention_mask, MASK_WIRE_DTYPE),
                            labels=tensor_to_proto(a.labels, LABEL_WIRE_DTYPE))


def activations_from_proto(msg: pb.ActivationsUp, client_id: int, lim: CutLimits) -> Activations:
    """Checked activations in the engine's dtypes (float32 hidden, int64 mask and labels)."""
    hidden = tensor_from_proto(msg.hidden, "hidden", lim.dtype, shape=(None, None, lim.hidden_size),
                               max_dims=(lim.batch_size, lim.max_length, lim.hidden_size), finite=True)
    b, t = hidden.shape[:2]
    mask = tensor_from_proto(msg.attention_mask, "attention_mask", MASK_WIRE_DTYPE, shape=(b, t))
    labels = tensor_from_proto(msg.labels, "labels", LABEL_WIRE_DTYPE, shape=(b, t))
    if bool((mask > 1).any()):
        raise WireError("attention_mask: values must be 0 or 1")
    if not bool((mask[:, 0] == 1).all()) or bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise WireError("attention_mask: every row must be right-padded and start with a real token")
    bad = (labels != IGNORE) & ((labels < 0) | (labels >= lim.vocab_size))
    if bool(bad.any()):
        raise WireError(f"labels: values must be -100 or token ids below {lim.vocab_size}")
    return Activations(client_id, int(msg.step), hidden.to(torch.float32), mask.to(torch.long),
                       labels.to(torch.long))


def gradients_to_proto(g: Gradients, wire_dtype: str, aggregate: bool) -> pb.GradientsDown:
    return pb.GradientsDown(step=g.step, grad=tensor_to_proto(g.grad, WIRE_DTYPES[wire_dtype]),
                            loss=g.loss, tokens=g.tokens, aggregate=aggregate)


def gradients_from_proto(msg: pb.GradientsDown, client_id: int, shape: tuple[int, ...],
                         wire_dtype: str) -> Gradients:
    grad = tensor_from_proto(msg.grad, "grad", WIRE_DTYPES[wire_dtype], shape=tuple(shape))
    return Gradients(client_id, int(msg.step), grad.to(torch.float32), float(msg.loss), int(msg.tokens))


def update_from_proto(msg: pb.AdapterUp, client_id: int, expected: Mapping[str, tuple[int, ...]]) -> AdapterUpdate:
    return AdapterUpdate(client_id, int(msg.round), state_from_proto(msg.state, expected, "adapter"),
                         int(msg.num_samples))


def payload_bytes(*tensors: pb.Tensor) -> int:
    """Tensor bytes, counted as :class:`~splitlora.transport.inprocess.InProcessLink` counts them."""
    return sum(len(t.data) for t in tensors)


def state_payload_bytes(items: Iterable[pb.NamedTensor]) -> int:
    return sum(len(i.tensor.data) for i in items)


# ---- handshake ------------------------------------------------------------------------------

def base_fingerprint(part: torch.nn.Module) -> str:
    """sha256 of a part's frozen (non-LoRA) tensors: both ends must hold the same base weights."""
    h = hashlib.sha256()
    for name, t in sorted(part.state_dict().items()):
        if "lora_" in name:
            continue
        t = t.detach().contiguous().cpu()
        h.update(f"{name}:{dtype_name(t.dtype)}:{list(t.shape)};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ---- framing ----------------------------------------------------------------------------------

def to_chunks(msg: Message, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.Chunk]:
    data = msg.SerializeToString()
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
