"""What the parties say to each other, independent of how it travels (in process, gRPC or Ray).

An algorithm reaches its clients only through *commands* (server -> client) and their *replies*
(client -> server); see :mod:`splitlora.runtime.grid`. Every command below that names a reply type
expects exactly one reply; the others are fire-and-forget and are delivered, in order, before the
next command of the same client.

=================  =========================  =====================================================
command            reply                      meaning
=================  =========================  =====================================================
``Sync``           -                          (re)join: line up with ``step`` and load a state
``Forward``        :class:`Activations`       run the bottom (embeddings, blocks 0..K-1) on the next batch
``Backward``       -                          dL/dh_K for that batch: backward and optimiser step
``Tail``           :class:`TailGrad`          U-shape: h_(L-T) of that batch: run the tail, the loss,
                                              and send dL/dh_(L-T) back
``LocalStep``      :class:`StepDone`          ``fed``/``cen``: one local step on the whole model
``Upload``         :class:`AdapterUpdate`     the LoRA state, for FedAvg
``Load``           -                          the average to continue from
``HandOut``        :class:`Handover`          ``sl``: the client-side adapter and optimiser state
``HandIn``         -                          ``sl``: continue from that hand-over
``Finish``         -                          the run is over (or the server stops)
``SecAgg``         :class:`SecAggReply`       one stage of a secure-aggregation round (privacy/secagg.py)
=================  =========================  =====================================================

Every message is declared once, here: each field says, with a *kind* (:class:`Count`, :class:`Real`,
:class:`Hidden`, :class:`State`, ...), how it travels and what its receiver holds it to. From that
alone :mod:`splitlora.transport.wire` encodes, decodes and checks it over gRPC, the simulation counts
its bytes (:func:`payload_nbytes`) and rounds it to the wire dtype (:func:`wire_precision`), and
:class:`~splitlora.runtime.client.ClientApp` runs a command with the method marked ``@handles``. A new
message is

1. a class here under ``@command("name")`` or ``@reply("name", answers=TheCommand)``, every field
   declared with ``wire(Kind(...))``;
2. a message with fields of the same names in ``transport/splitlora.proto`` and a field ``name`` of
   it in the ``Command.kind`` (or ``ClientMessage.payload``) oneof; then ``scripts/gen_proto.sh`` and
   a new ``PROTOCOL_VERSION`` in ``transport/wire.py``;
3. for a command, one ``ClientApp`` method under ``@handles(TheCommand)``.

tests/test_messages.py holds every declared number and tensor to a bound and shows that a value
outside it is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, fields
from typing import ClassVar, Union

import torch

# name -> dtype of activations and gradients on the wire (the one registry of wire dtypes)
WIRE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Masks and labels travel compactly; labels need int32 for vocabularies beyond 32k and -100.
MASK_WIRE_DTYPE = torch.uint8
LABEL_WIRE_DTYPE = torch.int32
STATE_WIRE_DTYPE = torch.float32  # adapters and optimiser moments

SECAGG_STAGES = ("keys", "share", "mask", "unmask")
SECAGG_MAX_BYTES = 1 << 22  # any stage but a masked input: keys, shares and rosters of a few thousand clients


# ---- kinds: how a field travels and what bounds it ----------------------------------------------
# A bound is named, and its receiver knows its value (transport/wire.py's ClientView and Expect):
STEPS = "steps"  # the run's steps: every step, round and batch counter is at most this
BATCH_TOKENS = "batch_tokens"  # batch_size x max_length
LOSS_TOKENS = "loss_tokens"  # tokens that can carry loss in the batch the command carried: B x (T - 1)
# ... and so is what a reply must repeat:
ASKED = "asked"  # the command's field of the same name
HELLO = "hello"  # what the client announced in its Hello


@dataclass(frozen=True)
class Kind:
    """How a field travels and what bounds it: the kinds below, each checked by transport/wire.py."""

    def nbytes(self, value, wire_dtype: torch.dtype) -> int:
        """Payload bytes of ``value`` on the wire (numbers and text are framing, not counted)."""
        return 0


@dataclass(frozen=True)
class Count(Kind):
    """An integer in [0, ``most``], or equal to ``equals`` (:data:`ASKED`, :data:`HELLO`).
    ``flag``: the wire's bool saying it is present (None when not)."""

    most: str | None = None
    equals: str | None = None
    flag: str | None = None


@dataclass(frozen=True)
class Real(Kind):
    """A finite float >= ``low``. ``flag`` as for :class:`Count`; ``when``: read only where the
    receiver's limit of that name holds (elsewhere the field's default)."""

    low: float = 0.0
    flag: str | None = None
    when: str | None = None


@dataclass(frozen=True)
class Flag(Kind):
    """A bool."""


@dataclass(frozen=True)
class Text(Kind):
    """A string, cut to ``most`` characters (it is only logged)."""

    most: int


@dataclass(frozen=True)
class Choice(Kind):
    """One of ``options``; ``equals`` as for :class:`Count`."""

    options: tuple[str, ...]
    equals: str | None = None


@dataclass(frozen=True)
class BatchTensor(Kind):
    """A tensor of one batch (the kinds below)."""

    dtype: ClassVar[torch.dtype | None] = None  # on the wire (None: the run's wire dtype)

    def nbytes(self, value, wire_dtype):
        return value.numel() * (self.dtype or wire_dtype).itemsize


@dataclass(frozen=True)
class Hidden(BatchTensor):
    """(B, T, H) activations or gradients in the wire dtype: B and T within the config's batch, H the
    model's, finite and within the value bound; received as float32. ``same_batch``: exactly the shape
    of the batch the exchange is about (the client's open batch; the command's ``hidden``)."""

    same_batch: bool = False


@dataclass(frozen=True)
class Mask(BatchTensor):
    """(B, T) attention mask of field ``like``'s batch, uint8 on the wire: 0 or 1, right-padded, each
    row starting with a real token."""

    like: str
    dtype: ClassVar[torch.dtype] = MASK_WIRE_DTYPE


@dataclass(frozen=True)
class Labels(BatchTensor):
    """(B, T) labels of field ``like``'s batch, int32 on the wire: -100 or a token id, at least one
    loss token. Sent in the two-part split only (the U-shape keeps labels on the client)."""

    like: str
    dtype: ClassVar[torch.dtype] = LABEL_WIRE_DTYPE


@dataclass(frozen=True)
class State(Kind):
    """A LoRA state, float32 on the wire: exactly the receiver's keys and shapes, finite, within the
    value bound. ``optional``: may be absent (None)."""

    optional: bool = False

    def nbytes(self, value, wire_dtype):
        return state_nbytes(value)


@dataclass(frozen=True)
class SecondMoments(State):
    """AdamW's second moments for a LoRA state: as :class:`State`, >= 0 and not held to the value
    bound (they are squared gradients)."""


@dataclass(frozen=True)
class FirstMoments(State):
    """AdamW's first moments for a LoRA state: as :class:`State`, and small enough for the second
    moments in field ``second`` to have come from the same gradients."""

    second: str = ""


@dataclass(frozen=True)
class Nested(Kind):
    """A message declared here (``cls``), checked as such; ``optional``: may be absent (None)."""

    cls: type
    optional: bool = False

    def nbytes(self, value, wire_dtype):
        return payload_nbytes(value, wire_dtype)


@dataclass(frozen=True)
class SecAggData(Kind):
    """A secure-aggregation stage's input, struct-packed by privacy/secagg.py (which parses and checks
    it): at most :data:`SECAGG_MAX_BYTES` but for a masked input. ``answer``: a client's answer,
    of the exact size its stage implies."""

    answer: bool = False

    def nbytes(self, value, wire_dtype):
        return len(value)


def wire(kind: Kind, default=MISSING):
    """A dataclass field that travels as ``kind``."""
    return dataclasses.field(default=default, metadata={"wire": kind})


def kinds(cls_or_msg) -> dict[str, Kind]:
    """Field name -> :class:`Kind` of a declared message (class or instance)."""
    return {f.name: f.metadata["wire"] for f in fields(cls_or_msg)}


# oneof field name in splitlora.proto -> message class
COMMANDS: dict[str, type] = {}  # Command.kind
REPLIES: dict[str, type] = {}  # ClientMessage.payload
REPLY_OF: dict[type, type] = {}  # command type -> the reply type it expects (absent: no reply)


def _declare(registry: dict[str, type], name: str, cls: type) -> type:
    if name in registry:
        raise ValueError(f"{name!r} already names {registry[name].__name__}")
    cls = dataclass(cls)
    missing = [f.name for f in fields(cls) if "wire" not in f.metadata]
    if missing:
        raise TypeError(f"{cls.__name__}: fields {missing} say nothing of how they travel (use wire(...))")
    cls.wire_name = name
    registry[name] = cls
    return cls


def command(name: str):
    """Declares a command, carried by the ``name`` field of splitlora.proto's ``Command.kind``."""
    return lambda cls: _declare(COMMANDS, name, cls)


def reply(name: str, answers: type):
    """Declares the reply to ``answers``, carried by the ``name`` field of ``ClientMessage.payload``."""

    def declare(cls):
        cls = _declare(REPLIES, name, cls)
        REPLY_OF[answers] = cls
        return cls

    return declare


# ---- server -> client -------------------------------------------------------------------------

@command("forward")
class Forward:
    step: int = wire(Count(STEPS))


@command("backward")
class Backward:
    step: int = wire(Count(STEPS))
    grad: torch.Tensor = wire(Hidden(same_batch=True))  # (B, T, H): dL/dh_K
    loss: float | None = wire(Real(flag="has_loss"), None)  # two-part: the server's batch loss (for logging)
    tokens: int | None = wire(Count(BATCH_TOKENS, flag="has_loss"), None)  # two-part: tokens that carried loss
    # U-shape: factor for the tail's LoRA gradients (this batch's share of the step's tokens)
    scale: float = wire(Real(when="u_shape"), 1.0)


@command("tail")
class Tail:
    step: int = wire(Count(STEPS))
    hidden: torch.Tensor = wire(Hidden(same_batch=True))  # (B, T, H): h_(L-T)


@command("local_step")
class LocalStep:
    step: int = wire(Count(STEPS))


@command("upload")
class Upload:
    round: int = wire(Count(STEPS))


@command("load")
class Load:
    round: int = wire(Count(STEPS))
    state: dict[str, torch.Tensor] | None = wire(State(optional=True))  # None: not aggregated; keep the local adapter
    keep_from: int = wire(Count(STEPS), 0)  # the step the server's last checkpoint resumes at (older snapshots can go)


@command("hand_out")
class HandOut:
    step: int = wire(Count(STEPS))


@reply("handover", answers=HandOut)
class Handover:
    """``sl``: the client-side adapter with its AdamW moments, handed from one data owner to the next."""

    state: dict[str, torch.Tensor] = wire(State())
    exp_avg: dict[str, torch.Tensor] = wire(FirstMoments(second="exp_avg_sq"))
    exp_avg_sq: dict[str, torch.Tensor] = wire(SecondMoments())
    opt_steps: int = wire(Count(STEPS))  # optimiser (and schedule) steps taken so far


@command("hand_in")
class HandIn:
    step: int = wire(Count(STEPS))
    handover: Handover = wire(Nested(Handover))


@command("sync")
class Sync:
    """Line up with the run: the next step is ``step``; this client has drawn ``batches`` batches
    before it. ``state`` (adapter) and ``handover`` (``sl``: adapter and optimiser) are optional."""

    step: int = wire(Count(STEPS))
    batches: int = wire(Count(STEPS))
    round: int = wire(Count(STEPS), 0)
    state: dict[str, torch.Tensor] | None = wire(State(optional=True), None)
    handover: Handover | None = wire(Nested(Handover, optional=True), None)


@command("finish")
class Finish:
    stop: bool = wire(Flag(), False)  # True: the server stops before the end (it may be resumed)
    reason: str = wire(Text(500), "")


@command("secagg")
class SecAgg:
    """Stage ``stage`` (keys, share, mask, unmask) of secure-aggregation round ``round``; ``data``: the
    stage's input, struct-packed by :mod:`splitlora.privacy.secagg` (replaces Upload when on)."""

    round: int = wire(Count(STEPS))
    stage: str = wire(Choice(SECAGG_STAGES))
    data: bytes = wire(SecAggData(), b"")


# ---- client -> server -------------------------------------------------------------------------

@reply("activations", answers=Forward)
class Activations:
    step: int = wire(Count(equals=ASKED))
    hidden: torch.Tensor = wire(Hidden())  # (B, T, H): h_K, the "smashed data"
    attention_mask: torch.Tensor = wire(Mask("hidden"))  # (B, T), right-padded
    labels: torch.Tensor | None = wire(Labels("hidden"), None)  # (B, T), -100 where no loss; None in the U-shape


@reply("tail_grad", answers=Tail)
class TailGrad:
    step: int = wire(Count(equals=ASKED))
    grad: torch.Tensor = wire(Hidden(same_batch=True))  # (B, T, H): dL/dh_(L-T) of the batch's mean token loss L
    loss: float = wire(Real())  # L (for logging)
    tokens: int = wire(Count(LOSS_TOKENS))  # tokens that carried loss (weights the batch in a batched server step)


@reply("step_done", answers=LocalStep)
class StepDone:
    step: int = wire(Count(equals=ASKED))
    loss: float = wire(Real())
    tokens: int = wire(Count(BATCH_TOKENS))


@reply("adapter", answers=Upload)
class AdapterUpdate:
    round: int = wire(Count(equals=ASKED))
    state: dict[str, torch.Tensor] = wire(State())
    num_samples: int = wire(Count(equals=HELLO))


@reply("secagg", answers=SecAgg)
class SecAggReply:
    round: int = wire(Count(equals=ASKED))
    stage: str = wire(Choice(SECAGG_STAGES, equals=ASKED))
    data: bytes = wire(SecAggData(answer=True))


Command = Union[tuple(COMMANDS.values())]
Reply = Union[tuple(REPLIES.values())]


# ---- bytes, as they would cross the wire ------------------------------------------------------

def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_nbytes(state: dict[str, torch.Tensor] | None) -> int:
    return sum(t.numel() * STATE_WIRE_DTYPE.itemsize for t in (state or {}).values())


def payload_nbytes(msg, wire_dtype: torch.dtype) -> int:
    """Tensor bytes ``msg`` puts on the wire: activations and gradients in the wire dtype, masks as
    uint8, labels as int32, adapters and moments as fp32. Framing is not counted."""
    return sum(kind.nbytes(value, wire_dtype) for name, kind in kinds(msg).items()
               if (value := getattr(msg, name)) is not None)


def wire_precision(msg, wire_dtype: torch.dtype):
    """``msg`` with its activation/gradient tensors rounded through ``wire_dtype`` (what the receiver
    of a network message gets), so that simulation computes with deployment's precision."""
    changes = {name: t.to(wire_dtype).to(t.dtype) for name, kind in kinds(msg).items() if isinstance(kind, Hidden)
               and isinstance(t := getattr(msg, name), torch.Tensor) and t.dtype != wire_dtype}
    return dataclasses.replace(msg, **changes) if changes else msg


__all__ = [n for n in dir() if not n.startswith("_") and n not in ("annotations", "dataclass", "dataclasses", "fields",
                                                                    "torch", "ClassVar", "Union", "MISSING")]
