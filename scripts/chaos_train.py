"""Chaos test: kill training processes at random moments, resume, and end with the weights of a
run that was never interrupted.

A small model trains on 2 CPU processes with expert parallelism (EP=2). The script trains the
uninterrupted reference once, then the same run in rounds, one per entry of --plan (the number of
processes of that round): every round but the last gets a random process SIGKILLed at a random
moment (between steps, inside a step, while a checkpoint is written), as the out-of-memory killer
would, and the next round is the same command with `train.resume=auto`. A round on 1 process runs
the same global batch with parallel.ep_size=1 and train.grad_accum_steps=2. At the end:
- the final weights equal the reference's within --tolerance (the expert-parallel tests' 1e-4);
  when the number of processes changed, the reference for the weights is a replay of the same
  topology without kills (`train.stop_at_step` at the same steps), since 1 and 2 processes sum
  in another order and drift apart (about 2e-2 on these weights after 16 steps, uninterrupted);
- every step's loss equals the 2-process reference's within --loss-tolerance (the same samples:
  a batch trained twice moves it by about 3e-2);
- each killed round's error report is one line naming the killed process and its signal.

    python scripts/chaos_train.py --out /tmp/chaos                    # 3 kills on 2 processes
    python scripts/chaos_train.py --out /tmp/chaos --plan 2,2,1,2     # one resume on 1 process, back on 2

Exit code 0 when all hold, 1 when one does not (the last lines say by how much).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moe_lm.state.resolve import find_latest  # noqa: E402
from moe_lm.state.weights import load_model_state  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="working directory (the reference is reused)")
    p.add_argument(
        "--plan", default="2,2,2,2", help="processes per round; every round but the last is killed"
    )
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--every", type=int, default=2, help="checkpoint.every")
    p.add_argument("--seed", type=int, default=None, help="of the kills (default: random, printed)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |w - w_ref| allowed")
    p.add_argument(
        "--loss-tolerance",
        type=float,
        default=2e-3,
        help="max |loss - loss_ref| at any step (a repeated batch: ~3e-2)",
    )
    return p.parse_args()


def run_config(out: Path, steps: int, every: int) -> Path:
    """A tiny MoE (4 experts, top-2) on the shipped corpus, global batch 8, and its tokenizer."""
    path = out / "run.yaml"
    if path.is_file():
        return path
    from moe_lm.data.tokenizer import train_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    corpus.write_text((REPO / "data" / "tinyshakespeare.txt").read_text()[:120_000])
    tokenizer = train_tokenizer([str(corpus)], 384, out / "tokenizer")
    model = dict(vocab_size=384, hidden_size=48, intermediate_size=64, num_layers=2, num_heads=4)
    model.update(num_kv_heads=2, max_seq_len=64, num_experts=4, top_k=2)
    config = {
        "name": "chaos",
        "model": model,
        "data": {"train_files": [str(corpus)], "tokenizer": str(tokenizer), "seq_len": 32},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"micro_batch_size": 4, "max_steps": steps, "eval_every": 0, "sample_every": 0},
        "parallel": {"ep_size": 2},
        "logging": {"log_every": 1, "progress_bar": False, "peak_tflops": 1.0},
        "checkpoint": {"every": every, "keep_last": 2},
    }
    config["data"]["cache_dir"] = str(out / "cache")
    path.write_text(yaml.safe_dump(config))
    return path


def command(config: Path, run: Path, processes: int) -> list[str]:
    """The requeue command of a round: the same on every round of the same size."""
    accel = REPO / "configs" / "accelerate" / ("cpu-2proc.yaml" if processes == 2 else "cpu-1proc.yaml")
    cmd = [sys.executable, "-m", "moe_lm", "launch", "--config_file", str(accel)]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            cmd += ["--main_process_port", str(s.getsockname()[1])]
    cmd += ["train", str(config), f"train.output_dir={run}", "train.resume=auto"]
    if processes == 1:  # the same global batch of 8 and every expert on the one process
        cmd += ["parallel.ep_size=1", "train.grad_accum_steps=2"]
    return cmd


def last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # the line being written
            continue
        if record.get("kind") == "train":
            steps.append(record["step"])
    return max(steps, default=0)


def workers(launcher: int) -> dict[int, int]:
    """rank -> pid of the training processes a launcher started: its children, by their RANK
    (accelerate's single-process launcher sets none: its one child is rank 0)."""
    found, children = {}, []
    for task in Path(f"/proc/{launcher}/task").iterdir():
        children += (task / "children").read_text().split()
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [e[5:] for e in env if e.startswith(b"RANK=")]
        if ranks:
            found[int(ranks[0])] = int(pid)
        elif len(children) == 1:
            found[0] = int(pid)
    return found


def resume_point(run: Path) -> int:
    """The step `train.resume=auto` continues from: the newest complete checkpoint, as the trainer
    finds it (a kill between a checkpoint's rename and `latest` leaves the pointer one behind)."""
    root = run / "checkpoints"
    found = find_latest(root, warn=False) if root.is_dir() else None
    return int(found.name[5:]) if found is not None else 0


def killed_round(cmd: list[str], run: Path, steps: int, rng: random.Random, keep: int = 0) -> dict[str, Any]:
    """Start a round and SIGKILL one of its processes one or two steps after where it resumed (and
    after `keep` more steps, so that a checkpoint of this round survives), a random moment (up to
    0.2 s) after that step was logged."""
    start = resume_point(run)
    at = start + keep + rng.randint(1, 2)
    if at > steps - 4:  # the kill could come after the end
        raise SystemExit(
            f"round resumed at step {start} of {steps}: too few steps left to kill it; raise --steps"
        )
    delay = rng.uniform(0.0, 0.2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = time.time()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    metrics = run / "metrics.jsonl"
    victim: tuple[int, int] | None = None
    while proc.poll() is None and victim is None:
        time.sleep(0.02)
        # records of this round: the file was rewritten since the launch (a resume cuts it back)
        fresh = metrics.is_file() and metrics.stat().st_mtime > launched
        ranks = workers(proc.pid) if fresh and last_step(run) >= at else {}
        if ranks:
            time.sleep(delay)
            rank = rng.choice(sorted(ranks))
            os.kill(ranks[rank], signal.SIGKILL)
            victim = (rank, ranks[rank])
    _, err = proc.communicate(timeout=600)
    if victim is None:
        raise SystemExit(f"round ended (exit {proc.returncode}) before step {at}:\n{err[-3000:]}")
    # what the launcher reports comes after the run's own log lines: its first line is the cause
    report = [line for line in err.splitlines() if line.startswith(("error:", "Traceback", "---"))]
    expected = f"error: process {victim[0]} was killed by SIGKILL (exit code 137)"
    return {
        "after step": at,
        "killed": f"process {victim[0]}",
        "exit": proc.returncode,
        "first line ok": report[:1] != [] and report[0].startswith(expected) and len(report) == 1,
        "first line": report[0] if report else "",
    }


def finish(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def replay(config: Path, run: Path, segments: list[tuple[int, int]]) -> None:
    """The chaos run's topology without its kills: (processes, until step) in order, each segment
    resumed from the checkpoint the previous one stopped at (train.stop_at_step)."""
    for processes, until in segments:
        finish([*command(config, run, processes), f"train.stop_at_step={until}"])


def segments_of(rounds: list[tuple[int, int]], steps: int) -> list[tuple[int, int]]:
    """(processes, last step) of each stretch of steps, from each round's (processes, resume point):
    the steps a round ran past its successor's resume point were thrown away and run again."""
    out: list[tuple[int, int]] = []
    for i, (processes, start) in enumerate(rounds):
        until = rounds[i + 1][1] if i + 1 < len(rounds) else steps
        if until <= start:
            continue
        if out and out[-1][0] == processes:
            out[-1] = (processes, until)
        else:
            out.append((processes, until))
    return out


def max_diff(a: Path, b: Path) -> float:
    wa, wb = load_model_state(a), load_model_state(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)  # a resume cut any line a kill left half written
        if record.get("kind") == "train":
            out[record["step"]] = record["lm_loss"]
    return out


def main() -> int:
    args = parse_args()
    plan = [int(n) for n in args.plan.split(",")]
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    config = run_config(args.out, args.steps, args.every)
    reference = args.out / "reference"
    final = f"checkpoints/step-{args.steps}"
    if not (reference / final / "MANIFEST.json").is_file():
        finish(command(config, reference, 2))
    name = f"{'-'.join(map(str, plan))}-seed{seed}"
    run = args.out / f"chaos-{name}"
    print(f"chaos: seed {seed}, plan {plan}, {args.steps} steps, checkpoint every {args.every}; run {run}")
    rows, rounds = [], []
    for i, processes in enumerate(plan):
        rounds.append((processes, resume_point(run)))
        cmd = command(config, run, processes)
        if i < len(plan) - 1:
            # a round on another number of processes keeps a checkpoint: its steps count in the end
            keep = args.every if i > 0 and processes != plan[i - 1] else 0
            rows.append(
                {"round": i + 1, "processes": processes, **killed_round(cmd, run, args.steps, rng, keep)}
            )
        else:
            finish(cmd)
            rows.append({"round": i + 1, "processes": processes, "after step": "-", "killed": "-", "exit": 0})
    for r in rows:
        extra = f"  first line: {r['first line']}" if "first line" in r and not r["first line ok"] else ""
        print(
            f"round {r['round']}: {r['processes']} process(es), killed {r['killed']} after step {r['after step']}, exit {r['exit']}{extra}"
        )
    lines_ok = all(r.get("first line ok", True) for r in rows)
    # The run must equal one without kills on the same processes at every step. When the number
    # of processes changed, that is not the 2-process reference: reductions in another order drift
    # (measured: 1 and 2 processes, uninterrupted, 16 steps: 2e-2 on weights, 5e-4 on losses), so
    # the kill-free replay of the same topology is the weights' reference, and the 2-process
    # reference checks, loss by loss, that the sample stream is the same one.
    segments = segments_of(rounds, args.steps)
    exact = reference
    if len(segments) > 1:
        exact = args.out / f"replay-{name}"
        replay(config, exact, segments)
        stretches = ", ".join(f"to step {until} on {p}" for p, until in segments)
        print(
            f"replay without kills: {stretches}; max |w - w_ref| = {max_diff(run / final, reference / final):.3g}"
        )
    diff = max_diff(run / final, exact / final)
    ours, theirs = losses(run), losses(reference)
    loss_diff = max(abs(ours[s] - theirs[s]) for s in theirs)
    ok = (
        diff <= args.tolerance
        and loss_diff <= args.loss_tolerance
        and lines_ok
        and sorted(ours) == sorted(theirs)
    )
    label = "w_ref" if exact == reference else "w_replay"
    print(
        f"max |w - {label}| = {diff:.3g} (tolerance {args.tolerance:g}); max |loss - loss_ref| = {loss_diff:.3g} "
        f"(tolerance {args.loss_tolerance:g}); first error lines name the killed process: {lines_ok}"
    )
    print("chaos: PASS" if ok else "chaos: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
