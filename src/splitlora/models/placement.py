"""The server part across devices: its blocks placed with an ``accelerate`` device map.

``server_device_map`` names one of accelerate's strategies (``auto``, ``balanced``,
``balanced_low_0``, ``sequential``: :func:`accelerate.infer_auto_device_map` over the visible GPUs,
blocks kept whole) or gives ``{module: device}`` itself. :func:`accelerate.dispatch_model` then moves
each module to its device and hooks it so that its inputs follow it there; the server's step is the
same code either way (``server_forward`` runs the blocks in order, each on its own device). The LoRA
tensors sit inside the blocks, so they, their gradients and their optimiser state live where their
block does.

A module mapped to ``cpu`` beside GPUs would be *offloaded* by accelerate (its weights copied in for
each forward), which loses a trained adapter's updates; such a map is refused, as is ``disk``.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..config import parse_device_map
from ..errors import UserError
from .split import architecture_of


def block_classes(part: nn.Module) -> list[str]:
    """Class names of the part's blocks: what a device map must not cut through."""
    blocks = part.get_submodule(architecture_of(part).layers)
    return sorted({type(b).__name__ for b in blocks.values()})


def device_map_for(part: nn.Module, spec: str) -> dict[str, str | int]:
    """``{module: device}`` for ``part`` from ``spec`` (a strategy, or ``MODULE=DEVICE,...``)."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    parsed = parse_device_map(spec)
    if isinstance(parsed, dict):
        return parsed
    no_split = block_classes(part)
    max_memory = None
    if parsed != "sequential" and torch.cuda.device_count() > 1:
        max_memory = get_balanced_memory(part, no_split_module_classes=no_split,
                                         low_zero=parsed == "balanced_low_0")
    with _quiet():  # "weights are not tied": the server's head is tied to the client's embeddings
        return infer_auto_device_map(part, max_memory=max_memory, no_split_module_classes=no_split)


def place(part: nn.Module, spec: str) -> nn.Module:
    """Dispatch ``part`` (with its LoRA) over devices by ``spec``; ``part.hf_device_map`` records where."""
    from accelerate import dispatch_model

    device_map = device_map_for(part, spec)
    devices = {str(d) for d in device_map.values()}
    if "disk" in devices or ("cpu" in devices and len(devices) > 1):
        raise UserError(f"server_device_map {spec!r} would offload server modules to the CPU or disk "
                        f"({_short(device_map)}): the server part does not fit the GPUs (add --server-gpus, "
                        f"or give a map of GPUs only)")
    for d in devices:
        if d != "cpu":
            index = int(d.split(":")[1]) if ":" in d else (int(d) if d.isdigit() else 0)
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise UserError(f"server_device_map: device {d} is not available here "
                                f"({torch.cuda.device_count()} GPUs visible)")
    try:
        with _quiet():  # on an all-CPU map accelerate warns of an offload that does not happen
            dispatch_model(part, device_map, main_device="cpu" if devices == {"cpu"} else None, force_hooks=True)
    except ValueError as exc:  # e.g. a map that does not cover every tensor
        raise UserError(f"server_device_map {spec!r}: {str(exc).splitlines()[0]}") from None
    part.hf_device_map = dict(device_map)
    return part


@contextlib.contextmanager
def _quiet():
    import logging
    import warnings

    logger = logging.getLogger("accelerate")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _short(device_map: dict) -> str:
    items = [f"{k or '(all)'}={v}" for k, v in device_map.items()]
    return ", ".join(items[:4]) + (", ..." if len(items) > 4 else "")
