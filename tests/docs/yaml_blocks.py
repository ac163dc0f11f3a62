"""What a `yaml` block of README.md or docs/*.md must be (tests/docs/test_yaml_blocks.py checks each):

- a moe_lm run config, when its first line is `# PATH` (it is written to PATH for the commands
  after it): it loads with the strict loader (moe_lm/config.py), named after PATH;
- a fragment of one, when every top-level key is a config section (`data:`, `train:`, ...): merged
  over a shipped config (configs/*.yaml; mappings merge key by key, anything else is replaced), it
  loads with the strict loader over at least one of them (the error shown is over the first,
  configs/tiny-shakespeare.yaml);
- an accelerate config (`distributed_type:`, or a PATH under configs/accelerate/): valid YAML, a mapping;
- anything else says what it is in its first line, `# not a moe_lm config: WHAT`, and is valid YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from tests.docs.markdown import FILE_HEADER, REPO, Block, blocks, rel

OTHER = re.compile(r"^#\s*not a moe_lm config:\s*\S")


def yaml_blocks(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.lang in ("yaml", "yml")]


def merged(base: dict[str, Any], fragment: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def problem(block: Block) -> str | None:
    """Why the block is not what it must be (see above), or None."""
    from moe_lm.config import Config, config_from_dict
    from moe_lm.errors import ConfigError

    where = f"{rel(block.path)}:{block.line}"
    first = block.lines[0] if block.lines else ""
    try:
        data = yaml.safe_load("\n".join(block.lines))
    except yaml.YAMLError as e:
        return f"{where}: not valid YAML: {' '.join(str(e).split())}"
    header = FILE_HEADER.match(first)
    if OTHER.match(first):
        return None
    if isinstance(data, dict) and (
        "distributed_type" in data or (header and header.group("path").startswith("configs/accelerate/"))
    ):
        return None
    sections = {f.name for f in dataclasses.fields(Config)}
    if not isinstance(data, dict) or not data or not set(data) <= sections:
        return (
            f"{where}: a yaml block that is neither a moe_lm config (its top-level keys: "
            f"{', '.join(sorted(sections))}) nor an accelerate config; if it is something else, say what "
            "in its first line: `# not a moe_lm config: WHAT`"
        )
    try:
        if header:
            config_from_dict({"name": Path(header.group("path")).stem, **data})
            return None
        errors = []
        for base in sorted(
            (REPO / "configs").glob("*.yaml"), key=lambda p: (p.name != "tiny-shakespeare.yaml", p.name)
        ):
            try:
                config_from_dict(merged(yaml.safe_load(base.read_text()), data))
                return None
            except ConfigError as e:
                errors.append(f"over configs/{base.name}: {e}")
        return f"{where}: the fragment loads over no shipped config; {errors[0]}"
    except ConfigError as e:
        return f"{where}: {e}"
