"""Small conversation files for the instruction-tuning tests, made from the shipped corpus."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def conversations(n: int, seed: int) -> list[dict[str, Any]]:
    """`n` records: a third prompt/response, the rest `messages` with a system turn now and then and
    one or two exchanges; replies are short lines, prompts lines of the corpus."""
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()[:60_000]
    lines = [line[:32] for line in text.splitlines() if line.strip()]  # most conversations fit 65 tokens
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(n):
        if i % 3 == 0:
            out.append({"prompt": rng.choice(lines), "response": rng.choice(lines)})
            continue
        messages = [{"role": "system", "content": "Answer in one line."}] if i % 3 == 1 else []
        for _ in range(rng.choice([1, 2])):
            messages += [
                {"role": "user", "content": rng.choice(lines)},
                {"role": "assistant", "content": rng.choice(lines)},
            ]
        out.append({"messages": messages})
    return out


def messages_of(record: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in record:
        return record["messages"]  # type: ignore[no-any-return]
    return [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["response"]},
    ]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_sections(train: Path, val: Path, **data: Any) -> dict[str, Any]:
    """The `data` section of a chat run over these files (with run_config_dict)."""
    return {"kind": "chat", "train_files": [str(train)], "val_files": [str(val)], "seq_len": 64, **data}
