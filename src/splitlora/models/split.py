"""Cut a Hugging Face decoder-only causal LM after block K into a client part and a server part.

The per-family differences live in one table, :data:`ARCHITECTURES`: where the embeddings, blocks,
final norm and head sit, whether positions are learned (GPT-2) or rotary (Llama family). To add a
family, add one row (and a tiny config to ``tests/test_split.py``).

A part is a copy of the model's module *skeleton* with the other side's modules removed. Copies share
the frozen base tensors (so N simulated clients cost one model), and module paths stay those of the
whole model, so each side's LoRA keys are already the keys of one whole-model PEFT adapter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from ..errors import UserError
from ..registry import ARCHITECTURES as REGISTERED


@dataclass(frozen=True)
class Architecture:
    """Where a family keeps its pieces (dotted paths inside the ``*ForCausalLM`` model)."""

    embed: str
    layers: str
    norm: str
    head: str = "lm_head"
    positions: str | None = None  # learned absolute position embeddings, added to token embeddings
    embed_dropout: str | None = None
    rotary: str | None = None  # rotary embedding module: (cos, sin) passed to every block
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    fan_in_fan_out: bool = False  # GPT-2's Conv1D stores weights transposed

    @property
    def client_only(self) -> tuple[str, ...]:
        return tuple(p for p in (self.embed, self.positions, self.embed_dropout) if p)

    @property
    def server_only(self) -> tuple[str, ...]:
        return (self.norm, self.head)


_GPT2 = Architecture(embed="transformer.wte", positions="transformer.wpe", embed_dropout="transformer.drop",
                     layers="transformer.h", norm="transformer.ln_f", lora_targets=("c_attn",),
                     fan_in_fan_out=True)
_LLAMA = Architecture(embed="model.embed_tokens", rotary="model.rotary_emb", layers="model.layers",
                      norm="model.norm")

# config.model_type -> Architecture. Add a family here.
ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": _GPT2,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
}


def architecture_of(model: PreTrainedModel) -> Architecture:
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES and model_type in REGISTERED:  # splitlora.register_architecture
        return REGISTERED[model_type]
    if model_type not in ARCHITECTURES:
        raise UserError(f"model type {model_type!r} is not supported yet (supported: "
                        f"{', '.join(sorted(ARCHITECTURES))}); add it to splitlora/models/split.py")
    return ARCHITECTURES[model_type]


def num_blocks(model: PreTrainedModel) -> int:
    return len(_get(model, architecture_of(model).layers))


@dataclass(frozen=True)
class Split:
    """Where the model is cut. ``tail`` None: the paper's two-part split (the server runs blocks K..L-1,
    the norm and the head); ``tail`` T >= 0: the U-shape (the client also runs blocks L-T..L-1, the
    norm and the head, so labels and logits never leave it; the server runs blocks K..L-T-1)."""

    cut: int
    tail: int | None = None

    @property
    def u_shape(self) -> bool:
        return self.tail is not None

    def blocks(self, side: str, n: int) -> range | list[int]:
        if side == "whole":
            return range(n)
        if side == "client":
            return list(range(self.cut)) + (list(range(n - self.tail, n)) if self.u_shape else [])
        return range(self.cut, n - (self.tail or 0))

    def check(self, n: int) -> None:
        if not 1 <= self.cut < n:
            raise UserError(f"cut_layer must be between 1 and {n - 1} for this model ({n} blocks), got {self.cut}")
        if self.u_shape and (self.tail < 0 or self.cut + self.tail >= n):
            raise UserError(f"with the U-shape, cut_layer + tail_layers must be below {n} (this model's blocks) so "
                            f"that the server runs at least one block; got {self.cut} + {self.tail}")


def as_split(split: "Split | int") -> Split:
    return split if isinstance(split, Split) else Split(int(split))


def check_cut(model: PreTrainedModel, split: "Split | int") -> None:
    as_split(split).check(num_blocks(model))


# ---- module surgery ---------------------------------------------------------------------------

def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def _set(root: nn.Module, path: str, value: nn.Module | None) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, value)


def share_copy(module: nn.Module) -> nn.Module:
    """Copy a module tree but not its tensors: the copy's parameters *are* the original's."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


class OtherSide(nn.Module):
    """Stands where a module of the other side was: holds nothing, refuses to run."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("this module lives on the other side of the cut")


def make_part(model: PreTrainedModel, side: str, split: "Split | int") -> nn.Module:
    """A skeleton copy of ``model`` holding only the modules of ``side`` ("client", "server" or "whole").

    Blocks are kept in an ``nn.ModuleDict`` keyed by their original index, so module names (and LoRA
    keys) match the whole model: the server's first block is still ``...layers.K``. In the U-shape the
    client holds the embeddings, blocks 0..K-1, blocks L-T..L-1, the norm and the head; the server
    holds only the middle blocks.
    """
    if side not in ("client", "server", "whole"):
        raise ValueError(f"side must be client, server or whole (got {side!r})")
    arch = architecture_of(model)
    part = share_copy(model)
    if side == "whole":
        return part
    split = as_split(split)
    check_cut(model, split)
    blocks = _get(part, arch.layers)
    keep = split.blocks(side, len(blocks))
    _set(part, arch.layers, nn.ModuleDict({str(i): blocks[i] for i in keep}))
    if side == "client":
        gone = () if split.u_shape else arch.server_only
    else:
        gone = arch.client_only + (arch.server_only if split.u_shape else ())
    for path in gone:
        _set(part, path, OtherSide())
    return part


# ---- forward passes ---------------------------------------------------------------------------

def _masks(config, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> dict:
    """The 4-D masks each block kind needs, built by transformers exactly as the whole model does."""
    kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
                  position_ids=position_ids)
    kinds = set(getattr(config, "layer_types", None) or [])
    masks = {"full_attention": create_causal_mask(**kwargs)}
    if "sliding_attention" in kinds or (not kinds and getattr(config, "sliding_window", None) is not None):
        masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
    return masks


def _layer_kind(config, index: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"


def run_blocks(part: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int = 0,
               stop: int | None = None) -> torch.Tensor:
    """Run the blocks ``part`` holds with index in [start, stop), in order, with the masks, positions
    and rotary set up here.

    Right-padded batches: positions are 0..T-1 for every row (as in the unsplit model), and padded
    keys are masked by ``attention_mask``.
    """
    arch = architecture_of(part)
    config = part.config
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    masks = _masks(config, hidden, attention_mask, position_ids)
    extra = {}
    if arch.rotary:
        extra["position_embeddings"] = _get(part, arch.rotary)(hidden, position_ids=position_ids)
    blocks = _get(part, arch.layers)
    named = blocks.items() if isinstance(blocks, nn.ModuleDict) else enumerate(blocks)  # a part, or the whole
    for name, block in named:
        if int(name) < start or (stop is not None and int(name) >= stop):
            continue
        out = block(hidden, attention_mask=masks[_layer_kind(config, int(name))], position_ids=position_ids,
                    **extra)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def client_forward(part: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   cut: int | None = None) -> torch.Tensor:
    """Embeddings and blocks 0..K-1 (``cut`` = K; needed when the part also holds a tail): the
    activations ("smashed data") sent to the server."""
    arch = architecture_of(part)
    if cut is None and not isinstance(_get(part, arch.head), OtherSide):
        raise ValueError("this part also holds the tail (U-shape, or the whole model): pass cut")
    hidden = _get(part, arch.embed)(input_ids)
    if arch.positions:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = hidden + _get(part, arch.positions)(position_ids)
    if arch.embed_dropout:
        hidden = _get(part, arch.embed_dropout)(hidden)
    return run_blocks(part, hidden, attention_mask, stop=cut)


def server_forward(part: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The server's blocks; in the two-part split also the final norm and the LM head (logits)."""
    arch = architecture_of(part)
    hidden = run_blocks(part, hidden, attention_mask)
    if isinstance(_get(part, arch.head), OtherSide):  # U-shape: the head is the client's
        return hidden
    return _get(part, arch.head)(_get(part, arch.norm)(hidden))


def tail_forward(part: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
    """U-shape, on the client: blocks ``start``..L-1 (``start`` = L-T), the final norm and the head: logits."""
    arch = architecture_of(part)
    hidden = run_blocks(part, hidden, attention_mask, start=start)
    return _get(part, arch.head)(_get(part, arch.norm)(hidden))
