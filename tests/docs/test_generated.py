"""The generated parts of the docs are current, and `moe-lm --help` says what the README's command
table says: one source (COMMANDS and USAGE in moe_lm/cli/__init__.py) for both."""

from __future__ import annotations

import importlib.util
import re
import shlex

import pytest

from moe_lm.cli import COMMANDS, USAGE, main, summary, synopsis
from tests.docs.commands import moe_lm_argv, split_env
from tests.docs.markdown import REPO, Command, doc_files, steps


def _gen_docs():  # scripts/ is not a package
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_parts_are_current() -> None:
    stale = _gen_docs().stale_parts()
    assert stale == {}, "run `python scripts/gen_docs.py`:\n" + "".join(stale.values())


def test_a_stale_part_is_found(tmp_path) -> None:
    gen = _gen_docs()
    (tmp_path / "docs").mkdir()
    for rel in ("README.md", "docs/configuration.md"):
        (tmp_path / rel).write_text((REPO / rel).read_text())
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text().replace("sample text with a KV cache", "sample text"))
    assert list(gen.stale_parts(tmp_path)) == ["README.md"]


def test_every_command_has_a_usage_line_and_an_existing_guide() -> None:
    assert set(USAGE) == set(COMMANDS)
    missing = [guide for _, guide in USAGE.values() if not (REPO / guide).is_file()]
    assert missing == []


def test_top_level_help_is_the_command_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, _, help_) in COMMANDS.items():
        assert f"  {synopsis(name)}\n      {help_}  [{USAGE[name][1]}]" in out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_each_commands_help_ends_with_its_table_row(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(summary(name))
    assert f"guide: {USAGE[name][1]}" in out
    out = out[: out.rindex(summary(name))]  # the parser's own help: what the command really takes
    # Every --flag the table shows is one the command takes (sub-commands: the first word of the usage).
    flags = re.findall(r"--[\w-]+", USAGE[name][0])
    if name == "launch":  # the options are accelerate's; the README shows none of them by name
        return
    sub = USAGE[name][0].split()[0]
    if sub.isalpha() and sub.islower():  # `data prepare`, `tokenizer train`
        assert main([name, sub, "--help"]) == 0
        out = capsys.readouterr().out
        out = out[: out.rindex(summary(name))]
    missing = [f for f in flags if f not in out]
    assert missing == [], f"moe-lm {name} --help does not mention {missing}"


def test_every_command_is_shown_in_a_guide_or_the_readme() -> None:
    shown = set()
    for doc in doc_files():
        for step in steps(doc):
            if isinstance(step, Command):
                argv = moe_lm_argv(split_env(shlex.split(step.text))[1])
                if argv:
                    shown.add(argv[0])
    assert set(COMMANDS) - shown == set()


def test_a_command_given_a_run_folder_in_the_docs_says_so_in_its_table_row() -> None:
    # `moe-lm export runs/my-model` in the README's tutorial against a row saying `export CHECKPOINT`:
    # a reader of the table would not know that a run folder (its newest checkpoint) is taken.
    wrong = []
    for doc in doc_files():
        for step in steps(doc):
            if not isinstance(step, Command):
                continue
            argv = moe_lm_argv(split_env(shlex.split(step.text))[1]) or []
            if len(argv) < 2 or argv[0] not in USAGE or argv[0] == "launch":
                continue
            first = argv[1]
            placeholder = USAGE[argv[0]][0].split()[0]
            if re.fullmatch(r"runs/[^/]+/?", first) and "RUN" not in placeholder:
                wrong.append(f"{step.where}: `moe-lm {argv[0]} {first}` but the table says {placeholder}")
    assert wrong == []
