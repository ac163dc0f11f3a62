"""Every command of docs/instruction-tuning.md runs, in order, at tiny size, in a scratch directory
holding what a reader has (configs/, scripts/, and data/ with the first CORPUS_CHARS of the corpus).

The rules: `moe-lm ARGS` runs `moe_lm.cli.main(ARGS)` here and must return 0; a `train` gets
TINY_TRAIN after the line's own overrides (fewer steps; the line's other settings stand);
`generate` makes at most 8 tokens, `eval` reads 2 batches; `python SCRIPT ARGS` runs the script here as `__main__`
(`bench_sft.py` with `--quick`); a `yaml` or `python` block whose first line is `# PATH` is written
to PATH first. The two-process `moe-lm launch` line runs in its own (slow) test.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from moe_lm.cli import main

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "instruction-tuning.md"
TINY_TRAIN = ["train.max_steps=4", "train.eval_every=2", "checkpoint.every=0", "logging.progress_bar=false"]
FENCE = re.compile(r"^```(\w*)\s*$")
CORPUS_CHARS = 150_000  # a seventh of the corpus: the tiny runs, ~1,000 conversations


def steps() -> list[tuple[str, str]]:
    """("file", "PATH\\nCONTENT") and ("run", COMMAND) in the guide's order."""
    found: list[tuple[str, str]] = []
    lines = GUIDE.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        body, lang = lines[i + 1 : end], m.group(1)
        if lang in ("yaml", "python") and body and body[0].startswith("# "):
            found.append(("file", body[0][2:].strip() + "\n" + "\n".join(body[1:]) + "\n"))
        elif lang == "bash":
            found += [("run", line.split("  #")[0].strip()) for line in body if line.strip()]
        i = end + 1
    return found


def run(command: str) -> None:
    argv = shlex.split(command)
    if argv[0] == "moe-lm":
        args = argv[1:]
        if args[0] == "train":
            args += TINY_TRAIN
        if args[0] == "generate":
            args += ["--max-new-tokens", "8"]
        if args[0] == "eval":
            args += ["--max-batches", "2"]
        assert main(args) == 0, command
        return
    assert argv[0] == "python", f"the guide runs only moe-lm and python: {command}"
    script = argv[1]
    if script.endswith("bench_sft.py"):
        argv.append("--quick")
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [script, *argv[2:]]
    sys.path.insert(0, str(Path(script).resolve().parent))  # as `python SCRIPT` does
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv, sys.path[:] = old_argv, old_path


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "scripts").symlink_to(REPO / "scripts", target_is_directory=True)
    shutil.copytree(REPO / "configs", tmp_path / "configs")  # the guide writes a config of its own
    (tmp_path / "data").mkdir()
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:CORPUS_CHARS]
    (tmp_path / "data" / "tinyshakespeare.txt").write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


def test_every_command_of_the_guide_runs(scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ran = []
    for kind, what in steps():
        if kind == "file":
            path, content = what.split("\n", 1)
            (scratch / path).parent.mkdir(parents=True, exist_ok=True)
            (scratch / path).write_text(content)
            continue
        if "moe-lm launch" in what:
            continue  # test_two_process_line_runs
        run(what)
        ran.append(what)
    assert len(ran) >= 12
    out = capsys.readouterr().out
    assert "(over assistant tokens)" in out and "<|assistant|>" in out  # eval, and chat.py's prompt
    assert (scratch / "exports" / "sft-tiny" / "chat_template.jinja").is_file()
    assert (scratch / "sft-tiny-loss.png").stat().st_size > 10_000


@pytest.mark.slow
def test_two_process_line_runs(scratch: Path) -> None:
    run("moe-lm train configs/tiny-shakespeare.yaml")
    run("python scripts/make_tiny_chat.py")
    (line,) = [c for k, c in steps() if k == "run" and "moe-lm launch" in c]
    argv = shlex.split(line)
    env_port = ["--main_process_port", str(29500 + os.getpid() % 1000)]
    assert main([*argv[1:3], *env_port, *argv[3:], *TINY_TRAIN]) == 0
    assert (scratch / "runs" / "sft-tiny-ep2" / "checkpoints" / "step-4").is_dir()
