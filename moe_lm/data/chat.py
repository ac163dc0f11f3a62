"""Conversations: records → checked messages → token ids and the mask of the assistant's tokens.

A record is one conversation: a `messages` list (the field is data.messages_field) of
{role, content} with roles system / user / assistant, or `prompt` and `response` fields (one user
turn, one assistant turn; an optional `system` field goes first). A record with neither, a message
that is not {role: text, content: text}, an unknown role or a conversation without an assistant turn
is a one-line error naming the file and the record.

`ChatEncoder` renders a conversation with the tokenizer's chat template (moe_lm/data/chat_template.py)
and encodes the text as transformers' tokenizer encodes `apply_chat_template`'s output: the special
tokens' text (<s>, </s>, <unk>) becomes those tokens, the text between them is encoded whole. A
token is an assistant token when it overlaps an assistant span of the text, so the mask equals
transformers' `return_assistant_tokens_mask`; with moe_lm's default template every assistant turn's
content and its closing end-of-sequence token are marked.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from moe_lm.data.chat_template import ROLES, ChatTemplateError, load_chat_template, render
from moe_lm.errors import UserError

if TYPE_CHECKING:
    from moe_lm.data.tokenizer import Tokenizer

PAIR_FIELDS = ("prompt", "response")


@dataclass(frozen=True)
class ChatSpec:
    """How a chat source's records become examples; travels to the tokenising workers with each piece
    and is part of the shard names (another template or field means other shards)."""

    messages_field: str = "messages"
    template: str = ""  # empty while only reading records (tokenizer training)

    def columns(self, names: list[str]) -> list[str]:
        """The columns of a table (parquet, dataset) a conversation is read from."""
        wanted = [self.messages_field, *PAIR_FIELDS, "system"]
        return [n for n in wanted if n in names]

    def check_columns(self, names: list[str], what: str) -> None:
        if self.messages_field not in names and not set(PAIR_FIELDS) <= set(names):
            raise no_roles(what, self.messages_field, names)

    def conversation(self, record: Any, where: str) -> Conversation:
        return Conversation(parse_messages(record, self.messages_field, where), where)

    def material(self) -> list[str]:
        return [self.messages_field, hashlib.sha256(self.template.encode()).hexdigest()[:16]]


class Conversation(NamedTuple):
    messages: list[dict[str, Any]]
    where: str  # file and record, for messages


def no_roles(where: str, field: str, fields: Any) -> UserError:
    return UserError(
        f"{where} has no '{field}' list and no 'prompt'/'response' fields (fields: "
        f"{', '.join(map(str, fields)) or 'none'}), so it has no roles; give each record one of them "
        f"(data.messages_field names the list), or set data.kind: text for plain documents"
    )


def _other(key: str) -> str:
    return PAIR_FIELDS[1 - PAIR_FIELDS.index(key)]


def parse_messages(record: Any, field: str, where: str) -> list[dict[str, Any]]:
    """The checked message list of one record (see the module docstring)."""
    if not isinstance(record, dict):
        raise UserError(f"{where} is not an object with a '{field}' list or 'prompt'/'response' fields")
    if record.get(field) is not None:
        messages = record[field]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: '{field}' must be a non-empty list of {{role, content}} messages")
    elif any(record.get(k) is not None for k in PAIR_FIELDS):
        # a field of the wrong type is refused, not skipped: a dropped system prompt or reply would
        # train on another conversation than the one in the file
        for key in (*PAIR_FIELDS, "system"):
            if key in PAIR_FIELDS and record.get(key) is None:
                raise UserError(f"{where}: has '{_other(key)}' but no '{key}'; give both (text)")
            if record.get(key) is not None and not isinstance(record[key], str):
                raise UserError(f"{where}: '{key}' must be text, not {type(record[key]).__name__}")
        messages = [{"role": "user", "content": record["prompt"]}]
        messages.append({"role": "assistant", "content": record["response"]})
        if record.get("system") is not None:
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise no_roles(where, field, record)
    for j, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or not isinstance(message.get("content"), str):
            raise UserError(f"{where}: message {j} is not {{role: text, content: text}} ({message!r:.80})")
        if role not in ROLES:
            raise UserError(
                f"{where}: message {j} has unknown role '{role}'; roles are {', '.join(ROLES)} "
                "(rename it in the data)"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(
            f"{where}: the conversation has no assistant turn, so nothing in it would be trained on; "
            "add the assistant's reply or remove the record"
        )
    return messages


class ChatEncoder:
    """A tokenizer with a chat template: conversations to ids and assistant masks, prompts to ids."""

    def __init__(self, tokenizer: Tokenizer, template: str, where: str = "the chat template") -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.where = where  # names the template in errors (the tokenizer folder)
        self.special = tokenizer.special_pieces()
        longest_first = sorted(self.special, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
        self.variables = tokenizer.template_variables()

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return self._render(messages, add_generation_prompt, False, "the conversation")[0]

    def _render(
        self, messages: list[dict[str, Any]], prompt: bool, spans: bool, where: str
    ) -> tuple[str, list[tuple[int, int]]]:
        try:
            return render(self.template, messages, self.variables, prompt, assistant_spans=spans)
        except ChatTemplateError as e:
            raise UserError(f"{self.where} refused {where}: {e}") from None

    def tokens(self, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, first byte, end byte) of each token of `text`, special tokens' text as those tokens."""
        ids: list[int] = []
        begins: list[int] = []
        ends: list[int] = []
        offset = 0
        for i, part in enumerate(self._split.split(text)):
            size = len(part.encode("utf-8"))
            if i % 2:  # a special token's text
                ids.append(self.special[part])
                begins.append(offset)
                ends.append(offset + size)
            elif part:
                for tid, b, e in self.tokenizer.encode_offsets(part):
                    ids.append(tid)
                    begins.append(offset + b)
                    ends.append(offset + e)
            offset += size
        return np.asarray(ids, np.int64), np.asarray(begins, np.int64), np.asarray(ends, np.int64)

    def encode(self, conversation: Conversation) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask): mask is 1 on the assistant's tokens, 0 elsewhere (uint8)."""
        text, spans = self._render(conversation.messages, False, True, conversation.where)
        ids, begins, ends = self.tokens(text)
        mask = np.zeros(len(ids), np.uint8)
        ends = np.maximum(ends, begins + 1)  # a byte-fallback piece before a character's last byte
        for start, end in spans:
            a, b = len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8"))
            mask[(begins < b) & (ends > a)] = 1
        if not mask[1:].any():  # the first token is no target: nothing comes before it
            raise UserError(
                f"{conversation.where}: {self.where} renders the assistant's turns as nothing; check the "
                "template's {% generation %} blocks"
            )
        return ids, mask

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """The ids a reply to `messages` is generated after (the template's generation prompt added)."""
        text, _ = self._render(messages, True, False, "the prompt")
        return self.tokens(text)[0].tolist()


def template_of(tokenizer: Tokenizer) -> str:
    """The tokenizer's chat template; one line naming the fix when it has none."""
    folder = tokenizer.path
    template = load_chat_template(folder) if folder is not None else None
    if template is None:
        raise UserError(
            f"the tokenizer at '{folder}' has no chat template, which chat data needs; add one with "
            f"`moe-lm tokenizer chat-template {folder} --default` (moe_lm's) or --file TEMPLATE.jinja"
        )
    return template


def chat_encoder(tokenizer: Tokenizer) -> ChatEncoder:
    return ChatEncoder(tokenizer, template_of(tokenizer), f"the chat template of '{tokenizer.path}'")


@functools.lru_cache(maxsize=4)
def _worker_encoder(tokenizer: Tokenizer, template: str) -> ChatEncoder:
    return ChatEncoder(tokenizer, template)


def encode_batch(
    conversations: list[Conversation], tokenizer: Tokenizer, spec: ChatSpec
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, example lengths, mask) of a batch of conversations, concatenated (the store's writer)."""
    encoder = _worker_encoder(tokenizer, spec.template)
    encoded = [encoder.encode(c) for c in conversations]
    if not encoded:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    ids = np.concatenate([e[0] for e in encoded])
    lengths = np.array([len(e[0]) for e in encoded], np.int64)
    return ids, lengths, np.concatenate([e[1] for e in encoded])


def contents(conversations: Iterator[Any]) -> Iterator[str]:
    """The text of every message, for training a tokenizer on chat data."""
    for conversation in conversations:
        for message in conversation.messages:
            if message["content"]:
                yield message["content"]


__all__ = [
    "ChatEncoder",
    "ChatSpec",
    "Conversation",
    "chat_encoder",
    "contents",
    "encode_batch",
    "parse_messages",
    "template_of",
]
