"""``splitlora eval`` on a user's own task: decode every prompt, write the predictions, then score them.

Each row gives a prompt and its reference: ``prompt``/``completion`` rows directly; a conversation is
rendered with the chat template up to its last assistant turn (plus the generation prompt), and that
turn is the reference. ``text`` rows have no prompt: only their loss is scored.

Scores: the mean loss and perplexity of the reference tokens (the training loss mask), sacreBLEU
(corpus BLEU, 13a tokenisation), ROUGE-L F1 (Google's ``rouge-score``, stemming on) and exact match
(whitespace-normalised). A run folder after it::

    DIR/predictions.jsonl   {"prompt", "reference", "prediction"} per row (written before scoring)
    DIR/eval.json           loss, perplexity, bleu, rouge_l, exact_match, counts, timing
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..config import RunConfig
from ..errors import UserError
from .loss import perplexity, token_nll

TASK_METRICS = ("loss", "perplexity", "bleu", "rouge_l", "exact_match")


def prompts_and_references(cfg: RunConfig, tokenizer, ds, shape: str, source: str) -> tuple[list[str], list[str]]:
    """The decoding prompt and the reference of every row (empty lists for ``text`` rows)."""
    from ..data.chat import chat_template_of, render_prompt

    if shape == "text":
        return [], []
    if shape == "e2e":
        return [cfg.prompt_template.format(mr=(m or "").strip()) for m in ds["mr"]], [(r or "").strip() for r in ds["ref"]]
    column = ds["messages"] if shape == "messages" else None
    if column is None and not isinstance(ds[0]["prompt"], list):
        return list(ds["prompt"]), list(ds["completion"])
    template = chat_template_of(tokenizer, cfg.data_format.chat_template, source)
    prompts, refs = [], []
    rows = column if column is not None else [list(p) + list(c) for p, c in zip(ds["prompt"], ds["completion"])]
    for number, messages in enumerate(rows, 1):
        last = max((i for i, t in enumerate(messages or []) if t.get("role") == "assistant"), default=None)
        if last is None:
            raise UserError(f"{source}, row {number}: the conversation has no assistant turn to score")
        prompts.append(render_prompt(tokenizer, template, messages[:last + 1]))
        refs.append(messages[last]["content"])
    return prompts, refs


def score_task(hyps: list[str], refs: list[str]) -> dict:
    """sacreBLEU, ROUGE-L F1 and exact match of one prediction per reference."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if not hyps:
        return {"bleu": None, "rouge_l": None, "exact_match": None}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps)
    exact = sum(" ".join(h.split()) == " ".join(r.split()) for h, r in zip(hyps, refs)) / len(hyps)
    return {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score, "rouge_l": 100 * rouge, "exact_match": 100 * exact}


def evaluate_task(run: Path, cfg: RunConfig, data: str, *, limit: int | None, beams: int, progress: bool,
                  max_new_tokens: int, batch_size: int, device: str | None, show: bool) -> dict:
    from ..data import encode_rows, read_rows
    from ..data.encode import EncodedRows
    from ..device import resolve_device, setup_torch
    from .decode import generate, load_adapted

    ds, source, shape, _ = read_rows(cfg, data)  # bad data fails before the model loads
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    setup_torch(cfg.seed, cfg.threads)
    model, tokenizer = load_adapted(run, cfg, progress)
    model.to(resolve_device(device or cfg.device))
    prompts, refs = prompts_and_references(cfg, tokenizer, ds, shape, source)

    t0 = time.perf_counter()
    hyps = generate(model, tokenizer, prompts, beams=beams, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    progress=progress) if prompts else []
    seconds_generate = time.perf_counter() - t0
    with (run / "predictions.jsonl").open("w", encoding="utf-8") as fh:
        for p, r, h in zip(prompts, refs, hyps):
            fh.write(json.dumps({"prompt": p, "reference": r, "prediction": h}, ensure_ascii=False) + "\n")

    t0 = time.perf_counter()
    enc = encode_rows(cfg, tokenizer, ds, source, shape)
    items = EncodedRows(enc.select([i for i, kept in enumerate(enc["loss"]) if kept]))
    total, count = token_nll(model, items, tokenizer.pad_token_id, batch_size) if len(items) else (0.0, 0)
    loss = total / count if count else None
    try:
        ppl = perplexity(loss) if loss is not None else None
    except OverflowError:
        ppl = None
    seconds_loss = time.perf_counter() - t0

    result = {"loss": loss, "perplexity": ppl if ppl is None or math.isfinite(ppl) else None,
              **score_task(hyps, refs), "n_rows": len(ds), "n_scored_tokens": count, "shape": shape,
              "beams": beams, "seconds_generate": round(seconds_generate, 3), "seconds_loss": round(seconds_loss, 3),
              "data": source}
    (run / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    if show:
        print(format_task_table(result))
        if prompts:
            print(f"predictions: {run / 'predictions.jsonl'}")
    return result


def format_task_table(result: dict) -> str:
    names = {"loss": "loss", "perplexity": "perplexity", "bleu": "BLEU (sacreBLEU)", "rouge_l": "ROUGE-L F1",
             "exact_match": "exact match %"}
    width = max(map(len, names.values()))
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    for key, name in names.items():
        value = result.get(key)
        lines.append(f"{name:<{width}}  {'n/a' if value is None else f'{value:.4f}'}")
    lines.append(f"{result['n_rows']} rows ({result['shape']}, {result['data']}), beam {result['beams']}; "
                 f"generate {result['seconds_generate']:.1f}s, loss {result['seconds_loss']:.1f}s")
    return "\n".join(lines)


def is_user_task(cfg: RunConfig, data: str | None) -> str | None:
    """The data to evaluate as a user task, or None for the E2E path (synthetic, E2E CSVs and folders)."""
    source = data if data is not None else (cfg.data_format.val_data or cfg.data)
    if source == "synthetic":
        return None
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8-sig", errors="replace") as fh:
            header = [c.strip() for c in next(csv.reader(fh), [])]
        cols = dict(p.split("=", 1) for p in cfg.data_format.columns.split(",") if "=" in p)
        if "mr" in header and "ref" in header and not cols:
            return None
        return source
    if path.is_dir() and not any(path.glob("*.jsonl")) and not any(path.glob("*.json")) \
            and not any(path.glob("*.parquet")) and not (path / "dataset_info.json").is_file() \
            and not (path / "state.json").is_file() and not (path / "dataset_dict.json").is_file():
        return None  # an E2E folder (its --split file)
    if data is None and not cfg.data_format.val_data:
        raise UserError(f"the run trained on {source}: pass the rows to evaluate on with --data FILE")
    return source
