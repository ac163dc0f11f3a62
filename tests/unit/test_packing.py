"""Packing conversations: best-fit rows, labels only on the assistant's tokens and never across two
examples, document ids, truncate/drop counted, validation held out by conversation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_lm.config import config_from_dict
from moe_lm.data.blocks import PAD_DOC, encode_packed, split_inputs
from moe_lm.data.chat import ChatEncoder, Conversation
from moe_lm.data.chat_template import DEFAULT_CHAT_TEMPLATE
from moe_lm.data.corpus import open_data
from moe_lm.data.packing import PackedBlocks, best_fit_decreasing
from moe_lm.data.tokenizer import Tokenizer, train_tokenizer
from moe_lm.errors import UserError

SHAKESPEARE = Path(__file__).resolve().parents[2] / "data" / "tinyshakespeare.txt"
SEQ = 100


def test_best_fit_decreasing_places_each_item_in_the_fullest_row_it_fits():
    offsets, items = best_fit_decreasing(np.array([5, 3, 9, 2, 6, 1]), 10)
    # 9 opens row 0 (room 1), 6 row 1 (room 4), 5 row 2 (room 5); 3 -> row 1 (room 4 is the tightest
    # fit), 2 -> row 2, 1 -> row 1 (room 1, the newest of the two rows with room 1)
    assert offsets.tolist() == [0, 1, 4, 6]
    assert items.tolist() == [2, 4, 1, 5, 0, 3]


def test_best_fit_decreasing_packs_every_item_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=500)
    offsets, items = best_fit_decreasing(lengths, 64)
    assert sorted(items.tolist()) == list(range(500))
    sums = [int(lengths[items[a:b]].sum()) for a, b in zip(offsets[:-1], offsets[1:])]
    assert max(sums) <= 64
    # BFD's guarantee: at most 11/9 OPT + 6/9 rows; OPT ≥ the volume bound and the items over half a row
    lower = max(int(np.ceil(lengths.sum() / 64)), int((lengths > 32).sum()))
    assert lower <= len(sums) <= 11 / 9 * lower + 6 / 9
    again = best_fit_decreasing(lengths, 64)
    assert all(np.array_equal(a, b) for a, b in zip(again, (offsets, items)))


def test_split_inputs_decodes_labels_and_documents_of_a_packed_row():
    ids = np.array([10, 11, 12, 13, 14, 15, 2, 2])
    targets = np.array(
        [0, 0, 1, 1, 1, 1, 0, 0]
    )  # the second example's first token is a target (train_on all)
    docs = np.array([0, 0, 0, 0, 1, 1, 2, 2])  # two examples, then padding
    plain = np.arange(20, 28)
    batch = split_inputs(np.stack([encode_packed(ids, targets, docs), plain]))
    input_ids, labels = batch
    assert input_ids.tolist() == [ids[:-1].tolist(), plain[:-1].tolist()]
    # a label is kept only where the next token is a target of the same example (not at 3: 14 is
    # a target, but of the next example)
    assert labels[0].tolist() == [-100, 12, 13, -100, 15, -100, -100]
    assert labels[1].tolist() == plain[1:].tolist()
    assert batch.document_ids.tolist() == [[0, 0, 0, 0, 1, 1, 2], [0] * 7]
    assert batch.packed_B.tolist() == [True, False]


def test_plain_blocks_decode_exactly_as_before():
    x = torch.randint(0, 60_000, (3, 9))
    batch = split_inputs(x)
    assert torch.equal(batch[0], x[:, :-1]) and torch.equal(batch[1], x[:, 1:])
    assert batch.document_ids is None and batch.packed_B is None


@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("packing")
    corpus = root / "c.txt"
    corpus.write_text(SHAKESPEARE.read_text()[:100_000])
    tok = train_tokenizer([str(corpus)], 384, root / "tok")
    lines = [line for line in SHAKESPEARE.read_text()[:20_000].splitlines() if line.strip()]
    rng = random.Random(0)
    records = []
    for i in range(60):
        k = rng.choice([1, 1, 2, 6])  # a few conversations longer than a row
        messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for _ in range(k):
            messages += [
                {"role": "user", "content": rng.choice(lines)},
                {"role": "assistant", "content": rng.choice(lines)},
            ]
        if i % 4 == 0 and k == 1:
            records.append({"prompt": messages[-2]["content"], "response": messages[-1]["content"]})
            messages = messages[-2:]
        else:
            records.append({"messages": messages})
        records[-1]["_expected"] = messages
    # one conversation whose only reply lies beyond the cut
    long_prompt = [{"role": "user", "content": " ".join(lines[:30])}, {"role": "assistant", "content": "Ay."}]
    records.append({"messages": long_prompt, "_expected": long_prompt})
    path = root / "chat.jsonl"
    path.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "_expected"}) + "\n" for r in records)
    )
    encoder = ChatEncoder(Tokenizer.load(tok), DEFAULT_CHAT_TEMPLATE)
    encoded = [encoder.encode(Conversation(r["_expected"], "")) for r in records]
    return root, tok, path, encoded


def _cfg(root: Path, tok: Path, path: Path, **data) -> object:
    return config_from_dict(
        {
            "model": {
                "vocab_size": 384,
                "hidden_size": 32,
                "intermediate_size": 32,
                "num_layers": 1,
                "num_heads": 2,
                "num_kv_heads": 1,
                "max_seq_len": 128,
                "num_experts": 2,
                "top_k": 1,
            },
            "data": {
                "kind": "chat",
                "train_files": [str(path)],
                "tokenizer": str(tok),
                "seq_len": SEQ,
                "cache_dir": str(root / "cache"),
                "val_fraction": 0.0,
                **data,
            },
        }
    )


def _examples(blocks: PackedBlocks) -> list[tuple[list[int], list[int]]]:
    """(ids, labels of its first len - 1 tokens) of every example in the rows, found by document id;
    the label of an example's last token (the next example's first) must be -100."""
    rows = blocks.read(np.arange(len(blocks)))
    batch = split_inputs(rows)
    ids_full = (rows & ((1 << 32) - 1)).tolist()
    docs_full = ((rows >> 33) & ((1 << 29) - 1)).tolist()  # the row's last token has a document too
    assert batch.document_ids.tolist() == [d[:-1] for d in docs_full]
    found = []
    for row in range(len(blocks)):
        docs, labels = docs_full[row], batch[1][row].tolist()
        bounds = [0] + [t for t in range(1, len(docs)) if docs[t] != docs[t - 1]] + [len(docs)]
        for a, b in zip(bounds, bounds[1:]):
            ids = ids_full[row][a:b]
            if b < len(docs):
                assert labels[b - 1] == -100  # no label crosses into the next example
            found.append((ids, labels[a : a + len(ids) - 1]))
    return found


def _expected(ids: np.ndarray, targets: np.ndarray) -> tuple[list[int], list[int]]:
    labels = [int(i) if t else -100 for i, t in zip(ids[1:], targets[1:])]
    return ids.tolist(), labels


@pytest.mark.parametrize("train_on", ["assistant", "all"])
def test_rows_hold_every_example_whole_with_its_labels_or_cut_and_counted(chat_setup, train_on):
    root, tok, path, encoded = chat_setup
    cfg = _cfg(root, tok, path, train_on=train_on)
    blocks = open_data(cfg, Tokenizer.load(tok)).train[0].blocks
    assert isinstance(blocks, PackedBlocks)
    row = SEQ + 1
    expected = []
    truncated = no_target = 0
    for ids, mask in encoded:
        targets = mask if train_on == "assistant" else np.ones_like(mask)
        if len(ids) > row:
            ids, targets = ids[:row], targets[:row]
            if not targets[1:].any():
                no_target += 1
                continue
            truncated += 1
        expected.append(_expected(ids, targets))
    got = [e for e in _examples(blocks) if any(i != 2 for i in e[0])]  # padding is eos only
    assert sorted(map(str, got)) == sorted(map(str, expected))
    r = blocks.report
    assert (r.examples, r.truncated, r.dropped_no_target, r.dropped_long) == (
        len(expected),
        truncated,
        no_target,
        0,
    )
    assert truncated >= 3 and (no_target == 1) == (train_on == "assistant")
    assert r.padding == len(blocks) * row - sum(len(e[0]) for e in expected)
    assert len(blocks) < len(expected)  # rows hold several examples
    # the padding is marked as such (routed to no expert): every input token but the padding is real
    batch = split_inputs(blocks.read(np.arange(len(blocks))))
    assert batch.real_BT is not None
    filled = [
        int(blocks.lengths[blocks.items[a:b]].sum()) for a, b in zip(blocks.offsets, blocks.offsets[1:])
    ]
    assert batch.real_BT.sum(dim=1).tolist() == [min(n, SEQ) for n in filled]


def test_drop_leaves_out_long_examples_and_counts_them(chat_setup):
    root, tok, path, encoded = chat_setup
    blocks = open_data(_cfg(root, tok, path, too_long="drop"), Tokenizer.load(tok)).train[0].blocks
    long = sum(len(ids) > SEQ + 1 for ids, _ in encoded)
    assert (blocks.report.dropped_long, blocks.report.truncated) == (long, 0)
    assert blocks.report.examples == len(encoded) - long
    assert f"{long:,} longer than {SEQ + 1} tokens dropped" in blocks.report.line()


def test_validation_holds_out_the_last_conversations(chat_setup):
    root, tok, path, encoded = chat_setup
    data = open_data(_cfg(root, tok, path, val_fraction=0.25), Tokenizer.load(tok))
    train, val = data.train[0].blocks, data.val["corpus"]
    n, n_val = len(encoded), round(len(encoded) * 0.25)
    # kept: all but the cut one whose reply is beyond the cut (the last record, so held out)
    assert (train.report.examples, val.report.examples) == (n - n_val, n_val - 1)
    assert val.report.dropped_no_target == 1
    held = [str(e) for e in _examples(val) if any(i != 2 for i in e[0])]  # padding is eos only
    trained = {str(e) for e in _examples(train)}
    assert len(held) == n_val - 1 and not set(held) & trained


def test_nothing_fits_is_one_line(chat_setup):
    root, tok, path, _ = chat_setup
    with pytest.raises(UserError, match=r"no conversation fits in data.seq_len \+ 1 = 6 tokens"):
        open_data(_cfg(root, tok, path, seq_len=5, too_long="drop"), Tokenizer.load(tok))


def test_a_packed_row_computes_each_example_as_if_alone(chat_setup):
    from moe_lm.model import MoETransformer
    from tests.conftest import tiny_model_config

    root, tok, path, encoded = chat_setup
    blocks = open_data(_cfg(root, tok, path), Tokenizer.load(tok)).train[0].blocks
    rows = [r for r in range(len(blocks)) if blocks.offsets[r + 1] - blocks.offsets[r] >= 2][:2]
    batch = split_inputs(blocks.read(np.array(rows)))
    torch.manual_seed(0)
    model = MoETransformer(tiny_model_config(vocab_size=384, max_seq_len=128)).eval()
    with torch.no_grad():
        logits = model(batch[0], document_ids=batch.document_ids).logits
        for r in range(len(rows)):
            docs = batch.document_ids[r]
            for d in docs.unique().tolist():
                cols = (docs == d).nonzero().flatten()
                alone = model(batch[0][r : r + 1, cols]).logits[0]
                assert torch.allclose(logits[r, cols], alone, atol=1e-5)


@pytest.mark.parametrize("path", ["chunked", "autocast", "no-grad"])
def test_a_micro_batch_without_targets_has_lm_loss_0_not_nan(path):
    """A packed micro-batch with no assistant token weighs 0 in its step (train/step.py lm_weights),
    and 0 * NaN is NaN: its lm_loss must be 0 on every path the loss is computed by: the chunked
    loss (fp32 training), cross_entropy under autocast (bf16 on GPU) and without grad (evaluation)."""
    from moe_lm.config import ModelConfig
    from moe_lm.model import MoETransformer

    torch.manual_seed(0)
    model = MoETransformer(
        ModelConfig(
            vocab_size=64, hidden_size=32, intermediate_size=32, num_layers=1, num_heads=2,
            num_kv_heads=1, max_seq_len=16, num_experts=2, top_k=1,
        )
    )  # fmt: skip
    ids = torch.randint(3, 64, (2, 16))
    labels = torch.full_like(ids, -100)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=path == "autocast")
    with autocast, torch.set_grad_enabled(path != "no-grad"):
        out = model(ids, labels=labels, return_logits=False)
    assert out.lm_loss is not None and float(out.lm_loss) == 0.0
    assert torch.isfinite(out.loss)
    if path != "no-grad":
        (out.lm_loss * 0.0).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_padding_of_a_packed_row_is_routed_to_no_expert():
    """The expert loads and router losses of a packed row are its examples' alone: padding (eos
    tokens after the last example) takes no expert, as transformers' masked balancing loss has it."""
    from types import SimpleNamespace

    from moe_lm.config import ModelConfig
    from moe_lm.model import MoETransformer
    from moe_lm.train.step import forward

    torch.manual_seed(0)
    model = MoETransformer(
        ModelConfig(
            vocab_size=64, hidden_size=32, intermediate_size=32, num_layers=2, num_heads=2,
            num_kv_heads=1, max_seq_len=32, num_experts=4, top_k=2,
        )
    ).eval()  # fmt: skip
    examples = [torch.randint(3, 64, (10,)), torch.randint(3, 64, (7,))]
    row_len = 24
    ids = np.full(row_len, 2)
    ids[:17] = torch.cat(examples).numpy()
    docs = np.array([0] * 10 + [1] * 7 + [0] * 7)
    docs[17:] = PAD_DOC
    batch = split_inputs(encode_packed(ids[None], np.ones((1, row_len), np.uint8), docs[None]))
    assert batch.real_BT is not None and int(batch.real_BT.sum()) == 17
    cfg = SimpleNamespace(data=SimpleNamespace(document_mask=False))
    with torch.no_grad():
        packed = forward(cfg, torch.device("cpu"), 2, model, batch)
        alone = [model(e[None]) for e in examples]
        counted = model.route_counts(batch[0], attention_mask=batch.real_BT, document_ids=batch.document_ids)
    expected = sum(out.expert_counts_LE for out in alone)
    assert packed.expert_counts_LE.tolist() == expected.tolist()
    assert counted.tolist() == expected.tolist()  # global-batch balancing's counting pass too
    assert int(packed.expert_counts_LE.sum()) == 17 * 2 * 2  # real tokens x top_k x MoE layers
