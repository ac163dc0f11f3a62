"""The data position a checkpoint keeps: one for the whole run, whatever the number of processes.

    {"format": FORMAT, "seed": 1337, "order": "feistel", "global_batch": 16,
     "epoch": 2, "epoch_samples": 480,       one prepared source: epochs of whole global batches
     "samples": 1760,                        global samples drawn since the start (a mixture's position)
     "sources": [{"name": "web", "weight": 3.0, "streaming": false, "num_blocks": 9120,
                  "fingerprint": "…", "consumed": 1320, "stream": null}, ...]}

`consumed` is how many samples each source has served, `fingerprint` identifies its data (the
token ids of its blocks, or a stream's dataset and tokenizer) so a resume can refuse changed data,
and `stream` is a streaming source's own position, taken when it stood exactly at `consumed` (every
rank's next block of it lies at or after that point, so every rank can continue from it).

Also here: the conversion of per-rank loader states of older checkpoints, and the one-line errors
a resume can end with.
"""

from __future__ import annotations

from typing import Any

from moe_lm.errors import UserError

FORMAT = "moe_lm.data_position/1"


def _best_stream(states: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """Of the ranks' positions in one stream, the furthest: it stands exactly where the run's
    samples of that stream end (every sample before it was drawn by some rank, none after)."""
    found = [s["streams"][name] for s in states if name in s.get("streams", {})]
    return max(found, key=lambda st: int(st["next_ordinal"]), default=None)


def from_rank_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The global position of a checkpoint written before it was global (one loader state per rank,
    positions in batches of that run's micro_batch_size × dp_size)."""
    first = states[0]
    global_batch = int(first["micro_batch_size"]) * int(first["dp_size"])
    samples = int(first["position"]) * global_batch  # into the epoch (one source) or the stream
    num_blocks = first.get("num_blocks")
    named = first.get("sources") or [["corpus", 1.0]]
    streams = first.get("streams", {})
    single = len(named) == 1 and not isinstance(num_blocks, list) and not streams
    total = samples
    if single and isinstance(num_blocks, int):  # epochs of whole global batches before this one
        total += int(first["epoch"]) * (num_blocks // global_batch) * global_batch
    counts = num_blocks if isinstance(num_blocks, list) else [num_blocks]
    sources = [
        {
            "name": name,
            "weight": float(weight),
            "streaming": name in streams or (not single and counts[i] is None),
            "num_blocks": counts[i] if i < len(counts) else None,
            "fingerprint": None,  # older checkpoints identified their data by its size only
            "consumed": None,  # a mixture's: recomputed from its weights
            "stream": _best_stream(states, name),
        }
        for i, (name, weight) in enumerate(named)
    ]
    return {
        "format": FORMAT,
        "seed": int(first["seed"]),
        "order": first.get("order", "legacy-randperm") if single else "feistel",
        "global_batch": global_batch,
        "epoch": int(first["epoch"]) if single else 0,
        "epoch_samples": samples if single else 0,
        "samples": total,
        "sources": sources,
    }


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _source_problem(i: int, s: Any) -> str | None:
    if not isinstance(s, dict):
        return f"sources[{i}] is not an object"
    name = s.get("name")
    if not isinstance(name, str) or not name:
        return f"sources[{i}].name is {name!r}, not a source name"
    weight = s.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 < weight < float("inf"):
        return f"source '{name}' has weight {weight!r}, not a positive number"
    if not isinstance(s.get("streaming"), bool):
        return f"source '{name}' has streaming {s.get('streaming')!r}, not true or false"
    for key in ("num_blocks", "consumed"):
        if s.get(key) is not None and not _count(s[key]):
            return f"source '{name}' has {key} {s[key]!r}, not a count"
    if s.get("fingerprint") is not None and not isinstance(s["fingerprint"], str):
        return f"source '{name}' has fingerprint {s['fingerprint']!r}, not a string"
    stream = s.get("stream")
    if stream is not None and not (isinstance(stream, dict) and _count(stream.get("next_ordinal"))):
        return f"source '{name}' has a stream position without a next_ordinal count"
    return None


def position_problem(position: Any) -> str | None:
    """What is wrong with a saved data position (a file anyone may have edited), or None: a bad one
    must stop the resume, not restart the data or draw from the wrong place."""
    if not isinstance(position, dict):
        return f"it holds a {type(position).__name__}, not an object"
    if position.get("format") != FORMAT:
        return f"its format is {position.get('format')!r}, not {FORMAT!r}"
    for key in ("seed", "epoch", "epoch_samples", "samples"):
        if not _count(position.get(key)):
            return f"{key} is {position.get(key)!r}, not a count"
    if not _count(position.get("global_batch")) or position["global_batch"] == 0:
        return f"global_batch is {position.get('global_batch')!r}, not a positive count"
    if position.get("order") not in ("feistel", "legacy-randperm"):
        return f"order is {position.get('order')!r}, not feistel or legacy-randperm"
    if position["epoch_samples"] > position["samples"]:
        return f"epoch_samples ({position['epoch_samples']}) exceeds samples ({position['samples']})"
    sources = position.get("sources")
    if not isinstance(sources, list) or not sources:
        return "sources is not a list of sources"
    for i, s in enumerate(sources):
        problem = _source_problem(i, s)
        if problem:
            return problem
    names = [s["name"] for s in sources]
    if len(set(names)) != len(names):
        return f"sources name a source twice ({names})"
    return None


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})


def _nearest(values: list[int], target: int, count: int = 6) -> str:
    picked = sorted(sorted(values, key=lambda v: (abs(v - target), v))[:count])
    text = ", ".join(str(v) for v in picked)
    return text if len(picked) == len(values) else f"{text}, ..."


def batch_error(samples: int, where: str, micro_batch_size: int, dp_size: int, saved_batch: int) -> UserError:
    """A global batch that does not divide the samples already drawn: resuming would either repeat
    or skip samples, so refuse, naming micro-batch sizes (or process counts) that continue exactly."""
    new = micro_batch_size * dp_size
    fits = [b for b in _divisors(samples // dp_size)] if samples % dp_size == 0 else []
    if fits:
        fix = (
            f"with {dp_size} process(es) use train.micro_batch_size {_nearest(fits, micro_batch_size)} "
            f"(the checkpoint's global batch was {saved_batch})"
        )
    else:
        fix = (
            f"no train.micro_batch_size does with {dp_size} processes; a number of processes that divides "
            f"{samples} does ({_nearest(_divisors(samples), dp_size)}), as does the checkpoint's global batch "
            f"{saved_batch}"
        )
    return UserError(
        f"the checkpoint stopped {samples} samples {where}, which the new global batch {new} "
        f"(train.micro_batch_size {micro_batch_size} × {dp_size} process(es)) does not divide, so the sample "
        f"stream cannot continue exactly; {fix}"
    )


def changed_data_error(changes: list[str]) -> UserError:
    return UserError(
        f"the training data changed since the checkpoint ({'; '.join(changes)}): resuming would draw a different "
        "sample stream and could move validation blocks into training; resume with the same data files, "
        "tokenizer, data.seq_len and val_fraction, or set train.accept_changed_data=true to continue on the new "
        "data (validation is then re-cut from it)"
    )


__all__ = ["FORMAT", "batch_error", "changed_data_error", "from_rank_states", "position_problem"]
