"""Messages on the wire: the grid's commands and replies as protobuf, checked before use, and framing.

Nothing here unpickles anything: a tensor is ``(dtype enum, shape, bytes)`` and is rebuilt with
``torch.frombuffer`` only after its dtype, shape and byte count have been checked against what the
receiver expects, and then its values (finite, within :attr:`Limits.max_abs`). Every reply is checked
against the command it answers (:class:`Expect`), every command against what the client did
(:class:`ClientView`). A message is serialised once and cut into :data:`CHUNK_BYTES` frames; the
receiver refuses a declared size above its limit before reading the rest.
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
from ..messages import (LABEL_WIRE_DTYPE, MASK_WIRE_DTYPE, STATE_WIRE_DTYPE, WIRE_DTYPES, Activations,
                        AdapterUpdate, Backward, Finish, Forward, HandIn, HandOut, Handover, Load, LocalStep,
                        SecAgg, SecAggReply, StepDone, Sync, Tail, TailGrad, Upload)
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


def _hidden(p: pb.Tensor, name: str, lim: Limits, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    t = tensor_from_proto(p, name, lim.dtype, shape=shape or (None, None, lim.hidden_size),
                          max_dims=(lim.batch_size, lim.max_length, lim.hidden_size), max_abs=lim.max_abs)
    return t.to(torch.float32)


def _check_count(value: int, most: int, name: str) -> int:
    if not 0 <= value <= most:
        raise WireError(f"{name}: {value} is outside [0, {most}]")
    return int(value)


def _check_float(value: float, name: str, low: float = 0.0) -> float:
    if not math.isfinite(value) or value < low:
        raise WireError(f"{name}: {value!r} must be a finite number >= {low:g}")
    return float(value)


def handover_to_proto(h: Handover) -> pb.HandoverMsg:
    return pb.HandoverMsg(state=state_to_proto(h.state), exp_avg=state_to_proto(h.exp_avg),
                          exp_avg_sq=state_to_proto(h.exp_avg_sq), opt_steps=h.opt_steps)


# AdamW's moments (runtime/optim.py's betas b1, b2): m = sum (1-b1) b1^k g_k and
# v = sum (1-b2) b2^k g_k^2 per value, so by Cauchy-Schwarz m^2 <= MOMENT_RATIO * v whatever the
# gradients were. Moments that break it were not made by AdamW: loaded, they make the next step as large
# as the sender likes (m / sqrt(v) is unbounded); an sl client handing over exp_avg 1e10 with exp_avg_sq
# 0 (inside the value bound) blew up the next client's adapter and got it dropped (issue 11).
_BETA1, _BETA2 = BETAS
MOMENT_RATIO = (1 - _BETA1) ** 2 / ((1 - _BETA2) * (1 - _BETA1 ** 2 / _BETA2))  # about 52.9


def handover_from_proto(msg: pb.HandoverMsg, shapes: Mapping[str, tuple[int, ...]], max_steps: int,
                        max_abs: float) -> Handover:
    sq = state_from_proto(msg.exp_avg_sq, shapes, "exp_avg_sq")
    if any(bool((v < 0).any()) for v in sq.values()):
        raise WireError("exp_avg_sq: second moments must be >= 0")
    avg = state_from_proto(msg.exp_avg, shapes, "exp_avg", max_abs=max_abs)
    for k, m in avg.items():
        # (slack for float32 rounding, and for squares that underflow to 0)
        if bool((m.double().square() > MOMENT_RATIO * (1 + 1e-4) * sq[k].double() + 1e-30).any()):
            raise WireError(f"exp_avg[{k}]: first moments too large for their second moments "
                            "(not AdamW's: m^2 <= 52.9 v)")
    return Handover(state_from_proto(msg.state, shapes, "handover", max_abs=max_abs), avg, sq,
                    _check_count(msg.opt_steps, max_steps, "opt_steps"))


# ---- server -> client: commands -------------------------------------------------------------------

def command_to_proto(cmd, command_id: int, wire_dtype: str) -> pb.Command:
    """``cmd`` (a :mod:`splitlora.messages` command) as a protobuf ``Command``."""
    dtype = WIRE_DTYPES[wire_dtype]
    if isinstance(cmd, Sync):
        msg = pb.SyncMsg(step=cmd.step, batches=cmd.batches, round=cmd.round)
        if cmd.state is not None:
            msg.state.CopyFrom(state_to_proto(cmd.state))
        if cmd.handover is not None:
            msg.handover.CopyFrom(handover_to_proto(cmd.handover))
        return pb.Command(id=command_id, sync=msg)
    if isinstance(cmd, Forward):
        return pb.Command(id=command_id, forward=pb.ForwardMsg(step=cmd.step))
    if isinstance(cmd, Backward):
        return pb.Command(id=command_id, backward=pb.BackwardMsg(
            step=cmd.step, grad=tensor_to_proto(cmd.grad, dtype), loss=cmd.loss or 0.0, tokens=cmd.tokens or 0,
            has_loss=cmd.loss is not None, scale=cmd.scale))
    if isinstance(cmd, Tail):
        return pb.Command(id=command_id, tail=pb.TailMsg(step=cmd.step, hidden=tensor_to_proto(cmd.hidden, dtype)))
    if isinstance(cmd, LocalStep):
        return pb.Command(id=command_id, local_step=pb.LocalStepMsg(step=cmd.step))
    if isinstance(cmd, Upload):
        return pb.Command(id=command_id, upload=pb.UploadMsg(round=cmd.round))
    if isinstance(cmd, Load):
        msg = pb.LoadMsg(round=cmd.round, keep_from=cmd.keep_from)
        if cmd.state is not None:
            msg.state.CopyFrom(state_to_proto(cmd.state))
        return pb.Command(id=command_id, load=msg)
    if isinstance(cmd, HandOut):
        return pb.Command(id=command_id, hand_out=pb.HandOutMsg(step=cmd.step))
    if isinstance(cmd, HandIn):
        return pb.Command(id=command_id, hand_in=pb.HandInMsg(step=cmd.step, handover=handover_to_proto(cmd.handover)))
    if isinstance(cmd, Finish):
        return pb.Command(id=command_id, finish=pb.FinishMsg(stop=cmd.stop, reason=cmd.reason))
    if isinstance(cmd, SecAgg):
        return pb.Command(id=command_id, secagg=pb.SecAggMsg(round=cmd.round, stage=cmd.stage, data=cmd.data))
    raise TypeError(f"not a command: {type(cmd).__name__}")


WAIT = "wait"  # what command_from_proto returns for a Wait: nothing to do, call again


@dataclass
class ClientView:
    """What a client checks the server's commands against: its own LoRA shapes and open batch."""

    shapes: Mapping[str, tuple[int, ...]]
    lim: Limits
    steps: int
    open_shape: tuple[int, ...] | None = None  # (B, T, H) of the batch between Forward and Backward


def command_from_proto(msg: pb.Command, view: ClientView):
    """A checked command (raises :class:`WireError`), or :data:`WAIT`."""
    kind = msg.WhichOneof("kind")
    lim, shapes = view.lim, view.shapes

    def step(value: int) -> int:
        return _check_count(value, view.steps, "step")

    def grad_like(p: pb.Tensor, name: str) -> torch.Tensor:
        if view.open_shape is None:
            raise WireError(f"{name} for a batch this client has not sent")
        return _hidden(p, name, lim, shape=view.open_shape)

    if kind == "sync":
        m = msg.sync
        return Sync(step(m.step), step(m.batches), _check_count(m.round, view.steps, "round"),
                    state_from_proto(m.state, shapes, "state", lim.max_abs) if m.HasField("state") else None,
                    handover_from_proto(m.handover, shapes, view.steps, lim.max_abs) if m.HasField("handover") else None)
    if kind == "forward":
        return Forward(step(msg.forward.step))
    if kind == "backward":
        m = msg.backward
        return Backward(step(m.step), grad_like(m.grad, "grad"), _check_float(m.loss, "loss") if m.has_loss else None,
                        _check_count(m.tokens, lim.batch_size * lim.max_length, "tokens") if m.has_loss else None,
                        _check_float(m.scale, "scale") if lim.u_shape else 1.0)
    if kind == "tail":
        return Tail(step(msg.tail.step), grad_like(msg.tail.hidden, "hidden"))
    if kind == "local_step":
        return LocalStep(step(msg.local_step.step))
    if kind == "upload":
        return Upload(_check_count(msg.upload.round, view.steps, "round"))
    if kind == "load":
        m = msg.load
        return Load(_check_count(m.round, view.steps, "round"),
                    state_from_proto(m.state, shapes, "average", lim.max_abs) if m.HasField("state") else None,
                    step(m.keep_from))
    if kind == "hand_out":
        return HandOut(step(msg.hand_out.step))
    if kind == "hand_in":
        return HandIn(step(msg.hand_in.step), handover_from_proto(msg.hand_in.handover, shapes, view.steps,
                                                                  lim.max_abs))
    if kind == "finish":
        return Finish(msg.finish.stop, msg.finish.reason[:500])
    if kind == "secagg":
        return SecAgg(_check_count(msg.secagg.round, view.steps, "round"), *_secagg_body(msg.secagg))
    if kind == "wait":
        return WAIT
    raise WireError(f"unknown command {kind!r}")


# ---- client -> server: replies --------------------------------------------------------------------

def reply_to_proto(reply, session: int, reply_to: int, wire_dtype: str) -> pb.ClientMessage:
    dtype = WIRE_DTYPES[wire_dtype]
    msg = pb.ClientMessage(session=session, reply_to=reply_to)
    if reply is None:
        return msg
    if isinstance(reply, Activations):
        a = pb.ActivationsMsg(step=reply.step, hidden=tensor_to_proto(reply.hidden, dtype),
                              attention_mask=tensor_to_proto(reply.attention_mask, MASK_WIRE_DTYPE))
        if reply.labels is not None:
            a.labels.CopyFrom(tensor_to_proto(reply.labels, LABEL_WIRE_DTYPE))
        msg.activations.CopyFrom(a)
    elif isinstance(reply, TailGrad):
        msg.tail_grad.CopyFrom(pb.TailGradMsg(step=reply.step, grad=tensor_to_proto(reply.grad, dtype),
                                              loss=reply.loss, tokens=reply.tokens))
    elif isinstance(reply, StepDone):
        msg.step_done.CopyFrom(pb.StepDoneMsg(step=reply.step, loss=reply.loss, tokens=reply.tokens))
    elif isinstance(reply, AdapterUpdate):
        msg.adapter.CopyFrom(pb.AdapterMsg(round=reply.round, num_samples=reply.num_samples,
                                           state=state_to_proto(reply.state)))
    elif isinstance(reply, Handover):
        msg.handover.CopyFrom(handover_to_proto(reply))
    elif isinstance(reply, SecAggReply):
        msg.secagg.CopyFrom(pb.SecAggMsg(round=reply.round, stage=reply.stage, data=reply.data))
    else:
        raise TypeError(f"not a reply: {type(reply).__name__}")
    return msg


@dataclass(frozen=True)
class Expect:
    """What the server asked a client for, so that it can check the answer."""

    command: object  # the command sent
    lim: Limits
    steps: int
    shapes: Mapping[str, tuple[int, ...]]  # the client's LoRA state shapes
    num_samples: int  # what the client declared in Hello


def reply_from_proto(msg: pb.ClientMessage, expect: Expect):
    """The checked reply to ``expect.command`` (raises :class:`WireError`)."""
    cmd, lim = expect.command, expect.lim
    kind = msg.WhichOneof("payload")
    want = {Forward: "activations", Tail: "tail_grad", LocalStep: "step_done", Upload: "adapter",
            HandOut: "handover", SecAgg: "secagg"}[type(cmd)]
    if kind != want:
        raise WireError(f"the reply to {type(cmd).__name__} must be {want}, got {kind or 'nothing'}")

    def same_step(value: int) -> int:
        if value != getattr(cmd, "step", value):
            raise WireError(f"reply for step {value}, the command was for step {cmd.step}")
        return int(value)

    if kind == "activations":
        m = msg.activations
        hidden = _hidden(m.hidden, "hidden", lim)
        b, t = hidden.shape[:2]
        mask = tensor_from_proto(m.attention_mask, "attention_mask", MASK_WIRE_DTYPE, shape=(b, t))
        if bool((mask > 1).any()):
            raise WireError("attention_mask: values must be 0 or 1")
        if not bool((mask[:, 0] == 1).all()) or bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise WireError("attention_mask: every row must be right-padded and start with a real token")
        labels = None
        if lim.u_shape:
            if m.HasField("labels"):
                raise WireError("labels: the U-shaped split keeps labels on the client; do not send them")
        else:
            if not m.HasField("labels"):
                raise WireError("labels: missing (the two-part split computes the loss on the server)")
            labels = tensor_from_proto(m.labels, "labels", LABEL_WIRE_DTYPE, shape=(b, t))
            bad = (labels != IGNORE) & ((labels < 0) | (labels >= lim.vocab_size))
            if bool(bad.any()):
                raise WireError(f"labels: values must be -100 or token ids below {lim.vocab_size}")
            if not bool((labels[:, 1:] != IGNORE).any()):
                raise WireError("labels: the batch carries no loss token (its loss would be 0/0)")
            labels = labels.to(torch.long)
        return Activations(same_step(m.step), hidden, mask.to(torch.long), labels)
    if kind == "tail_grad":
        m = msg.tail_grad
        shape = tuple(cmd.hidden.shape)
        grad = _hidden(m.grad, "grad", lim, shape=shape)
        tokens = _check_count(m.tokens, shape[0] * max(shape[1] - 1, 0), "tokens")
        return TailGrad(same_step(m.step), grad, _check_float(m.loss, "loss"), tokens)
    if kind == "step_done":
        m = msg.step_done
        return StepDone(same_step(m.step), _check_float(m.loss, "loss"),
                        _check_count(m.tokens, lim.batch_size * lim.max_length, "tokens"))
    if kind == "adapter":
        m = msg.adapter
        if m.num_samples != expect.num_samples:
            raise WireError(f"num_samples {m.num_samples} differs from the {expect.num_samples} announced in Hello")
        if m.round != cmd.round:
            raise WireError(f"adapter of round {m.round}, the server asked for round {cmd.round}")
        return AdapterUpdate(int(m.round), state_from_proto(m.state, expect.shapes, "adapter", lim.max_abs),
                             int(m.num_samples))
    if kind == "secagg":
        m = msg.secagg
        stage, data = _secagg_body(m)
        if m.round != cmd.round or stage != cmd.stage:
            raise WireError(f"secure aggregation: a reply to {stage!r} of round {m.round}, the server asked for "
                            f"{cmd.stage!r} of round {cmd.round}")
        if stage == "mask":  # one value per LoRA coordinate and the weight, 8 bytes each
            want = 8 * (sum(math.prod(s) for s in expect.shapes.values()) + 1)
            if len(data) != want:
                raise WireError(f"secure aggregation: a masked input of {len(data)} bytes, expected {want}")
        elif stage == "keys" and len(data) != 64:
            raise WireError("secure aggregation: keys must be two 32-byte X25519 public keys")
        return SecAggReply(int(m.round), stage, data)
    return handover_from_proto(msg.handover, expect.shapes, expect.steps, lim.max_abs)


SECAGG_STAGES = ("keys", "share", "mask", "unmask")
SECAGG_MAX_BYTES = 1 << 22  # any stage but a masked input: keys, shares and rosters of a few thousand clients


def _secagg_body(m: pb.SecAggMsg) -> tuple[str, bytes]:
    """Stage and data of a secure-aggregation message, checked for what the wire can check (the
    content is parsed and checked by privacy/secagg.py)."""
    if m.stage not in SECAGG_STAGES:
        raise WireError(f"secure aggregation: unknown stage {m.stage[:20]!r}")
    if m.stage != "mask" and len(m.data) > SECAGG_MAX_BYTES:
        raise WireError(f"secure aggregation: {len(m.data)} bytes for stage {m.stage!r}")
    return m.stage, bytes(m.data)


def message_payload_bytes(msg) -> int:
    """Tensor bytes of a protobuf message (every ``Tensor`` in it), as the simulation counts them."""
    total = 0
    for field_desc, value in msg.ListFields():
        if field_desc.message_type is None:
            continue
        items = value if field_desc.is_repeated else [value]
        for item in items:
            total += len(item.data) if isinstance(item, (pb.Tensor, pb.SecAggMsg)) else message_payload_bytes(item)
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
