"""Which block each global sample is, in O(1) memory per source: a seeded permutation computed
per index, and a weighted mixture computed per round.

**Permutation.** `Permutation(n, key)` maps i ↦ π(i), a bijection of [0, n), by a 6-round Feistel
network on the smallest even-bit power of two ≥ n, walking the cycle until the value falls below
n (expected < 4 steps). Nothing of size n is stored — a full `randperm` of 39M blocks (10B tokens
at 256 + 1) would be 312 MB int64 per rank — and the same (n, key) gives the same order on every
machine and numpy version, since it is our own integer arithmetic.

**Mixture.** Global samples are dealt in rounds of R. The count of source s in the first k rounds
is floor(W_{s+1}·kR) − floor(W_s·kR), W being the cumulative normalised weights as exact fractions,
so every prefix of rounds holds each source to within one sample of its weight, with no
accumulating drift; R is large enough that every source appears in every round. Inside a round,
the positions are shuffled by a Permutation keyed by (seed, round). Sample g's source and its
ordinal among that source's samples follow from the round alone, so any process can compute any
sample without replaying the ones before: world size and resumption change nothing.
"""

from __future__ import annotations

import hashlib
from fractions import Fraction

import numpy as np

from moe_lm.errors import ConfigError

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_ROUNDS = 6


def derive_key(*parts: object) -> int:
    """A 64-bit key from any printable parts (seed, source name, epoch, ...)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-spread 64-bit hash (wrapping arithmetic on uint64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Permutation:
    def __init__(self, n: int, key: int) -> None:
        if n < 1:
            raise ValueError(f"cannot permute {n} items")
        self.n = n
        half = max(1, ((n - 1).bit_length() + 1) // 2)  # 2 * half bits cover [0, n)
        self.half = np.uint64(half)
        self.low = np.uint64((1 << half) - 1)
        self.keys = [np.uint64(derive_key(key, r) & 0xFFFFFFFFFFFFFFFF) for r in range(_ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.low
        with np.errstate(over="ignore"):
            for k in self.keys:
                left, right = right, left ^ (_mix(right ^ k) & self.low)
        return (left << self.half) | right

    def __call__(self, i: np.ndarray | int) -> np.ndarray:
        x = np.asarray(i, dtype=np.uint64)
        if np.any(x >= np.uint64(self.n)):
            raise IndexError(f"index out of range [0, {self.n})")
        x = self._feistel(x)
        while True:  # cycle walking: apply again until inside [0, n)
            outside = x >= np.uint64(self.n)
            if not outside.any():
                return x.astype(np.int64)
            x[outside] = self._feistel(x[outside])


class Mixture:
    """Assigns global sample g to (source index, ordinal within that source)."""

    MIN_ROUND = 1024
    MAX_ROUND = 1 << 22

    def __init__(self, weights: list[float], seed: int, names: list[str]) -> None:
        # weights as the decimals they were written as (0.15 is 3/20, not its binary neighbour)
        exact = [Fraction(repr(float(w))) for w in weights]
        shares = [w / sum(exact) for w in exact]
        self.cumulative = [Fraction(0)]
        for share in shares:
            self.cumulative.append(self.cumulative[-1] + share)
        smallest = min(shares)
        round_size = max(self.MIN_ROUND, -(-smallest.denominator // smallest.numerator))
        if round_size > self.MAX_ROUND:
            raise ConfigError(
                f"data.sources weights span more than 1 : {self.MAX_ROUND:,} (smallest share {float(smallest):.2e}); "
                "raise the smallest weight"
            )
        self.round_size = round_size
        self.seed = seed
        self.names = names
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self._cached = None

    @property
    def num_sources(self) -> int:
        return len(self.names)

    def _before(self, k: int) -> list[int]:
        """Samples of each source in rounds [0, k)."""
        n = k * self.round_size
        edges = [(c.numerator * n) // c.denominator for c in self.cumulative]
        return [b - a for a, b in zip(edges, edges[1:])]

    def _round(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position of round k, its ordinal among the round's samples of that source)."""
        if self._cached is None or self._cached[0] != k:
            counts = np.array(self._before(k + 1)) - np.array(self._before(k))
            slot_source = np.repeat(np.arange(self.num_sources), counts)
            perm = Permutation(self.round_size, derive_key("mixture", self.seed, k))
            source = slot_source[perm(np.arange(self.round_size))]
            # a position's ordinal = how many positions of its source come before it in the round
            order = np.argsort(source, kind="stable")
            ordinal = np.empty(self.round_size, dtype=np.int64)
            firsts = np.concatenate(([0], np.cumsum(counts)[:-1]))
            ordinal[order] = np.arange(self.round_size) - firsts[source[order]]
            self._cached = (k, source, ordinal)
        return self._cached[1], self._cached[2]

    def assign(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = np.asarray(g, dtype=np.int64)
        sources = np.empty_like(g)
        ordinals = np.empty_like(g)
        for k in np.unique(g // self.round_size).tolist():
            sel = g // self.round_size == k
            source, ordinal = self._round(k)
            pos = g[sel] % self.round_size
            sources[sel] = source[pos]
            base = np.array(self._before(k), dtype=np.int64)
            ordinals[sel] = base[source[pos]] + ordinal[pos]
        return sources, ordinals

    def consumed(self, n: int) -> list[int]:
        """Samples of each source among global samples [0, n)."""
        k, rest = divmod(n, self.round_size)
        counts = self._before(k)
        if rest:
            source, _ = self._round(k)
            extra = np.bincount(source[:rest], minlength=self.num_sources)
            counts = [c + int(e) for c, e in zip(counts, extra)]
        return counts


__all__ = ["Mixture", "Permutation", "derive_key"]
