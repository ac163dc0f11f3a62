"""Two text domains for configs/tiny-two-domains.yaml, from nothing but the shipped corpus:

    shakespeare      data/tinyshakespeare.txt, its last 5 % held out for validation
    arithmetic       generated: small functions in a Python-like notation and their values,
                     about as many bytes as the Shakespeare part, deterministic (seed 0)

Written to .cache/moe_lm/two-domains/{shakespeare,arithmetic}-{train,val}.txt (a few seconds).

    python scripts/make_two_domains.py
"""

from __future__ import annotations

import random
from pathlib import Path

OUT = Path(".cache/moe_lm/two-domains")
NAMES = ("total", "count", "width", "price", "score", "delta", "limit", "offset")


def arithmetic(rng: random.Random, size: int) -> str:
    """Function definitions, calls and their results, e.g.
    def price(x, y):
        return 7 * x + y - 3
    price(4, 9) = 34
    """
    parts, length = [], 0
    while length < size:
        name = f"{rng.choice(NAMES)}_{rng.randrange(100)}"
        a, b, c = rng.randrange(2, 10), rng.randrange(1, 10), rng.randrange(0, 20)
        op = rng.choice(["+", "-"])
        lines = [f"def {name}(x, y):", f"    return {a} * x {op} {b} * y + {c}"]
        for _ in range(rng.randrange(1, 4)):
            x, y = rng.randrange(0, 50), rng.randrange(0, 50)
            value = a * x + b * y + c if op == "+" else a * x - b * y + c
            lines.append(f"{name}({x}, {y}) = {value}")
        block = "\n".join(lines) + "\n\n"
        parts.append(block)
        length += len(block)
    return "".join(parts)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    text = Path("data/tinyshakespeare.txt").read_text()
    cut = text.rfind("\n\n", 0, int(0.95 * len(text))) + 2  # at a speaker boundary
    files = {
        "shakespeare-train.txt": text[:cut],
        "shakespeare-val.txt": text[cut:],
        "arithmetic-train.txt": arithmetic(random.Random(0), cut),
        "arithmetic-val.txt": arithmetic(random.Random(1), len(text) - cut),
    }
    for name, content in files.items():
        (OUT / name).write_text(content)
        print(f"wrote {OUT / name} ({len(content):,} bytes)")


if __name__ == "__main__":
    main()
