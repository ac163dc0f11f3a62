"""How long `moe-lm plan` takes and how much memory it needs: a rehearsal allocates no storage.

    python scripts/bench_plan.py            # configs/mixtral-8x7b.yaml on 16 GPUs, the 6 auto layouts
    python scripts/bench_plan.py --quick    # configs/tiny-shakespeare.yaml on 1 GPU, its own layout

Runs `moe-lm plan ... --json` in a fresh process (imports included, as a user runs it) and prints
one table: wall time, peak RSS (the process's high-water mark), layouts, and per layout its
rehearsed depths and peak. The target is <= 60 s and < 2 GB for the full size on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from _bench_common import REPO, header


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny config, one layout: checks the script")
    a = p.parse_args()
    if a.quick:
        args = ["configs/tiny-shakespeare.yaml", "--gpus", "1", "--layouts", "config"]
    else:
        args = ["configs/mixtral-8x7b.yaml", "--gpus", "16"]
    cmd = [sys.executable, "-m", "moe_lm", "plan", *args, "--json"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode not in (0, 2):  # 2: nothing fits, still a complete plan
        print(proc.stdout[-2000:] + proc.stderr[-2000:], file=sys.stderr)
        return 1
    rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    plan = json.loads(proc.stdout)
    print(header("cpu"))
    print(f"command: moe-lm plan {' '.join(args)}\n")
    print("## moe-lm plan\n")
    print("| wall s | peak RSS MiB | layouts | s per layout |")
    print("|-------:|-------------:|--------:|-------------:|")
    n = len(plan["layouts"])
    print(f"| {seconds:.1f} | {rss_mib:,.0f} | {n} | {seconds / n:.1f} |\n")
    print("| layout | rehearsed layers | peak GiB | fits |")
    print("|--------|------------------|---------:|------|")
    for layout in plan["layouts"]:
        depths = "+".join(str(d) for d in layout["depths"])
        print(f"| {layout['layout']} | {depths} | {layout['peak_bytes'] / 1024**3:.1f} | {layout['fits']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
