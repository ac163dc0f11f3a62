"""Document masking: a packed block computes each of its documents as if it were alone."""

from __future__ import annotations

import pytest
import torch

from moe_lm.data.blocks import document_ids
from moe_lm.model import MoETransformer
from tests.conftest import tiny_model_config

EOS = 2


def _packed() -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Two rows of packed documents (each ending in EOS, the last one cut by the block end) and the
    [start, end) of every document in the flattened rows."""
    gen = torch.Generator().manual_seed(0)
    rows, spans = [], []
    for lengths in ([7, 12, 5, 8], [20, 3, 9]):
        row = []
        for n in lengths:
            start = len(row)
            row += torch.randint(3, 128, (n - 1,), generator=gen).tolist() + [EOS]
            spans.append((len(rows), start, len(row)))
        rows.append(row[:32])
    return torch.tensor(rows), spans


def test_document_ids_count_the_eos_before_each_token() -> None:
    ids = torch.tensor([[5, 2, 7, 7, 2, 2, 9]])
    assert document_ids(ids, EOS).tolist() == [[0, 0, 1, 1, 1, 2, 3]]


@pytest.mark.parametrize("restart_positions", [True, False])
def test_packed_logits_equal_each_document_alone(restart_positions: bool) -> None:
    model = MoETransformer(tiny_model_config()).eval()
    ids, spans = _packed()
    docs = document_ids(ids, EOS)
    # positions restart per document by default; passing them explicitly keeps the block's positions
    positions = None if restart_positions else torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        packed = model(ids, document_ids=docs, position_ids=positions).logits
        plain = model(ids).logits
        worst, leaked = 0.0, 0.0
        for row, start, end in spans:
            end = min(end, ids.shape[1])
            alone = model(ids[row : row + 1, start:end]).logits[0]
            worst = max(worst, float((packed[row, start:end] - alone).abs().max()))
            leaked = max(leaked, float((plain[row, start:end] - alone).abs().max()))
    print(
        f"restart_positions={restart_positions}: max |packed - alone| = {worst:.2e} (no mask: {leaked:.2e})"
    )
    assert worst < 1e-5
    assert leaked > 1e-2  # without the mask, later documents see earlier ones


def test_document_mask_refuses_a_kv_cache() -> None:
    model = MoETransformer(tiny_model_config()).eval()
    ids, _ = _packed()
    out = model(ids[:, :4])
    with pytest.raises(ValueError, match="cannot be combined"):
        model(ids[:, 4:5], cache=out.cache, document_ids=document_ids(ids[:, 4:5], EOS))
