"""Chat templates: where a tokenizer keeps one, moe_lm's default, and rendering a conversation to text
with the character spans of the assistant's turns.

A template is stored with the tokenizer, where transformers looks for it: `chat_template.jinja` in
the tokenizer folder (transformers 5 reads it first), and the same text under `chat_template` in
`tokenizer_config.json` (older transformers, TGI and vLLM read that). So an imported Mixtral keeps its
own template, and a tokenizer moe_lm trains gets `DEFAULT_CHAT_TEMPLATE`.

Rendering follows transformers' `apply_chat_template`: a sandboxed Jinja environment with
`trim_blocks` and `lstrip_blocks`, `raise_exception`, `strftime_now`, a `tojson` that does not escape
HTML, the special tokens as variables, and message keys whose value is None dropped. The assistant's
spans come from the template's `{% generation %}...{% endgeneration %}` blocks when it has them (as
transformers' `return_assistant_tokens_mask` does); a template without them (Mixtral's own) is
rendered once per assistant turn instead: the turn is what rendering up to and including it adds to
rendering everything before it with the generation prompt, up to and including its last
end-of-sequence token when only whitespace follows it (a separator the template writes after it is
no target).
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

TEMPLATE_FILE = "chat_template.jinja"
ROLES = ("system", "user", "assistant")

# moe_lm's default: every turn starts with '<|role|>' on a line of its own; an assistant turn is its
# content and the end-of-sequence token (both trained on, and generation stops at that token), then a
# newline. The newline and special-token boundaries mean no token ever spans two turns.
DEFAULT_CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "    {%- if message['role'] not in ['system', 'user', 'assistant'] -%}\n"
    "        {{- raise_exception(\"unknown role '\" ~ message['role'] ~ \"' (use system, user or assistant)\") -}}\n"
    "    {%- endif -%}\n"
    "    {{- '<|' + message['role'] + '|>\\n' -}}\n"
    "    {%- if message['role'] == 'assistant' -%}\n"
    "        {%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}\n"
    "        {{- '\\n' -}}\n"
    "    {%- else -%}\n"
    "        {{- message['content'] + '\\n' -}}\n"
    "    {%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{- '<|assistant|>\\n' -}}\n"
    "{%- endif -%}\n"
)

# Two private-use characters bracket each {% generation %} block's output while rendering, and are
# removed (and found) afterwards: for each rendering, the first two that occur nowhere in its input
# (messages, template, special tokens), so no message can forge one and none is changed.
_MARKER_VARIABLES = ("moe_lm_span_open", "moe_lm_span_close")
_PRIVATE_USE = range(0xE000, 0xF900)
_HAS_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(ValueError):
    """The template refused a conversation (its raise_exception) or failed on it."""


def load_chat_template(tokenizer_dir: str | Path) -> str | None:
    """The tokenizer folder's template: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates: the one named "default")."""
    folder = Path(tokenizer_dir)
    if folder.is_file():
        folder = folder.parent
    jinja = folder / TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    found = config.get("chat_template")
    if isinstance(found, list):
        named = {t.get("name"): t.get("template") for t in found if isinstance(t, dict)}
        found = named.get("default")
    return found if isinstance(found, str) and found.strip() else None


def write_chat_template(folder: str | Path, template: str) -> None:
    """Store `template` with the tokenizer in `folder`, in both places transformers reads."""
    folder = Path(folder)
    compile_template(template)  # a template that does not parse is refused before anything is written
    (folder / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _generation_extension() -> type:
    import jinja2
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        """{% generation %}...{% endgeneration %}: the output, bracketed by the span markers."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            markers: list[Any] = [jinja2.nodes.Name(name, "load") for name in _MARKER_VARIABLES]
            call = self.call_method("_mark", markers)
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _mark(self, open_: str, close: str, caller: Any) -> str:
            return f"{open_}{caller()}{close}"

    return GenerationTag


@functools.lru_cache(maxsize=8)
def compile_template(template: str) -> Any:
    """A compiled template in transformers' environment; ChatTemplateError if it does not parse."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_generation_extension(), loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


def has_generation_tags(template: str) -> bool:
    return bool(_HAS_GENERATION.search(template))


def _characters(value: Any, into: set[str]) -> set[str]:
    """Every character of every string in `value` (and its keys), added to `into`."""
    if isinstance(value, str):
        into.update(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _characters(k, into)
            _characters(v, into)
    elif isinstance(value, list | tuple):
        for v in value:
            _characters(v, into)
    return into


def _markers(*inputs: Any) -> tuple[str, str]:
    """Two private-use characters found in none of `inputs`."""
    used = _characters(list(inputs), set())
    free = (chr(c) for c in _PRIVATE_USE if chr(c) not in used)
    return next(free), next(free)


def _clean(value: Any) -> Any:
    """Input for the template: no None-valued message keys."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _render_marked(
    template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, variables: dict[str, str]
) -> tuple[str, tuple[str, str]]:
    """(the rendering with each generation block bracketed, the two bracketing characters)."""
    import jinja2

    markers = _markers(template, messages, variables)
    try:
        marked = compile_template(template).render(
            messages=_clean(messages),
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **variables,
            **dict(zip(_MARKER_VARIABLES, markers)),
        )
        return str(marked), markers
    except jinja2.TemplateError as e:
        raise ChatTemplateError(str(e) or type(e).__name__) from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ChatTemplateError(f"{type(e).__name__}: {e}") from None


def _unmark(rendered: tuple[str, tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Remove the span markers: (text, [(start, end) character offsets of each marked block])."""
    marked, (opening, closing) = rendered
    parts = re.split(f"([{opening}{closing}])", marked)
    text: list[str] = []
    spans: list[tuple[int, int]] = []
    pos, start = 0, None
    for part in parts:
        if part == opening:
            start = pos
        elif part == closing:
            if start is not None and pos > start:
                spans.append((start, pos))
            start = None
        else:
            text.append(part)
            pos += len(part)
    return "".join(text), spans


def render(
    template: str,
    messages: list[dict[str, Any]],
    variables: dict[str, str],
    add_generation_prompt: bool = False,
    assistant_spans: bool = False,
) -> tuple[str, list[tuple[int, int]]]:
    """(text, spans): the conversation as the template writes it and, when `assistant_spans`, the
    character spans of the assistant's turns in it (by generation tags, or turn by turn without them)."""
    text, spans = _unmark(_render_marked(template, messages, add_generation_prompt, variables))
    if not assistant_spans or has_generation_tags(template):
        return text, spans
    return text, _spans_by_prefix(template, messages, variables, text)


def _spans_by_prefix(
    template: str, messages: list[dict[str, Any]], variables: dict[str, str], text: str
) -> list[tuple[int, int]]:
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before, _ = _unmark(_render_marked(template, messages[:i], True, variables))
        through, _ = _unmark(_render_marked(template, messages[: i + 1], False, variables))
        if not text.startswith(through):
            raise ChatTemplateError(
                f"the template writes turn {i} differently once later turns follow, so its tokens cannot be "
                "found; add {% generation %} ... {% endgeneration %} around the assistant's content in it"
            )
        start = 0
        while start < min(len(before), len(through)) and before[start] == through[start]:
            start += 1
        # The turn ends with its end-of-sequence token; whitespace the template writes after it (a
        # newline before the next turn) is the template's, not the assistant's, and is no target.
        end = len(through)
        eos = variables.get("eos_token")
        if eos and eos in through[start:] and not through[through.rindex(eos) + len(eos) :].strip():
            end = through.rindex(eos) + len(eos)
        if start < end:
            spans.append((start, end))
    return spans


__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "ROLES",
    "TEMPLATE_FILE",
    "ChatTemplateError",
    "compile_template",
    "has_generation_tags",
    "load_chat_template",
    "render",
    "write_chat_template",
]
