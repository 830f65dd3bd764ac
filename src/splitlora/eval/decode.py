"""Decoding with a run's adapter: the base model with the PEFT adapter loaded as any PEFT user would,
and batched beam search (the LoRA/SplitLoRA E2E recipe) whose outputs are padding-invariant."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..config import RunConfig
from ..errors import UserError

LENGTH_PENALTY = 0.8  # the LoRA/SplitLoRA E2E recipe
NO_REPEAT_NGRAM = 4


def load_adapted(run_dir: Path, cfg: RunConfig, progress: bool = True):
    """The run's base model with its saved adapter, through PEFT; and the tokenizer."""
    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(f"{run_dir} has no adapter/ (adapter_config.json): is it a finished run folder?")
    return load_with_adapter(cfg.model, adapter, progress)


def load_with_adapter(model_name: str, adapter: str | Path | None, progress: bool = True):
    """``model_name`` with the PEFT adapter in the folder ``adapter`` (None: the base model alone), in
    eval mode; and the tokenizer. A fresh copy of the base weights each call."""
    from transformers.utils import logging as hf_logging

    from ..models.loading import load_model

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar
    try:
        loaded = load_model(model_name)
        model = loaded.model
        if adapter is not None:
            from peft import PeftModel

            with warnings.catch_warnings():
                # peft 0.21 reads a property that transformers 5 deprecates: not the user's concern
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                model = PeftModel.from_pretrained(model, str(adapter))
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    return model, loaded.tokenizer


def one_line(text: str) -> str:
    """Stripped, with every run of whitespace (newlines included) made one space."""
    return " ".join(text.split())


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], *, beams: int = 10, max_new_tokens: int = 64,
             batch_size: int = 8, length_penalty: float = LENGTH_PENALTY,
             no_repeat_ngram_size: int = NO_REPEAT_NGRAM, progress: bool = True,
             sort_by_length: bool = True) -> list[str]:
    """One output line per prompt, in input order: batched, left-padded, beam search (``beams=1``: greedy).

    ``sort_by_length``: batch prompts of similar token count together (then restore the input order),
    which cuts the padding each batch carries; outputs are the same, since decoding is padding-invariant.
    """
    device = next(model.parameters()).device
    options = dict(num_beams=beams, do_sample=False, max_new_tokens=max_new_tokens,
                   no_repeat_ngram_size=no_repeat_ngram_size, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    if beams > 1:
        options["length_penalty"] = length_penalty  # only beam search reads it
    prompts = list(prompts)
    order = list(range(len(prompts)))
    if sort_by_length:
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]] if prompts else []
        order.sort(key=lambda i: lengths[i])  # stable: ties keep their input order
    outputs: list[str] = [""] * len(prompts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues every row from its last real token
    bar = tqdm(total=len(prompts), desc="generate", unit="MR", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            enc = tokenizer([prompts[i] for i in rows], add_special_tokens=False, padding=True, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out = model.generate(**enc, **options)
            new = out[:, enc["input_ids"].shape[1]:]
            for i, text in zip(rows, tokenizer.batch_decode(new, skip_special_tokens=True)):
                outputs[i] = one_line(text)
            bar.update(len(rows))
    finally:
        tokenizer.padding_side = side
        bar.close()
    return outputs
