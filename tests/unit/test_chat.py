"""Conversations: moe_lm renders and encodes them as transformers' `apply_chat_template` does (same
ids, same assistant masks), finds the assistant's turns in templates without generation tags, and
refuses bad records and templates in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_lm.data.chat import ChatEncoder, ChatSpec, Conversation, parse_messages, template_of
from moe_lm.data.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    TEMPLATE_FILE,
    ChatTemplateError,
    has_generation_tags,
    load_chat_template,
    write_chat_template,
)
from moe_lm.data.tokenizer import Tokenizer, tokenizer_main, train_tokenizer
from moe_lm.errors import UserError

SHAKESPEARE = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare.txt"

# Mixtral-8x7B-Instruct-v0.1's template: no {% generation %} tags, alternating roles enforced.
MIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a player."},
        {"role": "user", "content": "Who says: 'O Romeo, Romeo'? é 😀"},
        {"role": "assistant", "content": "JULIET. </s> and a literal eos"},
        {"role": "user", "content": " And then?\n"},
        {"role": "assistant", "content": "  ROMEO, my lord.\n"},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "日本語\n\n\tTab"}, {"role": "assistant", "content": "<s> <unk> 🙂"}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:200_000])
    return train_tokenizer([str(corpus)], 512, tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="module")
def hf_tok(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)


def _encode(tok_dir: Path, template: str, messages: list[dict]) -> tuple[list[int], list[int]]:
    ids, mask = ChatEncoder(Tokenizer.load(tok_dir), template).encode(Conversation(messages, "test"))
    return ids.tolist(), mask.tolist()


def test_a_trained_tokenizer_carries_the_default_template_where_transformers_reads_it(tok_dir, hf_tok):
    assert (tok_dir / TEMPLATE_FILE).read_text() == DEFAULT_CHAT_TEMPLATE
    assert (
        json.loads((tok_dir / "tokenizer_config.json").read_text())["chat_template"] == DEFAULT_CHAT_TEMPLATE
    )
    assert hf_tok.chat_template == DEFAULT_CHAT_TEMPLATE


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_default_template_ids_and_masks_equal_transformers(tok_dir, hf_tok, index):
    messages = CONVERSATIONS[index]
    ids, mask = _encode(tok_dir, DEFAULT_CHAT_TEMPLATE, messages)
    hf = hf_tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == hf["input_ids"]
    assert mask == hf["assistant_masks"]
    # the assistant's turns are marked with their closing </s>; nothing of the prompt is
    tok = Tokenizer.load(tok_dir)
    marked = [i for i, m in zip(ids, mask) if m]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert marked.count(tok.eos_id) == sum(r.count("</s>") + 1 for r in replies)  # literal </s> is eos too
    assert marked[-1] == tok.eos_id


def test_private_use_characters_in_messages_are_kept_and_forge_no_span(tok_dir, hf_tok):
    """moe_lm brackets the template's generation blocks with private-use characters while rendering;
    a message holding such characters keeps them (the ids equal transformers') and marks nothing."""
    pua = "".join(chr(c) for c in range(0xE000, 0xE020))
    messages = [
        {"role": "user", "content": f"a{pua}b"},
        {"role": "assistant", "content": f"c{pua[::-1]}d"},
    ]
    ids, mask = _encode(tok_dir, DEFAULT_CHAT_TEMPLATE, messages)
    hf = hf_tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == hf["input_ids"]
    assert mask == hf["assistant_masks"]


def test_generation_prompt_equals_transformers(tok_dir, hf_tok):
    encoder = ChatEncoder(Tokenizer.load(tok_dir), DEFAULT_CHAT_TEMPLATE)
    messages = CONVERSATIONS[0][:2]
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert encoder.prompt_ids(messages) == expected
    assert encoder.render(messages, add_generation_prompt=True).endswith(
        "<|user|>\nWho says: 'O Romeo, Romeo'? é 😀\n<|assistant|>\n"
    )


def test_template_without_generation_tags_marks_each_reply_and_its_eos(tok_dir, hf_tok):
    messages = [m for m in CONVERSATIONS[0] if m["role"] != "system"]
    ids, mask = _encode(tok_dir, MIXTRAL_TEMPLATE, messages)
    hf_ids = hf_tok.apply_chat_template(messages, chat_template=MIXTRAL_TEMPLATE, return_dict=False)
    assert ids == hf_ids
    tok = Tokenizer.load(tok_dir)
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    # each marked run is one reply and its </s>: the content decodes back (the literal "</s>" in the
    # first reply is the eos token, as transformers encodes it, and decodes to nothing)
    assert [tok.decode(r) for r in runs] == [replies[0].replace("</s>", ""), replies[1]]
    assert [r[-1] for r in runs] == [tok.eos_id, tok.eos_id]


def test_without_generation_tags_the_separator_after_a_replys_eos_is_no_target(tok_dir, hf_tok):
    """moe_lm's default template without its {% generation %} tags: a newline follows each reply's
    </s>. Found turn by turn, the marked tokens are those transformers marks with the tags: the reply
    and its </s>, not the template's newline after it."""
    untagged = DEFAULT_CHAT_TEMPLATE.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    assert not has_generation_tags(untagged)
    messages = CONVERSATIONS[0]
    ids, mask = _encode(tok_dir, untagged, messages)
    hf = hf_tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assert ids == hf["input_ids"]
    assert mask == hf["assistant_masks"]


def test_without_generation_tags_a_literal_eos_inside_a_reply_does_not_end_its_turn(tok_dir):
    """A template whose turns end with text of its own, not </s>: a reply holding a literal "</s>"
    is marked whole, up to and including the template's end of turn."""
    template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + ' <end>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    messages = [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "A </s> B"}]
    ids, mask = _encode(tok_dir, template, messages)
    tok = Tokenizer.load(tok_dir)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == tok.decode(tok.encode("A ")) + " B <end>\n"


def test_template_refusal_is_one_line_naming_the_record(tok_dir):
    encoder = ChatEncoder(Tokenizer.load(tok_dir), MIXTRAL_TEMPLATE, "the chat template of 'tok'")
    with pytest.raises(
        UserError,
        match=r"^the chat template of 'tok' refused record 7 of f\.jsonl: Conversation roles must alternate",
    ):
        encoder.encode(Conversation(CONVERSATIONS[0], "record 7 of f.jsonl"))


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "the conversation has no assistant turn"),
        (
            {"messages": [{"role": "bot", "content": "hi"}]},
            "message 0 has unknown role 'bot'; roles are system, user, assistant",
        ),
        (
            {"text": "plain"},
            "has no 'messages' list and no 'prompt'/'response' fields (fields: text), so it has no roles",
        ),
        ({"messages": [{"role": "user"}]}, "message 0 is not {role: text, content: text}"),
        ({"messages": []}, "'messages' must be a non-empty list"),
        # a field of the wrong type is refused, never skipped (a dropped system prompt trained silently)
        ({"prompt": "a", "response": "b", "system": 5}, "'system' must be text, not int"),
        ({"prompt": "a", "response": 5}, "'response' must be text, not int"),
        ({"prompt": ["a"], "response": "b"}, "'prompt' must be text, not list"),
        ({"prompt": "a"}, "has 'prompt' but no 'response'"),
    ],
)
def test_bad_records_are_refused_in_one_line(record, words):
    with pytest.raises(UserError) as e:
        parse_messages(record, "messages", "data.train_files: the record at byte 0 of 'x.jsonl'")
    assert words in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("data.train_files: the record at byte 0 of 'x.jsonl'")


def test_prompt_response_records_are_a_user_and_an_assistant_turn():
    record = {"prompt": "Who?", "response": "ROMEO.", "system": "Be brief."}
    assert parse_messages(record, "messages", "r") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who?"},
        {"role": "assistant", "content": "ROMEO."},
    ]
    # a messages list wins over prompt/response; another field name is honoured
    record = {
        "turns": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
        "prompt": "x",
        "response": "y",
    }
    assert parse_messages(record, "turns", "r")[1]["content"] == "b"


def test_template_found_in_the_jinja_file_first_then_the_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": [{"name": "default", "template": "A"}, {"name": "tool_use", "template": "B"}]}
        )
    )
    assert load_chat_template(tmp_path) == "A"
    (tmp_path / TEMPLATE_FILE).write_text("C")
    assert load_chat_template(tmp_path) == "C"
    assert load_chat_template(tmp_path / "missing") is None


def test_tokenizer_without_template_is_refused_with_the_command_that_adds_one(tok_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    with pytest.raises(
        UserError,
        match=r"has no chat template, which chat data needs; add one with `moe-lm tokenizer chat-template .*bare --default`",
    ):
        template_of(Tokenizer.load(bare))
    assert tokenizer_main(["chat-template", str(bare), "--default"]) == 0
    assert template_of(Tokenizer.load(bare)) == DEFAULT_CHAT_TEMPLATE
    capsys.readouterr()
    assert tokenizer_main(["chat-template", str(bare)]) == 0
    assert capsys.readouterr().out == DEFAULT_CHAT_TEMPLATE


def test_a_template_that_does_not_parse_is_refused_before_anything_is_written(tok_dir, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((tok_dir / "tokenizer.model").read_bytes())
    with pytest.raises(UserError, match=r"does not parse .*nothing was written"):
        tokenizer_main(["chat-template", str(folder), "--file", str(bad)])
    assert not (folder / TEMPLATE_FILE).exists()
    with pytest.raises(ChatTemplateError, match="does not parse"):
        write_chat_template(folder, "{% if %}")
    assert not (folder / TEMPLATE_FILE).exists()


def test_chat_spec_reads_columns_and_names_shards_by_template():
    spec = ChatSpec("messages", "T1")
    assert spec.columns(["id", "prompt", "response", "messages"]) == ["messages", "prompt", "response"]
    assert spec.material() != ChatSpec("messages", "T2").material()
    with pytest.raises(UserError, match="has no 'messages' list"):
        spec.check_columns(["text"], "data.sources.web: 'x.parquet'")
