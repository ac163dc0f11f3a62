"""Routing health in the training metrics: router entropy in train records, consecutive-token
repetition in eval records, checked against a recomputation with the final weights."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moe_lm.data.corpus import open_data
from moe_lm.data.loader import eval_batches
from moe_lm.data.tokenizer import Tokenizer
from moe_lm.state.weights import load_pretrained
from moe_lm.train.callbacks import default_callbacks
from tests.integration.test_callbacks import fit


def test_router_entropy_and_repetition_are_logged(make_config) -> None:
    cfg = make_config(train={"max_steps": 3, "eval_every": 0, "eval_batches": 4}, logging={"log_every": 1})
    trainer = fit(cfg, default_callbacks(cfg))
    lines = (cfg.output_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    # A freshly initialised router (std 0.02) is nearly uniform: entropy close to ln E.
    assert len(train[0]["router_entropy"]) == cfg.model.num_layers
    assert train[0]["router_entropy"] == pytest.approx([math.log(4)] * 2, abs=0.01)
    assert all(0 < v <= math.log(4) + 1e-6 for r in train for v in r["router_entropy"])

    # The final evaluation ran with the final weights: recompute its repetition from scratch.
    final = evals[-1]
    _, model = load_pretrained(cfg.output_dir)
    data = open_data(cfg, Tokenizer.load(cfg.data.tokenizer), train=False)
    choices: list[list[torch.Tensor]] = [[] for _ in model.moe_layers]
    for i, layer in enumerate(model.moe_layers):
        layer.router.register_forward_hook(lambda m, a, out, i=i: choices[i].append(out.topk_idx_TK))
    pairs, first, either = (torch.zeros(len(choices)) for _ in range(3))
    with torch.no_grad():
        for blocks in data.val.values():
            for ids, _ in eval_batches(
                blocks, cfg.train.micro_batch_size, max_batches=cfg.train.eval_batches
            ):
                model.eval()(ids)
                for i, got in enumerate(choices):
                    idx = got.pop().view(ids.shape[0], ids.shape[1], -1)
                    a, b = idx[:, :-1], idx[:, 1:]
                    pairs[i] += a[..., 0].numel()
                    first[i] += (a[..., 0] == b[..., 0]).sum()
                    pairs_k = zip(a.reshape(-1, 2).tolist(), b.reshape(-1, 2).tolist())
                    either[i] += sum(bool(set(x) & set(y)) for x, y in pairs_k)
    assert final["repetition_first"] == pytest.approx((first / pairs).tolist(), abs=1e-5)
    assert final["repetition_either"] == pytest.approx((either / pairs).tolist(), abs=1e-5)
    assert trainer.step == 3
