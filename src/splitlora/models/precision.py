"""Each party's precision and activation memory: the dtype of its frozen base and compute, and
activation checkpointing of its blocks.

As PEFT keeps them, the LoRA weights (and so their gradients and AdamW's state) stay fp32 whatever
the base's dtype: PEFT's LoRA layer casts its input to the adapter's dtype and its output back to the
base's, so a bf16 base with an fp32 adapter needs no autocast. fp16 adds a loss scaler (see
:class:`splitlora.runtime.optim.Optimizer`). The wire dtype is independent of all this.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import RunConfig

TORCH_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def party_dtype(cfg: RunConfig, side: str) -> torch.dtype:
    """The dtype of ``side``'s frozen base ("server": ``server_dtype``, else ``dtype``)."""
    name = cfg.server_dtype if side == "server" and cfg.server_dtype else cfg.dtype
    return TORCH_DTYPES[name]


def party_quantize(cfg: RunConfig, side: str) -> str | None:
    return cfg.server_quantize if side == "server" else cfg.quantize


def is_lora(name: str) -> bool:
    return "lora_" in name


def keep_lora_fp32(part: nn.Module) -> None:
    """PEFT creates the adapter in the base layer's dtype; put it back in fp32 (as ``get_peft_model``'s
    ``autocast_adapter_dtype`` does), so that a low-precision base never rounds the trained weights."""
    for name, p in part.named_parameters():
        if is_lora(name) and p.dtype != torch.float32:
            p.data = p.data.float()


def compute_dtype(part: nn.Module) -> torch.dtype:
    """The dtype ``part`` computes in: that of its first floating, frozen (non-LoRA) tensor."""
    for name, p in part.named_parameters():
        if not is_lora(name) and p.is_floating_point():
            return p.dtype
    return torch.float32


def enable_checkpointing(part: nn.Module) -> None:
    """Recompute each block in backward (transformers' own per-block checkpointing of its
    ``GradientCheckpointingLayer`` blocks, non-reentrant): a party then keeps one block's activations
    and each block's input instead of every block's activations. A part is a ``PreTrainedModel``
    skeleton, so the switch reaches exactly the blocks it holds; the RNG state is replayed, so LoRA
    dropout draws the same mask twice."""
    part.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def cast_base(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``model``'s floating parameters to ``dtype`` in place. Buffers keep their dtype (the
    rotary frequencies stay fp32), as ``from_pretrained(dtype=...)`` leaves them."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def load_dtype(cfg: RunConfig) -> torch.dtype:
    """The dtype to load a simulation's one model in: the parties' if they agree, else fp32 (each
    party's copy is then cast from full precision, as a deployed party reads it from the file)."""
    client, server = party_dtype(cfg, "client"), party_dtype(cfg, "server")
    return client if client == server else torch.float32
