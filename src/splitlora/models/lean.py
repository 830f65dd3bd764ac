"""Load only the weights one side of the cut holds, with no whole-model transient.

``load_model`` materialises the whole model, which is right for simulation (every simulated party
shares it) but not for a deployed party: a data owner's small device must never hold the server's
blocks, nor the server the clients'. Here the model skeleton is built on the ``meta`` device (no
memory), the part is cut from it (``make_part``), and only that part's tensors are read from the
safetensors file, with plain file reads straight into their final buffers (no mmap, so no file
pages are counted in the process's memory). Non-persistent buffers (rotary frequencies) are
recomputed as transformers itself does after a meta-device load.
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import UserError
from .loading import cached_target, resolve_model
from .split import Split, make_part

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class SafetensorsIndex:
    """Where each tensor of a (possibly sharded) safetensors checkpoint lives.

    A sharded checkpoint's ``model.safetensors.index.json`` names each tensor's shard; a shard's
    header is read the first time one of its tensors is asked for, so a party opens only the shards
    that hold its tensors (``opened`` lists them, in order).
    """

    def __init__(self, model_dir: Path):
        single = model_dir / "model.safetensors"
        index = model_dir / "model.safetensors.index.json"
        if single.is_file():
            self.shard_of = None
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{index} is not a safetensors index (no weight_map)") from None
            self.shard_of = {key: model_dir / f for key, f in weight_map.items()}
        else:
            raise UserError(f"{model_dir} holds no safetensors weights (lean loading needs them)")
        self.model_dir = model_dir
        self.opened: list[Path] = []
        self._where: dict[str, tuple[Path, int, dict]] = {}
        if self.shard_of is None:
            self._read_header(single)

    def _read_header(self, f: Path) -> None:
        if not f.is_file():
            raise UserError(f"shard {f.name} named by {self.model_dir}/model.safetensors.index.json is missing")
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        self.opened.append(f)
        for key, meta in header.items():
            self._where[key] = (f, 8 + n, meta)

    def _locate(self, key: str) -> tuple[Path, int, dict]:
        if key not in self._where and self.shard_of is not None and key in self.shard_of:
            self._read_header(self.shard_of[key])
        if key not in self._where:
            raise UserError(f"{key} is not in the checkpoint's shard {self.shard_of[key].name}" if self.shard_of
                            else f"{key} is not in the checkpoint")
        return self._where[key]

    def __contains__(self, key: str) -> bool:
        return key in (self.shard_of if self.shard_of is not None else self._where)

    def read_raw(self, key: str) -> torch.Tensor:
        """The bytes of tensor ``key`` as stored (uint8)."""
        path, base, meta = self._locate(key)
        begin, end = meta["data_offsets"]
        raw = torch.empty(end - begin, dtype=torch.uint8)
        with path.open("rb", buffering=0) as fh:
            fh.seek(base + begin)
            view, got = memoryview(raw.numpy()), 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise UserError(f"{path} is truncated (tensor {key})")
                got += n
        return raw

    def read(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Tensor ``key`` in ``dtype`` (floating tensors; others as stored): read as stored, then
        converted one tensor at a time, so no copy of a part in another dtype ever exists."""
        meta = self._locate(key)[2]
        t = self.read_raw(key).view(_DTYPES[meta["dtype"]]).reshape(meta["shape"])
        return t if t.dtype == dtype or not t.is_floating_point() else t.to(dtype)

    def fingerprint(self, keys) -> str:
        """sha256 over ``keys``' names, dtypes, shapes and stored bytes, read one tensor at a time."""
        h = hashlib.sha256()
        for key in sorted(set(keys)):
            meta = self._locate(key)[2]
            h.update(f"{key}:{meta['dtype']}:{list(meta['shape'])};".encode())
            h.update(self.read_raw(key).numpy())
        return h.hexdigest()


def local_model_dir(name: str) -> Path:
    """The directory ``name`` is read from, built (presets, GGUF) in a child process when it is not
    cached yet: building materialises the whole model, which a lean party must never hold."""
    if cached_target(name) is not None and not (cached_target(name) / "config.json").is_file():
        code = "import sys; from splitlora.models.loading import resolve_model; resolve_model(sys.argv[1])"
        proc = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or ["no output"]
            raise UserError(f"cannot prepare model {name!r}: {lines[-1]}")
    where = resolve_model(name)
    if not Path(str(where)).is_dir():  # a hub id: the files in the local hub cache (offline: cached only)
        try:
            from huggingface_hub import snapshot_download

            where = snapshot_download(str(where), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                                  "*.tiktoken", "tokenizer*", "merges*", "vocab*"])
        except Exception as exc:  # offline and not cached, or no such repository
            raise UserError(f"cannot load model {name!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") \
                from None
    return Path(str(where))


def lean_skeleton(name: str):
    """``(meta_model, tokenizer, index)``: the whole model on the meta device (no memory) and its weights' index."""
    where = local_model_dir(name)
    if not Path(str(where)).is_dir():
        raise UserError(f"lean loading needs a local model directory; {name!r} resolved to {where}")
    model_dir = Path(str(where))
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok, SafetensorsIndex(model_dir)


def lean_part(model: nn.Module, index: SafetensorsIndex, side: str, cut: "Split | int",
              dtype: torch.dtype = torch.float32, quantize: str | None = None) -> nn.Module:
    """``side`` ("client", "server" or "whole") of the meta ``model`` with real, frozen weights, its
    floating parameters in ``dtype`` (buffers keep theirs). ``quantize`` (nf4, int8): each block is
    read and quantized before the next is read, so the part never exists unquantized.

    Module names are those of the whole model, so LoRA configs and keys are the engine's.
    """
    part = model if side == "whole" else make_part(model, side, cut)
    if quantize:
        from .quantize import quantize_block
        from .split import architecture_of

        blocks = part.get_submodule(architecture_of(part).layers)
        for block in blocks.values() if isinstance(blocks, nn.ModuleDict) else blocks:
            materialise(block, model, index, dtype)
            quantize_block(block, quantize, dtype, "cpu")
    materialise(part, model, index, dtype)
    part.requires_grad_(False)
    return part


def lean_load(name: str, side: str, cut: "Split | int", dtype: torch.dtype = torch.float32):
    """``(part, tokenizer)`` in one call."""
    model, tok, index = lean_skeleton(name)
    return lean_part(model, index, side, cut, dtype), tok


def _aliases(whole: nn.Module) -> dict[int, list[str]]:
    """id(tensor) -> every name it has in the whole model (tied weights have several)."""
    aliases: dict[int, list[str]] = {}
    for name, p in whole.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    for name, b in whole.named_buffers(remove_duplicate=False):
        aliases.setdefault(id(b), []).append(name)
    return aliases


def file_keys(part: nn.Module, whole: nn.Module, index: SafetensorsIndex) -> list[str]:
    """The checkpoint keys of the tensors ``part`` (still on meta, cut from ``whole``) holds."""
    aliases = _aliases(whole)
    keys = []
    for t in (*part.parameters(), *part.buffers()):
        names = [n for n in aliases.get(id(t), []) if n in index]
        if names:
            keys.append(names[0])
    return sorted(set(keys))


def materialise(part: nn.Module, whole: nn.Module, index: SafetensorsIndex, dtype: torch.dtype = torch.float32) -> None:
    """Replace ``part``'s meta parameters by tensors read from ``index`` (ties preserved)."""
    aliases = _aliases(whole)
    done: dict[int, torch.Tensor] = {}
    rebuild: list[nn.Module] = []
    for module in part.modules():
        for key, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in done:
                names = [n for n in aliases.get(id(p), []) if n in index]
                if not names:
                    raise UserError(f"no weights for {aliases.get(id(p), ['?'])[0]} in the checkpoint")
                done[id(p)] = nn.Parameter(index.read(names[0], dtype if p.is_floating_point() else p.dtype),
                                           requires_grad=False)
            module._parameters[key] = done[id(p)]
        for key, b in list(module._buffers.items()):
            if b is None or not b.is_meta:
                continue
            if id(b) not in done:
                names = [n for n in aliases.get(id(b), []) if n in index]
                done[id(b)] = index.read(names[0], b.dtype) if names else torch.empty_like(b, device="cpu")
                if not names and module not in rebuild:
                    rebuild.append(module)
            module._buffers[key] = done[id(b)]
    for module in rebuild:  # non-persistent buffers: computed, as transformers does after a meta load
        whole._init_weights(module)
    left = [n for n, t in (*part.named_parameters(), *part.named_buffers()) if t.is_meta]
    if left:
        raise UserError(f"could not materialise {left[0]} (and {len(left) - 1} more)")
