"""A party's frozen base quantized with bitsandbytes (QLoRA): NF4 (4-bit) or LLM.int8 (8-bit).

The linear layers inside the party's blocks become ``bnb.nn.Linear4bit`` / ``Linear8bitLt`` with
their weights quantized; embeddings, norms and the LM head stay in the party's dtype (as
transformers' ``BitsAndBytesConfig`` leaves ``lm_head``). PEFT then wraps the quantized layers with
its own bitsandbytes LoRA layers, whose adapter stays fp32. bitsandbytes >= 0.49 quantizes and
computes on the CPU too (its CPU backend), so a data owner without a GPU can hold a 4-bit bottom.

transformers' ``replace_with_bnb_linear`` builds empty layers for ``from_pretrained``'s loader to
fill; a part here already holds its weights (or was read lean), so each layer is swapped and
quantized here, one at a time: the part's full-precision copy of a layer is freed as it goes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError
from .precision import compute_dtype
from .split import architecture_of


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError("quantize needs bitsandbytes (pip install 'splitlora[quant]')") from None
    return bnb


def quantized_layer(linear: nn.Linear, kind: str, dtype: torch.dtype, device) -> nn.Module:
    bnb = _bnb()
    weight = linear.weight.data
    if kind == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=dtype, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    elif kind == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        raise UserError(f"quantize must be nf4 or int8 (got {kind!r})")
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return q.to(device)  # bitsandbytes quantizes the weight as it moves it


def quantize_base(part: nn.Module, kind: str, device) -> nn.Module:
    """Swap every ``nn.Linear`` of ``part``'s blocks for its quantized counterpart, in place."""
    arch = architecture_of(part)
    if arch.fan_in_fan_out:
        raise UserError(f"quantize: {part.config.model_type}'s Conv1D layers are not supported by bitsandbytes "
                        "(use a Llama-family model, or no quantization)")
    dtype = compute_dtype(part)
    blocks = part.get_submodule(arch.layers)
    for block in blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks:
        quantize_block(block, kind, dtype, device)
    return part


def quantize_block(block: nn.Module, kind: str, dtype: torch.dtype, device) -> None:
    """Swap ``block``'s ``nn.Linear`` layers (with real weights) for quantized ones, in place."""
    for name, module in list(block.named_modules()):
        if type(module) is nn.Linear and not module.weight.is_meta:
            parent, _, attr = name.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, attr, quantized_layer(module, kind, dtype, device))
