"""Rows of any shape -> token ids and labels (-100 where no loss), as a batched ``datasets.map``.

| shape | tokens | loss on |
| --- | --- | --- |
| ``prompt``/``completion`` | prompt, completion, eos | completion and eos |
| ``messages`` | the chat template's rendering | assistant turns (see :mod:`.chat`) |
| ``text`` | text, eos | every token |
| E2E ``mr``/``ref`` | ``prompt_template(mr)``, `` ref``, eos | `` ref`` and eos |

A conversational ``prompt``/``completion`` (lists of messages, as TRL accepts) is rendered as one
conversation with loss on the completion's assistant turns. Every row is cut to ``max_length``; a row
left without loss is flagged (``loss`` False) so that the caller drops and counts it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence as SequenceABC
from typing import Sequence

from ..errors import UserError
from .batching import IGNORE, Encoded
from .chat import check_messages, encode_conversations

KEY = "__key"  # the grouping key of the validation split (E2E: the stripped MR; prompt rows: the prompt)


def _text(value, where: str, name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise UserError(f"{where}: field {name!r} is missing or empty")
    return value


def encode_batch(batch: dict, rows: list[int], *, shape: str, tokenizer, prompt_template: str, chat: str | None,
                 max_length: int, source: str) -> dict:
    """The ``datasets.map(batched=True, with_indices=True)`` function of one shape."""
    wheres = [f"{source}, row {r + 1}" for r in rows]
    n = len(rows)
    skip = [False] * n
    keys: list[str] = [""] * n
    eos = [tokenizer.eos_token_id]
    if shape == "messages" or (shape == "prompt-completion" and n and isinstance(batch["prompt"][0], list)):
        if shape == "messages":
            convs, starts = batch["messages"], [0] * n
        else:
            convs = [list(p or []) + list(c or []) for p, c in zip(batch["prompt"], batch["completion"])]
            starts = [len(p or []) for p in batch["prompt"]]
        if chat is None:
            raise UserError(f"{source} holds conversations but no chat template is known")
        for conv, where, start in zip(convs, wheres, starts):
            check_messages(conv, where, start)
        ids, masks = encode_conversations(tokenizer, chat, convs, wheres, starts)
        labels = [[t if m else IGNORE for t, m in zip(i, k)] for i, k in zip(ids, masks)]
    elif shape == "text":
        texts = [_text(t, w, "text") for t, w in zip(batch["text"], wheres)]
        ids = [t + eos for t in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        labels = [list(t) for t in ids]
    else:
        if shape == "e2e":
            mrs = [(m or "").strip() if isinstance(m, str) or m is None else _text(m, w, "mr")
                   for m, w in zip(batch["mr"], wheres)]
            skip = [not m for m in mrs]  # blank E2E lines are skipped, as the official scripts do
            refs = [(r or "").strip() if isinstance(r, str) or r is None else _text(r, w, "ref")
                    for r, w in zip(batch["ref"], wheres)]
            prompts, completions, keys = [prompt_template.format(mr=m) for m in mrs], [" " + r for r in refs], mrs
        else:
            prompts = [_text(p, w, "prompt", allow_empty=True) for p, w in zip(batch["prompt"], wheres)]
            completions = [_text(c, w, "completion") for c, w in zip(batch["completion"], wheres)]
            keys = prompts
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        c_ids = [c + eos for c in tokenizer(completions, add_special_tokens=False)["input_ids"]]
        ids = [p + c for p, c in zip(p_ids, c_ids)]
        labels = [[IGNORE] * len(p) + c for p, c in zip(p_ids, c_ids)]
    ids = [x[:max_length] for x in ids]
    labels = [x[:max_length] for x in labels]
    loss = [not s and any(t != IGNORE for t in lab[1:]) for s, lab in zip(skip, labels)]
    return {"input_ids": ids, "labels": labels, "loss": loss, "skip": skip, KEY: keys}


def encode_dataset(ds, shape: str, tokenizer, *, prompt_template: str, chat: str | None, max_length: int,
                   source: str, batch_size: int = 1000):
    """``ds`` with ``input_ids``, ``labels``, ``loss``, ``skip`` and the split key added (Arrow, batched)."""
    return ds.map(encode_batch, batched=True, batch_size=batch_size, with_indices=True,
                  fn_kwargs=dict(shape=shape, tokenizer=tokenizer, prompt_template=prompt_template, chat=chat,
                                 max_length=max_length, source=source),
                  desc="tokenise", new_fingerprint=uuid.uuid4().hex)  # hashing the tokenizer costs seconds


class ArrowRows(SequenceABC):
    """A read-only sequence over some columns of an Arrow table (memory-mapped when the data came from
    files), each row made into an object on demand: no Python list of every row."""

    columns: tuple[str, ...] = ()

    def __init__(self, ds):
        self.ds = ds.select_columns(list(self.columns))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.make(self.ds[int(i)])

    def make(self, row: dict):
        raise NotImplementedError


class EncodedRows(ArrowRows):
    """The :class:`Encoded` rows the engine reads."""

    columns = ("input_ids", "labels")

    def make(self, row: dict) -> Encoded:
        return Encoded(row["input_ids"], row["labels"])

    def subset(self, indices: Sequence[int]) -> "EncodedRows":
        return EncodedRows(self.ds.select(indices))
