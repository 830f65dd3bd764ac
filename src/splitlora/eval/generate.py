"""``splitlora eval``: decode the test MRs with a run's adapter, score them, and (on request) the
references' perplexity.

One output per distinct MR, in order (references grouped by consecutive identical MR, as the
official E2E scripts do: 630 MRs on the E2E test set). Decoding follows the LoRA/SplitLoRA E2E recipe:
beam search with 10 beams, length penalty 0.8 and no repeated 4-grams. The run's adapter is loaded the
way any PEFT user would load it: ``PeftModel.from_pretrained(base, DIR/adapter)``.

Prompts are decoded in batches of similar length (sorted by token count, outputs put back in input
order): less left padding, the same outputs (decoding is padding-invariant; a test checks it).

The reference perplexity is off by default (``perplexity=True`` / ``--perplexity`` turns it on): it
scores every reference row (4,693 on the E2E test set), which on a CPU takes about three times as long
as greedy decoding of the 630 MRs. Off, ``eval.json`` holds ``"perplexity": null`` and
``"perplexity_note"`` says why.

A run folder after ``evaluate_run``::

    DIR/predictions.txt   one output line per MR (written before scoring: never lost)
    DIR/eval.json         bleu, nist, meteor, rouge_l, cider, perplexity (or null), counts, timing
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..config import RunConfig
from ..data.batching import encode_all
from ..data.e2e import Example
from ..errors import UserError
from .decode import LENGTH_PENALTY, NO_REPEAT_NGRAM, generate, load_adapted, load_with_adapter, one_line  # noqa: F401
from .loss import perplexity, token_nll

# ``--split`` -> the file of an E2E data folder that holds it
SPLIT_FILES = {"test": "testset_w_refs.csv", "dev": "devset.csv"}
METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")
PERPLEXITY_OFF = ("not computed (splitlora eval --perplexity computes it: it scores every reference row, "
                  "~3x the time of greedy decoding on a CPU)")


@dataclass
class EvalSet:
    """Distinct MRs, in order, with the references of each."""

    mrs: list[str]
    refs: list[list[str]]
    source: str  # the CSV file read, or "synthetic"

    def examples(self) -> list[Example]:
        """Every (MR, reference) row, in order."""
        return [Example(mr, ref) for mr, group in zip(self.mrs, self.refs) for ref in group]

    def head(self, limit: int | None) -> "EvalSet":
        if limit is None:
            return self
        return EvalSet(self.mrs[:limit], self.refs[:limit], self.source)


# ---- which data -------------------------------------------------------------------------------

def resolve_data(run_data: str, data: str | None, split: str) -> str | Path:
    """``"synthetic"`` or the E2E CSV file to evaluate on.

    ``data`` (``--data``) wins over the run's ``data``. A folder means its ``--split`` file
    (``test``: ``testset_w_refs.csv``, ``dev``: ``devset.csv``). A file given as ``--data`` is used as
    is. A file taken from the run's config is the training file: its ``--split`` file next to it (an
    E2E folder), else ``HELD_OUT``: the MRs the run held out of that file (``val_fraction``), never
    trained on.
    """
    if split not in SPLIT_FILES:
        raise UserError(f"split must be one of {', '.join(SPLIT_FILES)} (got {split!r})")
    explicit = data is not None
    source = data if explicit else run_data
    if source == "synthetic":
        return "synthetic"
    path = Path(source).expanduser()
    name = SPLIT_FILES[split]
    if path.is_dir():
        if not (path / name).is_file():
            raise UserError(f"data folder {path} has no {name} (the --split {split} file): pass --data FILE")
        return path / name
    if explicit:
        return path  # the reader gives the one-line error if it is missing or malformed
    if not path.is_file():
        raise UserError(f"the run's data {source!r} is not found from here: pass --data FILE")
    if (path.parent / name).is_file():
        return path.parent / name
    return HELD_OUT


HELD_OUT = "held-out"  # resolve_data: the run's own held-out MRs


def group_all(examples: Sequence[Example]) -> tuple[list[str], list[list[str]]]:
    """Group references by MR (every occurrence), MRs in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for ex in examples:
        groups.setdefault(ex.mr, []).append(ex.ref)
    return list(groups), list(groups.values())


def load_eval_set(cfg: RunConfig, tokenizer, data: str | None = None, split: str = "test") -> EvalSet:
    """The MRs and references to evaluate on (see :func:`resolve_data`).

    For a synthetic run, the run's synthetic set is regenerated and its validation MRs are the test
    set (for either split); they were never trained on. Every occurrence of an MR is grouped there.
    """
    source = resolve_data(cfg.data, data, split)
    if source == HELD_OUT:
        return synthetic_eval_set(cfg, tokenizer, data=cfg.data)
    return synthetic_eval_set(cfg, tokenizer) if source == "synthetic" else csv_eval_set(source)


def csv_eval_set(path: str | Path) -> EvalSet:
    from .metrics import load_e2e_references

    mrs, refs = load_e2e_references(path)
    return EvalSet(mrs, refs, str(path))


def synthetic_eval_set(cfg: RunConfig, tokenizer, data: str = "synthetic") -> EvalSet:
    """The validation MRs the run held out of ``data`` (its synthetic set, or its own data file)."""
    from ..data import prepare_data

    held = RunConfig.from_dict({**cfg.to_dict(), "data": data})
    val = prepare_data(held, tokenizer).val_examples
    if not val:
        raise UserError(f"the run's data ({data}) has no held-out MRs (val_fraction is 0): pass --data FILE "
                        f"with test rows")
    mrs, refs = group_all(val)
    return EvalSet(mrs, refs, "synthetic" if data == "synthetic" else f"{data} (held-out MRs)")


# ---- model --------------------------------------------------------------------------------------

def reference_perplexity(model, tokenizer, cfg: RunConfig, examples: Sequence[Example],
                         batch_size: int = 8) -> float:
    """Token-level perplexity of the references (completion tokens only, the run's prompt encoding)."""
    items = encode_all(examples, tokenizer, cfg.prompt_template, cfg.max_length)
    total, count = token_nll(model, items, tokenizer.pad_token_id, batch_size)
    if not count:
        return float("nan")
    try:
        return perplexity(total / count)
    except OverflowError:  # a diverged adapter
        return float("inf")


# ---- the whole evaluation -------------------------------------------------------------------------

def evaluate_run(run_dir: str | Path, data: str | None = None, split: str = "test", limit: int | None = None,
                 beams: int = 10, progress: bool = True, *, max_new_tokens: int = 64, batch_size: int = 8,
                 device: str | None = None, show: bool = True, perplexity: bool = False) -> dict:
    """Decode, score and write ``predictions.txt`` and ``eval.json`` to ``run_dir``; returns eval.json's dict.

    ``perplexity``: also the perplexity of every reference row (off by default: about three times the
    cost of greedy decoding on a CPU; off, eval.json says ``null`` and why).
    """
    from ..device import resolve_device, setup_torch
    from .metrics import score_corpus

    run = Path(run_dir)
    for name, value in (("limit", limit), ("beams", beams), ("max_new_tokens", max_new_tokens),
                        ("batch_size", batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be >= 1 (got {value})")
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run folder (no config.yaml)")
    cfg = RunConfig.load(run / "config.yaml")
    from .task import evaluate_task, is_user_task

    task = is_user_task(cfg, data)
    if task is not None:  # the user's own rows: BLEU, ROUGE-L, exact match, loss (E2E keeps its five)
        return evaluate_task(run, cfg, task, limit=limit, beams=beams, progress=progress,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, show=show)
    source = resolve_data(cfg.data, data, split)
    # a file is read now: bad data fails before the model loads
    evalset = None if source in ("synthetic", HELD_OUT) else csv_eval_set(source)
    setup_torch(cfg.seed, cfg.threads)  # threads, seed, deterministic kernels
    model, tokenizer = load_adapted(run, cfg, progress)
    model.to(resolve_device(device or cfg.device))
    held_out = "synthetic" if source == "synthetic" else cfg.data
    evalset = (evalset or synthetic_eval_set(cfg, tokenizer, held_out)).head(limit)

    t0 = time.perf_counter()
    hyps = generate(model, tokenizer, [cfg.prompt_template.format(mr=mr) for mr in evalset.mrs], beams=beams,
                    max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    seconds_generate = time.perf_counter() - t0
    (run / "predictions.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")

    examples = evalset.examples()
    t0 = time.perf_counter()
    ppl, ppl_note = None, PERPLEXITY_OFF
    if perplexity:
        value = reference_perplexity(model, tokenizer, cfg, examples, batch_size=batch_size)
        ppl, ppl_note = (value, None) if math.isfinite(value) else (None, "not finite (a diverged adapter?)")
    seconds_perplexity = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores = score_corpus(hyps, evalset.refs)
    seconds_score = time.perf_counter() - t0

    result = {**{k: scores[k] for k in METRICS}, "perplexity": ppl, "perplexity_note": ppl_note,
              "n_mrs": len(evalset.mrs), "n_refs": len(examples), "beams": beams,
              "seconds_generate": round(seconds_generate, 3), "seconds_perplexity": round(seconds_perplexity, 3),
              "seconds_score": round(seconds_score, 3), "data": evalset.source, "split": split}
    (run / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    if show:
        print(format_table(result))
        print(f"predictions: {run / 'predictions.txt'}")
    return result


def format_table(result: dict) -> str:
    """A small aligned table of the metrics and the counts."""
    rows = [("BLEU", result["bleu"]), ("NIST", result["nist"]), ("METEOR", result["meteor"]),
            ("ROUGE-L", result["rouge_l"]), ("CIDEr", result["cider"]), ("perplexity", result["perplexity"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for name, value in rows:
        shown = "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
        lines.append(f"{name:<{width}}  {shown}")
    timing = f"generate {result['seconds_generate']:.1f}s, score {result['seconds_score']:.1f}s"
    if result.get("perplexity") is not None:
        timing += f", perplexity {result.get('seconds_perplexity', 0.0):.1f}s"
    lines.append(f"{result['n_mrs']} MRs, {result['n_refs']} references ({result['data']}, {result['split']}), "
                 f"beam {result['beams']}; {timing}")
    if result.get("perplexity_note"):
        lines.append(f"perplexity: {result['perplexity_note']}")
    return "\n".join(lines)
