"""Where a party's share of the model comes from.

* :class:`SharedModel` (simulation): one loaded model; every part is a skeleton copy sharing its
  frozen tensors, so N simulated clients cost one model.
* :class:`LeanModel` (deployment): the whole model exists only on the ``meta`` device; a part's
  tensors are read from the safetensors checkpoint when it is asked for, and nothing else is.

Both hand out parts with the whole model's module names, so LoRA keys and the adapter a run
writes are the same whichever way a party was built.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import RunConfig
from .loading import LoadedModel
from .lora import add_lora, initial_lora_state, load_lora_state, side_lora_config, split_of, whole_lora_config
from .precision import cast_base, enable_checkpointing, party_dtype, party_quantize
from .split import architecture_of, check_cut, make_part


class ModelSource:
    """What every source offers: the HF config, the tokenizer, the base path, parts and the init."""

    config = None
    tokenizer = None
    base_path: str = ""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.split = split_of(cfg)

    def part(self, side: str) -> nn.Module:
        raise NotImplementedError

    def skeleton(self) -> nn.Module:
        """The whole model's module tree (for shapes and LoRA configs; its tensors may be absent)."""
        raise NotImplementedError

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The run's one initial adapter of the whole model (PEFT's init for ``cfg.seed``)."""
        raise NotImplementedError

    def lora_config(self, side: str):
        if side == "whole":
            return whole_lora_config(self.skeleton(), self.cfg)
        lora = self.cfg.client_lora if side == "client" else self.cfg.server_lora
        return side_lora_config(lora, architecture_of(self.skeleton()))

    def lora_part(self, side: str, state: dict[str, torch.Tensor] | None = None,
                  device: torch.device | str = "cpu") -> nn.Module:
        """``part(side)`` with that side's LoRA, loaded from ``state`` (default: the initial adapter;
        ``{}``: PEFT's own init, for a party whose state will come over the network). The server's
        part goes where ``cfg.server_device_map`` says, when it says (see :mod:`.placement`)."""
        part = self.part(side)
        if party_quantize(self.cfg, side):
            from .quantize import quantize_base

            quantize_base(part, party_quantize(self.cfg, side), device)
        add_lora(part, self.lora_config(side))
        if self.cfg.gradient_checkpointing:
            enable_checkpointing(part)
        if side == "server" and self.cfg.server_device_map:
            from .placement import place

            place(part, self.cfg.server_device_map)  # its blocks across devices (accelerate)
        else:
            part.to(device)
        state = self.initial_state() if state is None else state
        if state:
            load_lora_state(part, state)
        return part

    @property
    def pad_id(self) -> int:
        return self.config.pad_token_id

    @property
    def num_blocks(self) -> int:
        from .split import num_blocks

        return num_blocks(self.skeleton())


class SharedModel(ModelSource):
    """Simulation: parts share the tensors of one loaded, frozen model."""

    def __init__(self, loaded: LoadedModel, cfg: RunConfig, device: torch.device | str = "cpu"):
        super().__init__(cfg)
        # One model per dtype the parties use (clients and server may differ); ``model`` is the
        # clients' (and the whole model's). The caller's model is never cast: a dtype it is not in is
        # a cast copy (``build_simulation`` loads it in the parties' dtype when they agree, else in
        # fp32, so that no party's copy is cast from a lower precision than the file's).
        wanted = [party_dtype(cfg, "client")]
        wanted += [d for d in [party_dtype(cfg, "server")] if d not in wanted]
        own = loaded.model.dtype
        self.models: dict[torch.dtype, nn.Module] = {}
        for dtype in wanted:
            model = loaded.model if dtype == own else cast_base(copy.deepcopy(loaded.model), dtype)
            self.models[dtype] = model.to(device)
            self.models[dtype].requires_grad_(False)
        self.model = self.models[wanted[0]]
        check_cut(self.model, self.split)
        self.tokenizer, self.base_path, self.config = loaded.tokenizer, loaded.base_path, self.model.config
        self._init = None

    def part(self, side: str) -> nn.Module:
        return make_part(self.models[party_dtype(self.cfg, side)], side, self.split)

    def skeleton(self) -> nn.Module:
        return self.model

    def initial_state(self):
        if self._init is None:
            # PEFT initialises LoRA in the base's dtype: the run's one initial adapter is drawn on an
            # fp32 skeleton (LoRA's init reads only shapes), whatever the parties' dtypes.
            base = self.model if self.model.dtype == torch.float32 else fp32_skeleton(self.model)
            self._init = initial_lora_state(base, self.cfg)
        return self._init


class LeanModel(ModelSource):
    """Deployment: only the asked-for side's tensors are ever read (see :mod:`splitlora.models.lean`)."""

    def __init__(self, name: str, cfg: RunConfig):
        from .lean import lean_skeleton

        super().__init__(cfg)
        self.meta, self.tokenizer, self.index = lean_skeleton(name)
        check_cut(self.meta, self.split)
        self.config = self.meta.config
        from .loading import resolve_model

        self.base_path = str(resolve_model(name))  # a hub id stays a hub id in the adapter's config
        self._init = None

    def part(self, side: str) -> nn.Module:
        from .lean import lean_part

        return lean_part(self.meta, self.index, side, self.split, party_dtype(self.cfg, side),
                         party_quantize(self.cfg, side))

    def skeleton(self) -> nn.Module:
        return self.meta

    def fingerprint(self, side: str) -> str:
        """sha256 of ``side``'s frozen tensors as stored, read one at a time (never all held)."""
        from .lean import file_keys

        return self.index.fingerprint(file_keys(make_part(self.meta, side, self.split), self.meta, self.index))

    def initial_state(self):
        if self._init is None:
            # LoRA's init reads only shapes: inject it into a tensor-less CPU copy of the skeleton.
            # ``to_empty`` allocates without writing, so the untouched pages never become resident.
            empty = fp32_skeleton(self.meta)
            self._init = initial_lora_state(empty, self.cfg)
            del empty
        return self._init


def fp32_skeleton(model: nn.Module) -> nn.Module:
    """An fp32 copy of ``model``'s module tree whose tensors are allocated but never written
    (``to_empty``: the untouched pages never become resident)."""
    if all(t.is_meta for t in model.parameters()):
        meta = copy.deepcopy(model)
    else:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    return meta.float().to_empty(device="cpu")
