"""Conversations: rendered with the tokenizer's chat template, loss on the assistant turns only.

Where the template marks assistant text with ``{% generation %}`` the mask is the one
``apply_chat_template(..., return_assistant_tokens_mask=True)`` returns. Otherwise (most templates,
SmolLM2's included) each assistant turn's span is found by rendering prefixes, as TRL does: the turn is
the text between ``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i+1])``
(its content and the template's end-of-turn marker), and a token carries loss when it starts inside
such a span.
"""

from __future__ import annotations

import re
from typing import Sequence

from ..errors import UserError

ROLES = ("system", "user", "assistant", "tool")
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def chat_template_of(tokenizer, override: str, source: str) -> str:
    """The template to render with: ``override`` (the config's), else the tokenizer's own."""
    template = override or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise UserError(f"{source} holds conversations (messages) but the model's tokenizer has no chat "
                        "template: pass one with --chat-template FILE (a Jinja template)")
    return template


def has_generation_marks(template: str) -> bool:
    return bool(_GENERATION.search(template))


def check_messages(messages, where: str, first_trained: int = 0) -> None:
    """One-line errors for a conversation that is not a list of {role, content} with an assistant turn."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: messages must be a non-empty list of {{role, content}}")
    for turn in messages:
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise UserError(f"{where}: every message needs 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise UserError(f"{where}: unknown role {turn['role']!r} (expected {', '.join(ROLES)})")
        if not isinstance(turn["content"], str) or (turn["role"] == "assistant" and not turn["content"].strip()):
            raise UserError(f"{where}: a {turn['role']} message has empty or non-text content")
    if not any(t["role"] == "assistant" for t in messages[first_trained:]):
        raise UserError(f"{where}: the conversation has no assistant turn to learn from")


def _render(tokenizer, template: str, messages, generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def render_prompt(tokenizer, template: str, messages) -> str:
    """The text a model continues to answer: every turn but a final assistant one, and the generation prompt."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return _render(tokenizer, template, messages, generation_prompt=True)


def assistant_spans(tokenizer, template: str, messages, where: str,
                    first_trained: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (from ``first_trained``)."""
    full = _render(tokenizer, template, messages)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant" or i < first_trained:
            continue
        before = _render(tokenizer, template, messages[:i], generation_prompt=True)
        upto = _render(tokenizer, template, messages[:i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise UserError(f"{where}: the chat template does not render a conversation as the sum of its "
                            "prefixes; pass a template that marks assistant text with {% generation %}")
        spans.append((len(before), len(upto)))
    return full, spans


def encode_conversations(tokenizer, template: str, conversations: Sequence[list], wheres: Sequence[str],
                         first_trained: Sequence[int] | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and a 0/1 loss mask (1 on assistant tokens) of each conversation."""
    starts = list(first_trained) if first_trained is not None else [0] * len(conversations)
    if has_generation_marks(template) and not any(starts):
        out = tokenizer.apply_chat_template(list(conversations), chat_template=template, tokenize=True,
                                            return_dict=True, return_assistant_tokens_mask=True)
        return [list(x) for x in out["input_ids"]], [list(m) for m in out["assistant_masks"]]
    texts, all_spans = [], []
    for messages, where, start in zip(conversations, wheres, starts):
        text, spans = assistant_spans(tokenizer, template, messages, where, start)
        texts.append(text)
        all_spans.append(spans)
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    masks = [[int(any(a <= s < b for a, b in spans)) for s, _ in offsets]
             for offsets, spans in zip(enc["offset_mapping"], all_spans)]
    return [list(x) for x in enc["input_ids"]], masks
