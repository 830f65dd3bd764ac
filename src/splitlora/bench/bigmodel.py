"""Llama-3-8B-shaped checkpoints with random weights, for measuring real part sizes offline.

:func:`write_random_checkpoint` writes the model (optionally truncated to a few blocks) to disk as a
sharded safetensors checkpoint in bf16, one tensor at a time: the whole model is never in memory.
Truncated to 6 blocks, a client at cut 2 holds exactly what an 8B client holds (the 128256 x 4096
embeddings and two 218M-parameter blocks); the file is about 4.7 GB (put it under /tmp).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
# SmolLM2-135M's shape (its GGUF's config): a GPU machine without the 98 MB GGUF builds it with random
# weights, which time the same as the real ones.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                    rms_norm_eps=1e-5, tie_word_embeddings=True)
SHAPES = {"llama3-8b-shaped": LLAMA3_8B, "smollm2-135m-shaped": SMOLLM2_135M}


def llama3_config(blocks: int | None = None, tiny: bool = False, shape: dict = LLAMA3_8B):
    """A ``LlamaConfig`` of ``shape`` (default Llama-3-8B's), optionally with ``blocks`` blocks."""
    from transformers import LlamaConfig

    shape = dict(shape)
    if tiny:  # Llama-3's proportions at 1/64 of the width: the same code, in seconds
        shape.update(hidden_size=64, intermediate_size=224, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=1, vocab_size=50257)
    if blocks is not None:
        shape["num_hidden_layers"] = blocks
    return LlamaConfig(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def write_random_checkpoint(out: str | Path, config, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                            shard_bytes: int = 1 << 30) -> Path:
    """``out``: ``config.json``, ``model-0000N-of-0000M.safetensors`` + index, the GPT-2 tokenizer.
    Idempotent: a finished directory (its index written last) is left as it is."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from ..models.loading import gpt2_tokenizer

    out = Path(out)
    index_path = out / "model.safetensors.index.json"
    if index_path.is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    names = {}  # tensor name -> shard number; the shards' final names need their count, so rename at the end
    current, size, written = {}, 0, []

    def flush():
        nonlocal current, size
        if current:
            tmp = out / f".shard-{len(written) + 1:05d}.safetensors"
            save_file(current, str(tmp), metadata={"format": "pt"})
            written.append((tmp, size))
            current, size = {}, 0

    for name, p in meta.state_dict().items():
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=dtype)
        else:
            t = torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(0.02).to(dtype)
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[name], size, names[name] = t, size + nbytes, len(written) + 1
        del t
    flush()
    weight_map = {}
    for i, (tmp, _) in enumerate(written):
        tmp.rename(out / f"model-{i + 1:05d}-of-{len(written):05d}.safetensors")
    for name, shard in names.items():
        weight_map[name] = f"model-{shard:05d}-of-{len(written):05d}.safetensors"
    total = sum(n for _, n in written)
    config.dtype = dtype
    config.save_pretrained(out)
    gpt2_tokenizer().save_pretrained(out)
    index_path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out
