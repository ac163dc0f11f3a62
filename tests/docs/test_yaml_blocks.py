"""Every `yaml` block of README.md and docs/*.md is a moe_lm config or fragment that loads with the
strict loader, an accelerate config, or says what else it is (tests/docs/yaml_blocks.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs.markdown import doc_files, rel
from tests.docs.yaml_blocks import problem, yaml_blocks


@pytest.mark.parametrize("doc", doc_files(), ids=rel)
def test_every_yaml_block_loads_as_what_it_is(doc: Path) -> None:
    assert [p for b in yaml_blocks(doc) if (p := problem(b))] == []


def test_a_mistake_in_any_yaml_block_is_found(tmp_path: Path) -> None:
    doc = tmp_path / "guide.md"
    doc.write_text(
        "# Guide\n\n"
        "```yaml\ndata:\n  sources:\n    code: {dataset: bigcode/the-stack-smol, dataset_confg: data/python}\n```\n\n"
        "```yaml\n# configs/mine.yaml\nmodel: {num_experts: 4, top_k: 8}\n```\n\n"
        "```yaml\ntrain: {max_steps: 10}\n```\n\n"
        "```yaml\n# configs/accelerate/mine.yaml\ndistributed_type: MULTI_GPU\nnum_processes: [2\n```\n\n"
        "```yaml\ncompute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\n```\n\n"
        "```yaml\nsteps: [checkout, test]\n```\n\n"
        "```yaml\n# not a moe_lm config: a CI workflow\nsteps: [checkout, test]\n```\n"
    )
    found = [problem(b) for b in yaml_blocks(doc)]
    assert found[0] is not None and found[0].startswith(
        "guide.md:3: the fragment loads over no shipped config; over configs/tiny-shakespeare.yaml: unknown "
        "config key 'data.sources.code.dataset_confg'; did you mean 'data.sources.code.dataset_config'? "
    )
    assert found[1] is not None and found[1].startswith("guide.md:9: model.top_k")
    assert found[2] is None  # a fragment that loads over configs/tiny-shakespeare.yaml
    assert found[3] is not None and found[3].startswith("guide.md:18: not valid YAML: while parsing a flow")
    assert found[4] is None
    assert found[5] == (
        "guide.md:29: a yaml block that is neither a moe_lm config (its top-level keys: checkpoint, data, hub, "
        "logging, model, name, optim, parallel, train) nor an accelerate config; if it is something else, "
        "say what in its first line: `# not a moe_lm config: WHAT`"
    )
    assert found[6] is None
