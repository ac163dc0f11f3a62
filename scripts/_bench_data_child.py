"""One measured run for scripts/bench_data.py: `moe-lm data prepare` or `moe-lm train` in this fresh
process, reporting its wall time and peak RSS. Kept apart from the benchmark (which imports torch
through _bench_common) so that the prepare figures are those of the command alone."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MARK = "@@bench-child@@"  # as _bench_common.CHILD_MARK


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    from moe_lm.cli import main as cli

    mode, config, *overrides = sys.argv[1:]
    argv = ["data", "prepare", config] if mode == "prepare" else ["train", config]
    start = time.perf_counter()
    code = cli([*argv, *overrides])
    payload: dict[str, object] = {
        "code": code,
        "seconds": time.perf_counter() - start,
        "peak_mib": _kib("VmHWM") / 1024,
        # pool workers are joined when the pool closes, so their high-water mark is counted here
        "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        # CPU time of this process and its workers: the work done, whatever else shares the machine
        "cpu_seconds": sum(
            r.ru_utime + r.ru_stime
            for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
        ),
    }
    if mode == "prepare":
        import yaml

        cache = Path(yaml.safe_load(Path(config).read_text())["data"]["cache_dir"])
        manifest = json.loads((cache / "store" / "MANIFEST.json").read_text())
        payload["tokens"] = sum(s["tokens"] for s in manifest["sources"].values())
    print(MARK + json.dumps(payload), flush=True)


if __name__ == "__main__":
    main()
