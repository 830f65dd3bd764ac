"""``splitlora export --run DIR --merge OUT``: the run's base model with its adapter merged in.

The result is a plain Hugging Face model directory (``config.json``, safetensors weights, the
tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads with no PEFT installed: PEFT's
``merge_and_unload`` folds ``B @ A * alpha / r`` into each adapted weight, in fp32, and the merged
weights are then saved in the dtype asked for (default: the run's client dtype).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import RunConfig
from ..errors import UserError
from .loading import load_model
from .precision import TORCH_DTYPES


def export_merged(run_dir: str | Path, out_dir: str | Path, dtype: str | None = None) -> Path:
    from peft import PeftModel

    run = Path(run_dir)
    adapter = run / "adapter"
    if not (run / "config.yaml").is_file() or not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{run} is not a finished run (it needs config.yaml and adapter/adapter_config.json)")
    cfg = RunConfig.load(run / "config.yaml")
    name = dtype or cfg.dtype
    if name not in TORCH_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(TORCH_DTYPES)} (got {name!r})")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: give a new directory to --merge")
    loaded = load_model(cfg.model)  # fp32: the merge adds B @ A to each weight at full precision
    merged = PeftModel.from_pretrained(loaded.model, str(adapter)).merge_and_unload()
    merged = merged.to(TORCH_DTYPES[name])
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out
