"""LoRA on either side of the cut through PEFT, and the one whole-model PEFT adapter a run produces."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from ..config import LoraSide, RunConfig
from .precision import keep_lora_fp32
from .split import Architecture, Split, architecture_of, make_part

PEFT_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names the keys
ADAPTER_NAME = "default"


def split_of(cfg: RunConfig) -> Split:
    return Split(cfg.cut_layer, cfg.tail)


def lora_key(param_name: str) -> str:
    """A LoRA parameter's key in the saved state (PEFT drops the adapter name)."""
    return param_name.replace(f".{ADAPTER_NAME}.", ".")


def side_lora_config(side: LoraSide, arch: Architecture) -> LoraConfig:
    return LoraConfig(r=side.rank, lora_alpha=side.alpha, lora_dropout=side.dropout,
                      target_modules=list(side.target_modules or arch.lora_targets), bias="none",
                      fan_in_fan_out=arch.fan_in_fan_out, task_type="CAUSAL_LM")


def whole_lora_config(model: nn.Module, cfg: RunConfig) -> LoraConfig:
    """The LoRA config of the unsplit model: client settings below the cut, server settings above.

    When both sides agree this is the plain config a PEFT user would write. When they differ, the
    per-module differences go into PEFT's ``rank_pattern``/``alpha_pattern`` and explicit module names.
    """
    arch = architecture_of(model)
    client, server = cfg.client_lora, cfg.server_lora
    if client == server:
        return side_lora_config(client, arch)
    names = {side: _target_names(model, cfg, side) for side in ("client", "server")}
    base = side_lora_config(client, arch)
    base.target_modules = sorted(names["client"] | names["server"])
    base.rank_pattern = {f"^{name}$": server.rank for name in sorted(names["server"]) if server.rank != client.rank}
    base.alpha_pattern = {f"^{name}$": server.alpha for name in sorted(names["server"])
                          if server.alpha != client.alpha}
    return base


def _target_names(model: nn.Module, cfg: RunConfig, side: str) -> set[str]:
    arch = architecture_of(model)
    lora = cfg.client_lora if side == "client" else cfg.server_lora
    suffixes = tuple(lora.target_modules or arch.lora_targets)
    part = make_part(model, side, split_of(cfg))
    return {name for name, _ in part.named_modules() if name.rsplit(".", 1)[-1] in suffixes}


def add_lora(part: nn.Module, config: LoraConfig) -> nn.Module:
    """Inject LoRA into ``part`` in place; only LoRA tensors stay trainable."""
    inject_adapter_in_model(config, part)
    keep_lora_fp32(part)
    for name, param in part.named_parameters():
        param.requires_grad_("lora_" in name)
    return part


def lora_state(part: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors of ``part`` in PEFT's saved naming (without the ``base_model.model.`` prefix)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(part).items()}


def load_lora_state(part: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load those of ``state``'s tensors that belong to ``part``; every LoRA tensor must be covered."""
    own = get_peft_model_state_dict(part).keys()
    missing = [k for k in own if k not in state]
    if missing:
        raise KeyError(f"adapter state lacks {len(missing)} tensors, e.g. {missing[0]}")
    with torch.no_grad():
        set_peft_model_state_dict(part, {k: state[k] for k in own})


def initial_lora_state(model: nn.Module, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """The whole model's LoRA initialisation for ``cfg.seed`` (PEFT's own init; B = 0).

    Every algorithm starts every party from slices of this one state, so that ``splitlora`` with one
    client and ``cen`` start identically, and FedAvg starts from one global adapter.
    """
    whole = make_part(model, "whole", split_of(cfg))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        add_lora(whole, whole_lora_config(model, cfg))
    return lora_state(whole)


def save_adapter(state: dict[str, torch.Tensor], config: LoraConfig, base_path: str, out_dir: str | Path) -> Path:
    """Write one standard PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = copy.copy(config)
    config.base_model_name_or_path = base_path
    source = Path(base_path) / "splitlora_source.json"  # a converted base: name what it was made from
    if source.is_file():
        info = json.loads(source.read_text())
        config.base_model_name_or_path, config.revision = info["hub_id"], info.get("revision")
        (out / "base_model.json").write_text(json.dumps({**info, "local_path": str(base_path)}, indent=2) + "\n")
    config.save_pretrained(str(out))
    tensors = {PEFT_PREFIX + k: v.detach().to(torch.float32).contiguous() for k, v in sorted(state.items())}
    tmp = out / "adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "adapter_model.safetensors")
    return out


