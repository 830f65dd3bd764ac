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
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

# name -> dtype of activations and gradients on the wire (the one registry of wire dtypes)
WIRE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Masks and labels travel compactly; labels need int32 for vocabularies beyond 32k and -100.
MASK_WIRE_DTYPE = torch.uint8
LABEL_WIRE_DTYPE = torch.int32
STATE_WIRE_DTYPE = torch.float32  # adapters and optimiser moments


# ---- server -> client -------------------------------------------------------------------------

@dataclass
class Forward:
    step: int


@dataclass
class Backward:
    step: int
    grad: torch.Tensor  # (B, T, H): dL/dh_K
    loss: float | None = None  # two-part: the server's batch loss (for logging)
    tokens: int | None = None  # two-part: completion tokens that carried loss
    scale: float = 1.0  # U-shape: factor for the tail's LoRA gradients (this batch's share of the step's tokens)


@dataclass
class Tail:
    step: int
    hidden: torch.Tensor  # (B, T, H): h_(L-T)


@dataclass
class LocalStep:
    step: int


@dataclass
class Upload:
    round: int


@dataclass
class Load:
    round: int
    state: dict[str, torch.Tensor] | None  # None: the round was not aggregated; keep the local adapter
    keep_from: int = 0  # the step the server's last checkpoint resumes at (older snapshots can go)


@dataclass
class HandOut:
    step: int


@dataclass
class Handover:
    """``sl``: the client-side adapter with its AdamW moments, handed from one data owner to the next."""

    state: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    opt_steps: int  # optimiser (and schedule) steps taken so far


@dataclass
class HandIn:
    step: int
    handover: Handover


@dataclass
class Sync:
    """Line up with the run: the next step is ``step``; this client has drawn ``batches`` batches
    before it. ``state`` (adapter) and ``handover`` (``sl``: adapter and optimiser) are optional."""

    step: int
    batches: int
    round: int = 0
    state: dict[str, torch.Tensor] | None = None
    handover: Handover | None = None


@dataclass
class Finish:
    stop: bool = False  # True: the server stops before the end (it may be resumed)
    reason: str = ""


@dataclass
class SecAgg:
    """Stage ``stage`` (keys, share, mask, unmask) of secure-aggregation round ``round``; ``data``: the
    stage's input, struct-packed by :mod:`splitlora.privacy.secagg` (replaces Upload when on)."""

    round: int
    stage: str
    data: bytes = b""


# ---- client -> server -------------------------------------------------------------------------

@dataclass
class Activations:
    step: int
    hidden: torch.Tensor  # (B, T, H): h_K, the "smashed data"
    attention_mask: torch.Tensor  # (B, T), right-padded
    labels: torch.Tensor | None = None  # (B, T), -100 where no loss; None in the U-shape (labels stay home)


@dataclass
class TailGrad:
    step: int
    grad: torch.Tensor  # (B, T, H): dL/dh_(L-T) of the batch's mean token loss L
    loss: float  # L (for logging)
    tokens: int  # completion tokens that carried loss (weights the batch in a batched server step)


@dataclass
class StepDone:
    step: int
    loss: float
    tokens: int


@dataclass
class AdapterUpdate:
    round: int
    state: dict[str, torch.Tensor]
    num_samples: int


@dataclass
class SecAggReply:
    round: int
    stage: str
    data: bytes


Command = Sync | Forward | Backward | Tail | LocalStep | Upload | Load | HandOut | HandIn | Finish | SecAgg
Reply = Activations | TailGrad | StepDone | AdapterUpdate | Handover | SecAggReply

# command type -> the reply type it expects (absent: no reply)
REPLY_OF: dict[type, type] = {Forward: Activations, Tail: TailGrad, LocalStep: StepDone, Upload: AdapterUpdate,
                              HandOut: Handover, SecAgg: SecAggReply}


# ---- bytes, as they would cross the wire ------------------------------------------------------

def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_nbytes(state: dict[str, torch.Tensor] | None) -> int:
    return sum(t.numel() * STATE_WIRE_DTYPE.itemsize for t in (state or {}).values())


def payload_nbytes(msg, wire_dtype: torch.dtype) -> int:
    """Tensor bytes ``msg`` puts on the wire: activations and gradients in the wire dtype, masks as
    uint8, labels as int32, adapters and moments as fp32. Framing is not counted."""
    total = 0
    for f in fields(msg):
        value = getattr(msg, f.name)
        if isinstance(value, torch.Tensor):
            itemsize = {"attention_mask": MASK_WIRE_DTYPE, "labels": LABEL_WIRE_DTYPE}.get(f.name, wire_dtype).itemsize
            total += value.numel() * itemsize
        elif isinstance(value, dict):
            total += state_nbytes(value)
        elif isinstance(value, Handover):
            total += payload_nbytes(value, wire_dtype)
        elif isinstance(value, bytes):
            total += len(value)
    return total


def wire_precision(msg, wire_dtype: torch.dtype):
    """``msg`` with its activation/gradient tensors rounded through ``wire_dtype`` (what the receiver
    of a network message gets), so that simulation computes with deployment's precision."""
    changes = {}
    for name in ("hidden", "grad"):
        t = getattr(msg, name, None)
        if isinstance(t, torch.Tensor) and t.dtype != wire_dtype:
            changes[name] = t.to(wire_dtype).to(t.dtype)
    if not changes:
        return msg
    import dataclasses

    return dataclasses.replace(msg, **changes)


__all__ = [n for n in dir() if not n.startswith("_") and n not in ("annotations", "dataclass", "field", "fields",
                                                                    "torch")]
