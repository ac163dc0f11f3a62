"""The docs tests' own machinery can fail: commands are read from the markdown as a shell reads
them, the tiny-size rules rewrite what they promise, and a line that is only parsed is refused for
a flag, a config key, a config file, a launcher option or a make target that does not exist."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.docs import commands
from tests.docs.commands import (
    ROUTING_TOKENS,
    TINY_OVERRIDES,
    Sandbox,
    StepFailed,
    needs_shell,
    tiny_argv,
)
from tests.docs.markdown import REPO, Command, FileBlock, steps


@pytest.fixture
def box(tmp_path: Path) -> Sandbox:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    return Sandbox(tmp_path)


def test_shell_blocks_are_read_as_a_shell_reads_them(tmp_path: Path) -> None:
    doc = tmp_path / "guide.md"
    doc.write_text(
        "# Guide\n\n```bash\n# a comment line\nmoe-lm info configs/a.yaml   # trailing comment\n"
        "moe-lm launch --config_file x.yaml \\\n  train configs/a.yaml  # not run in tests: needs 2 nodes\n"
        'python -c "print(1)  # not a comment"\n```\n\n'
        "```console\n$ moe-lm eval runs/x\nval_loss 4.12\n```\n\n"
        "```yaml\n# configs/mine.yaml\nmodel: {top_k: 2}\n```\n\n```yaml\nnot: a file\n```\n"
    )
    got = steps(doc)
    assert got == [
        Command("guide.md:5", "moe-lm info configs/a.yaml", None),
        Command(got[1].where, "moe-lm launch --config_file x.yaml train configs/a.yaml", "needs 2 nodes"),
        Command(got[2].where, 'python -c "print(1)  # not a comment"', None),
        Command(got[3].where, "moe-lm eval runs/x", None),
        FileBlock(got[4].where, "configs/mine.yaml", "# configs/mine.yaml\nmodel: {top_k: 2}\n"),
    ]
    assert [g.where for g in got] == ["guide.md:5", "guide.md:6", "guide.md:8", "guide.md:12", "guide.md:16"]


def test_pipes_and_lists_go_to_bash_quoted_text_does_not() -> None:
    assert needs_shell("mkdir -p a && cp b a/") and needs_shell("moe-lm info c --json | head")
    assert not needs_shell('python -c "import x; print(1 > 0)"')


def test_train_gets_the_tiny_overrides_then_scaled_step_counts(box: Sandbox) -> None:
    argv = tiny_argv(
        ["train", "configs/tiny-shakespeare.yaml", "train.micro_batch_size=4", "train.max_steps=1200"],
        box.root,
    )
    assert argv[:7] == ["train", "configs/tiny-shakespeare.yaml", *TINY_OVERRIDES]
    # the line's own overrides come after the tiny ones (so they win), then the scaled counts
    assert argv[7:9] == ["train.micro_batch_size=4", "train.max_steps=1200"]
    assert argv[9:] == [
        "train.max_steps=6",  # 1200 / 200
        "train.eval_every=1",  # tiny-shakespeare.yaml: every 200 steps
        "train.sample_every=0",
        "checkpoint.every=2",  # 400
        "optim.warmup_steps=1",  # 30
        "logging.log_every=1",  # 10
    ]


def test_checkpoint_paths_routing_and_launch_follow_the_rules(box: Sandbox) -> None:
    assert tiny_argv(["eval", "runs/r/checkpoints/step-800"], box.root) == [
        "eval",
        "runs/r/checkpoints/step-4",
        "--max-batches",
        "2",
    ]
    assert tiny_argv(["routing", "runs/r", "--out", "o"], box.root)[-2:] == [
        "--max-tokens",
        str(ROUTING_TOKENS),
    ]
    launched = tiny_argv(
        [
            "launch",
            "--config_file",
            "c.yaml",
            "--num_cpu_threads_per_process",
            "8",
            "train",
            "configs/tiny-shakespeare.yaml",
        ],
        box.root,
    )
    assert launched[:5] == ["launch", "--config_file", "c.yaml", "--num_cpu_threads_per_process", "1"]
    assert launched[5] == "--main_process_port" and int(launched[6]) > 0 and launched[7] == "train"
    assert "train.max_steps=4" in launched


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("moe-lm export runs/x --out e --dtpe bf16", "unrecognized arguments: --dtpe"),
        ("moe-lm train configs/tiny-shakespeare.yaml model.num_expert=4", "did you mean 'model.num_experts'"),
        ("moe-lm train configs/no-such.yaml", "config file 'configs/no-such.yaml' not found"),
        ("moe-lm frobnicate x", "unknown command"),
        (
            "moe-lm launch --config_file configs/accelerate/cpu-2proc.yaml --num_prcesses 2 train configs/tiny-shakespeare.yaml",
            "num_prcesses",
        ),
        (
            "moe-lm launch --config_file configs/accelerate/multi-gpu.yaml train configs/moe-1b.yaml parallel.ep_sise=8",
            "parallel.ep_sise",
        ),
        ("make no-such-target", "No rule to make target"),
        ('make train ARGS="train.max_step=10"', "train.max_step"),
        ("python scripts/bench_train.py --no-such-flag", "refused"),
        ("python scripts/no_such.py", "no script"),
    ],
)
def test_a_line_that_is_only_parsed_must_parse(box: Sandbox, line: str, fragment: str) -> None:
    (box.root / "scripts").symlink_to(REPO / "scripts", target_is_directory=True)
    with pytest.raises(StepFailed) as e:
        box.check(Command("guide.md:1", line, "needs a GPU"))
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    "line",
    [
        "moe-lm launch --config_file configs/accelerate/multi-node-2x8.yaml --machine_rank $NODE_RANK "
        "--main_process_ip $MAIN_NODE_IP --main_process_port 29500 train configs/moe-1b.yaml parallel.ep_size=8",
        'make train HF_HUB_OFFLINE=0 ARGS="hub.push_at_end=true hub.repo_id=you/tiny-moe"',
        "moe-lm push exports/x --repo-id you/x --private",
        "python scripts/bench_peers.py --shapes 64x8x256x128 --tokens 4096 --no-memory",
        "hf download some/repo",
    ],
)
def test_lines_that_parse_pass(box: Sandbox, line: str) -> None:
    (box.root / "scripts").symlink_to(REPO / "scripts", target_is_directory=True)
    box.check(Command("guide.md:1", line, "needs a GPU"))


def test_a_failing_or_unknown_command_stops_the_file_with_its_place(box: Sandbox) -> None:
    with pytest.raises(StepFailed, match=r"guide.md:7: `moe-lm info configs/no-such.yaml` exited with 2"):
        box.run(Command("guide.md:7", "moe-lm info configs/no-such.yaml", None))
    with pytest.raises(StepFailed, match="cannot run `hf`"):
        box.run(Command("guide.md:8", "hf download some/repo", None))
    with pytest.raises(StepFailed, match="runs no moe-lm command"):
        box.run(Command("guide.md:9", "make lint", None))


def test_a_compound_line_is_rewritten_command_by_command(box: Sandbox) -> None:
    line = box.tiny_line(
        Command(
            "guide.md:1",
            "mkdir -p logs && .venv/bin/moe-lm train configs/tiny-shakespeare.yaml train.max_steps=1200 "
            "2>&1 | tee logs/train.txt; (cd runs && python -m moe_lm routing x --out o > /dev/null)",
            None,
        )
    )
    tiny = " ".join(TINY_OVERRIDES)
    assert line == (
        f"mkdir -p logs && moe-lm train configs/tiny-shakespeare.yaml {tiny} train.max_steps=1200 "
        "train.max_steps=6 train.eval_every=1 train.sample_every=0 checkpoint.every=2 optim.warmup_steps=1 "
        "logging.log_every=1 2>&1 | tee logs/train.txt; "
        f"(cd runs && moe-lm routing x --out o --max-tokens {ROUTING_TOKENS} > /dev/null)"
    )


def test_make_in_a_compound_line_becomes_its_recipe_at_tiny_size(box: Sandbox) -> None:
    line = box.tiny_line(Command("guide.md:1", 'make train ARGS="train.max_steps=200" > log.txt', None))
    assert line.startswith("{ MALLOC_MMAP_THRESHOLD_=1073741824 ")
    assert (
        " moe-lm launch --config_file configs/accelerate/cpu-1proc.yaml --num_cpu_threads_per_process 1 "
        in line
    )
    assert " train configs/tiny-shakespeare.yaml train.micro_batch_size=2 " in line
    assert line.endswith(
        " train.max_steps=200 train.max_steps=1 train.eval_every=1 train.sample_every=0 checkpoint.every=2 "
        "optim.warmup_steps=1 logging.log_every=1; } > log.txt"
    )
    with pytest.raises(StepFailed, match="runs no moe-lm command"):
        box.tiny_line(Command("guide.md:2", "make lint | tail -1", None))


def test_moe_lm_and_python_in_bash_are_the_checkout_under_test(
    box: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkout whose moe_lm only reports how it was called: the commands bash runs must reach it,
    # not the moe_lm the environment installed.
    checkout = tmp_path / "checkout"
    (checkout / "moe_lm").mkdir(parents=True)
    (checkout / "moe_lm" / "__init__.py").write_text("")
    (checkout / "moe_lm" / "__main__.py").write_text("import sys\nprint('checkout moe_lm:', *sys.argv[1:])\n")
    monkeypatch.setattr(commands, "CODE", checkout, raising=False)
    ran = box.run(Command("guide.md:1", "moe-lm routing runs/x --out o | cat", None))
    assert ran.output == f"checkout moe_lm: routing runs/x --out o --max-tokens {ROUTING_TOKENS}\n"
    ran = box.run(Command("guide.md:2", "python -c 'import moe_lm; print(moe_lm.__file__)' | cat", None))
    assert ran.output == f"{checkout / 'moe_lm' / '__init__.py'}\n"
    box.run(Command("guide.md:3", "source .venv/bin/activate", None))
    ran = box.run(Command("guide.md:4", "source .venv/bin/activate && command -v moe-lm python", None))
    assert ran.output.split() == [str(box.root / ".venv/bin/moe-lm"), str(box.root / ".venv/bin/python")]


MUTANT = "REPO=$PWD; (cd /tmp/mutant && OMP_NUM_THREADS=1 $REPO/.venv/bin/python -m pytest -q {})"


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (MUTANT.format("tests/unit/test_moe_impl.py -k no_such_test_name"), "selects no test"),
        (
            MUTANT.format("tests/unit/no_such_file.py -k frozen_weights"),
            "no test path tests/unit/no_such_file.py",
        ),
        (
            "REPO=$PWD; (cd /tmp/x && $REPO/.venv/bin/moe-lm train configs/tiny-shakespeare.yaml model.num_expert=4)",
            "did you mean 'model.num_experts'",
        ),
        ("mkdir -p x && python scripts/bench_train.py --no-such-flag | tail -1", "refused"),
        ("PYTHONPATH=/tmp python -m no_such_module_anywhere", "no module no_such_module_anywhere"),
    ],
)
def test_each_command_of_a_compound_line_that_is_only_parsed_must_parse(
    box: Sandbox, line: str, fragment: str
) -> None:
    (box.root / "scripts").symlink_to(REPO / "scripts", target_is_directory=True)
    with pytest.raises(StepFailed) as e:
        box.check(Command("guide.md:1", line, "must fail, on a mutated copy"))
    assert fragment in str(e.value)


def test_the_documented_mutation_lines_parse(box: Sandbox) -> None:
    # docs/design.md's: the same -k as there, so pytest collects once per session.
    for line in (
        MUTANT.format("tests/unit/test_moe_impl.py -k frozen_weights"),
        "REPO=$PWD; (cd /tmp/mutant && OMP_NUM_THREADS=1 PYTHONPATH=/tmp/mutmut-lib $REPO/.venv/bin/python "
        "-m mutmut run --max-children 1)",
    ):
        box.check(Command("guide.md:1", line, "on a mutated copy"))
