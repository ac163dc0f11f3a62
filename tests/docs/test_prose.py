"""Flags and config keys named in the text of README.md and docs/*.md exist (tests/docs/prose.py):
renaming an option or a key leaves no guide documenting the old name."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.markdown import doc_files, rel
from tests.docs.prose import flag_problems, key_problems


@pytest.mark.parametrize("doc", doc_files(), ids=rel)
def test_every_flag_in_the_text_is_an_option_of_its_program(doc: Path) -> None:
    assert flag_problems(doc) == []


@pytest.mark.parametrize("doc", doc_files(), ids=rel)
def test_every_config_key_in_the_text_is_a_key_with_a_value_of_its_type(doc: Path) -> None:
    assert key_problems(doc) == []


def _doc(tmp_path: Path, text: str) -> Path:
    doc = tmp_path / "guide.md"
    doc.write_text(text)
    return doc


def test_a_flag_is_an_option_of_the_program_named_nearby(tmp_path: Path) -> None:
    doc = _doc(
        tmp_path,
        "# Guide\n\n## `moe-lm routing`\n\nIt reads `--max-tokens` tokens; `--passage-length` is gone.\n\n"
        "A list:\n\n- `moe-lm export RUN --out DIR` takes `--dtype`, not `--max-tokens`\n"
        "- `scripts/bench_train.py --device cuda --no-such` and `--compile`\n\n"
        "## Elsewhere\n\n`--num_processes N` and `--quiet` are accelerate's; `--frobnicate` is no one's.\n"
        "`pip install --no-deps` and `sbatch --requeue` name their program.\n\n"
        "| flag | what |\n|---|---|\n| `moe-lm info CONFIG --json \\| head -n 1` | fine |\n"
        "| `moe-lm info CONFIG --jsn` | not |\n",
    )
    assert flag_problems(doc) == [
        "guide.md:5: `--passage-length`: --passage-length is not among the options of moe-lm routing",
        "guide.md:9: `--max-tokens`: --max-tokens is not among the options of moe-lm export",
        "guide.md:10: `scripts/bench_train.py --device cuda --no-such`: --no-such is not among the options "
        "of scripts/bench_train.py",
        "guide.md:14: `--frobnicate`: --frobnicate is not among any moe-lm command, accelerate launch or "
        "scripts/*.py",
        "guide.md:20: `moe-lm info CONFIG --jsn`: --jsn is not among the options of moe-lm info",
    ]


def test_a_config_key_is_one_the_strict_loader_knows(tmp_path: Path) -> None:
    doc = _doc(
        tmp_path,
        "# Guide\n\n`train.max_steps`, `data.sources.NAME.weight`, `data.sources.web.weight=2`, "
        "`train.resume=PATH`, `hub.push_at_end: true`, `data.cache_dir/store/`, "
        "`parallel.backend=deepspeed parallel.zero_stage=2` and `data.val_sources.NAME:` are keys;\n"
        "`model.safetensors`, `hub.py` and `data.sources.c4.dataset: cannot load ...` are not.\n"
        "`model.num_expert` → `did you mean` shows a mistake.\n\n"
        "Wrong: `train.max_step`, `data.sources.web.wieght=2`, `train.resume.at`,\n"
        "`model.aux_loss_scope: global`, `train.max_steps=many`, `optim.lr=1e-3 optim.warmup=5`.\n",
    )
    assert key_problems(doc) == [
        "guide.md:7: `train.max_step`: unknown config key 'train.max_step'; did you mean 'train.max_steps'?",
        "guide.md:7: `data.sources.web.wieght=2`: unknown config key 'data.sources.web.wieght'; did you mean "
        "'data.sources.web.weight'?",
        "guide.md:7: `train.resume.at`: 'train.resume' is a value, not a section, so 'train.resume.at' is no key",
        "guide.md:8: `model.aux_loss_scope: global`: model.aux_loss_scope: 'global' is not one of "
        "'micro_batch' | 'global_batch'",
        "guide.md:8: `train.max_steps=many`: train.max_steps: expected an integer, got 'many'",
        "guide.md:8: `optim.lr=1e-3 optim.warmup=5`: unknown config key 'optim.warmup'; did you mean "
        "'optim.warmup_steps'?",
    ]
