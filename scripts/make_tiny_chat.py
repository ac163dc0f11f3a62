"""A small conversation set for configs/sft-tiny.yaml, made from nothing but the shipped corpus.

The speeches of data/tinyshakespeare.txt become three kinds of conversation, as JSON Lines:

    who       {"prompt": "Who says this? O Romeo, Romeo! ...", "response": "JULIET."}
    next      system "Answer with the next line of the play." / user: a line / assistant: the line after it
    dialogue  system "You are B. Answer A in one line." / user: A's line / assistant: B's reply (2 exchanges)

"who" records use the prompt/response fields, the others a `messages` list: both formats in one file.
Speeches in the last 5 % of the text (the part the tiny pretraining held out) make the validation
file. Deterministic (seed 0), a second or so:

    python scripts/make_tiny_chat.py [--out DIR] [--corpus FILE]   # .cache/moe_lm/tiny-chat/{train,val}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CORPUS = Path("data/tinyshakespeare.txt")  # run from the repository root, as for every config
OUT = Path(".cache/moe_lm/tiny-chat")
MAX_CHARS = 160  # a line longer than this is not used (keeps most examples well inside 129 tokens)


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of every speech, in order."""
    found = []
    for block in text.split("\n\n"):
        head, _, body = block.strip().partition("\n")
        lines = [line.strip() for line in body.splitlines() if line.strip()]
        if head.endswith(":") and lines:
            found.append((head[:-1], lines))
    return found


def who(speaker: str, lines: list[str]) -> dict[str, str]:
    return {"prompt": f"Who says this? {lines[0]}", "response": f"{speaker.upper()}."}


def next_line(lines: list[str], i: int) -> dict[str, list[dict[str, str]]]:
    return {
        "messages": [
            {"role": "system", "content": "Answer with the next line of the play."},
            {"role": "user", "content": lines[i]},
            {"role": "assistant", "content": lines[i + 1]},
        ]
    }


def dialogue(turns: list[tuple[str, list[str]]]) -> dict[str, list[dict[str, str]]]:
    """Speeches A, B, A, B: the user speaks A's first lines, the assistant B's."""
    a, b = turns[0][0], turns[1][0]
    messages = [{"role": "system", "content": f"You are {b.title()}. Answer {a.title()} in one line."}]
    for k, (_, lines) in enumerate(turns):
        messages.append({"role": "user" if k % 2 == 0 else "assistant", "content": lines[0]})
    return {"messages": messages}


def conversations(part: list[tuple[str, list[str]]], rng: random.Random) -> list[dict]:
    out: list[dict] = []
    for i, (speaker, lines) in enumerate(part):
        short = [line for line in lines if len(line) <= MAX_CHARS]
        if short and rng.random() < 0.35:
            out.append(who(speaker, short))
        if len(short) >= 2 and rng.random() < 0.35:
            j = rng.randrange(len(short) - 1)
            out.append(next_line(short, j))
        chain = part[i : i + 4]
        if (
            len(chain) == 4
            and chain[0][0] == chain[2][0] != chain[1][0] == chain[3][0]
            and all(len(c[1][0]) <= MAX_CHARS for c in chain)
        ):
            out.append(dialogue(chain))
    rng.shuffle(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    args = parser.parse_args()
    text = args.corpus.read_text()
    cut = text.rfind("\n\n", 0, int(0.95 * len(text))) + 2  # where the tiny pretraining's validation starts
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part, seed in (("train", text[:cut], 0), ("val", text[cut:], 1)):
        records = conversations(speeches(part), random.Random(seed))
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        print(f"wrote {path} ({len(records):,} conversations)")


if __name__ == "__main__":
    main()
