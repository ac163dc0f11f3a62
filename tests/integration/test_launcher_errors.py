"""Bad input stays one line and exit code 2 under the launchers: `moe-lm launch` (accelerate's launch
code with our error contract), `make train` and `make train-ep2`.

Plain `accelerate launch` adds its own traceback (or torchrun's report) and exits 1 whatever the
worker does; moe_lm/cli/launch.py says why. These run real launches in subprocesses (a few seconds
each), one per path a bad input can take: refused in the launching process, by every worker, by
rank 0 while rank 1 waits at a barrier; and a worker that crashes for another reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import run_config_dict

REPO = Path(__file__).resolve().parents[2]
ONE = str(REPO / "configs" / "accelerate" / "cpu-1proc.yaml")
TWO = str(REPO / "configs" / "accelerate" / "cpu-2proc.yaml")

pytestmark = pytest.mark.slow


def run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    # as a user's shell: under `make test` the inherited MAKELEVEL would turn `make:` into `make[1]:`
    outer = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    full = {**outer, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=full, timeout=300)


def launch(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    if TWO in args:  # a free port: accelerate warns on stderr when another run holds its default
        args = ("--main_process_port", str(_free_port()), *args)
    return run([sys.executable, "-m", "moe_lm", "launch", *args], **env)


def one_line(proc: subprocess.CompletedProcess[str], *fragments: str, code: int = 2) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def config(corpus: Path, tokenizer_dir: Path, tmp_path: Path):
    def make(**sections: dict[str, Any]) -> tuple[Path, Path]:
        data = run_config_dict(corpus, tokenizer_dir, tmp_path / "run", **sections)
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(data))
        return path, tmp_path / "run"

    return make


def test_a_config_error_is_refused_before_any_worker_starts(config) -> None:
    path, run_dir = config()
    proc = launch("--config_file", TWO, "train", str(path), "train.max_step=10")
    one_line(proc, "unknown config key 'train.max_step'", "did you mean 'train.max_steps'?")
    assert not run_dir.exists()


def test_an_error_found_by_the_worker_is_one_line(config, tmp_path: Path) -> None:
    path, run_dir = config()
    proc = launch("--config_file", ONE, "train", str(path), f"data.train_files=[{tmp_path}/nope.txt]")
    one_line(proc, "data.train_files: file", "nope.txt' not found")
    assert not run_dir.exists()


def test_an_error_on_rank_0_while_rank_1_waits_is_one_line(config, tmp_path: Path) -> None:
    """Rank 0 prepares the data and fails; rank 1 waits in a barrier and loses its peer. Without the
    launcher's handling: both ranks' lines, rank 1's traceback, torchrun's report and exit 1."""
    (tmp_path / "b.txt").write_bytes(bytes(range(256)) * 64)
    path, run_dir = config(data={"train_files": [str(tmp_path / "b.txt")], "cache_dir": str(tmp_path / "c")})
    proc = launch("--config_file", TWO, "train", str(path), "parallel.ep_size=2")
    one_line(proc, "b.txt' is binary (NUL bytes)")
    assert not run_dir.exists()


def test_a_crash_that_is_not_bad_input_keeps_its_traceback_and_exit_code(config) -> None:
    path, _ = config()
    proc = launch("--config_file", ONE, "train", str(path), MOE_LM_FAULT="no-such-point:1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("error: process 0 crashed with ValueError: MOE_LM_FAULT='no-such-point:1'")
    assert lines[0].endswith("(exit code 1); its traceback follows")
    assert lines[1:3] == ["--- process 0 ---", "Traceback (most recent call last):"]
    assert "CalledProcessError" not in proc.stderr


def corrupt_parquet(path: Path, corpus: Path) -> Path:
    """A parquet file whose footer reads but whose first page does not decompress."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": corpus.read_text().split("\n\n")}), path, compression="snappy")
    column = pq.ParquetFile(path).metadata.row_group(0).column(0)
    data = bytearray(path.read_bytes())
    start = (column.dictionary_page_offset or column.data_page_offset) + 2000
    data[start : start + 64] = bytes(b ^ 0xFF for b in data[start : start + 64])
    path.write_bytes(bytes(data))
    assert pq.ParquetFile(path).metadata.num_rows > 0
    return path


def test_rank_0s_crash_comes_first_not_rank_1s_pointer_to_it(config, corpus: Path, tmp_path: Path) -> None:
    """Was: `error: the token store for data.train_files was not built (...); see the main process's
    error above`, exit 2, and rank 0's OSError nowhere."""
    bad = corrupt_parquet(tmp_path / "bad.parquet", corpus)
    path, _ = config(data={"train_files": [str(bad)], "cache_dir": str(tmp_path / "c")})
    proc = launch("--config_file", TWO, "train", str(path), "parallel.ep_size=2")
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert lines[0] == (
        "error: process 0 crashed with OSError: Corrupt snappy compressed data. (exit code 1); its traceback follows"
    )
    assert lines[1:3] == ["--- process 0 ---", "Traceback (most recent call last):"]
    assert lines[-1] == "OSError: Corrupt snappy compressed data."
    for consequence in ("was not built", "main process's error", "process 1", "Connection closed"):
        assert consequence not in proc.stderr


def test_quiet_keeps_the_error_line(config, tmp_path: Path) -> None:
    """Was: nothing at all, and exit code 1 (accelerate's --quiet turns a failed worker into exit 1)."""
    path, _ = config()
    proc = launch(
        "--quiet", "--config_file", ONE, "train", str(path), f"data.train_files=[{tmp_path}/nope.txt]"
    )
    one_line(proc, "data.train_files: file", "nope.txt' not found")


def test_a_killed_rank_is_the_first_line_not_its_peers_traceback(config) -> None:
    """Was: rank 0's gloo traceback ("Connection reset by peer"), then the kill."""
    path, _ = config(checkpoint={"every": 0})
    proc = launch("--config_file", TWO, "train", str(path), "parallel.ep_size=2", MOE_LM_FAULT="mid_step:3@1")
    assert proc.returncode == 128 + 9, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        "error: process 1 was killed by SIGKILL (exit code 137); if no one sent it, the kernel's out-of-memory "
        "killer did (see `dmesg`); continue with train.resume=auto"
    ]


def test_a_failed_2_process_run_keeps_the_wandb_records_it_logged(config, tmp_path: Path) -> None:
    """Was: a worker of a multi-process run left with a bare os._exit (moe_lm/cli/train.py), so rank 0's
    unfinished wandb run was never written: its offline file held 7 bytes, none of the 2 steps logged
    before the failure (one process keeps them: wandb's exit hook finishes the run)."""
    path, run_dir = config(logging={"log_every": 1, "progress_bar": False, "wandb": True})
    proc = launch(
        "--config_file",
        TWO,
        "train",
        str(path),
        "parallel.ep_size=2",
        MOE_LM_FAULT="enospc_metrics:3",  # rank 0 (which alone writes records) fails at step 3: exit 2
        WANDB_MODE="offline",
        HOME=str(tmp_path),  # no ~/.netrc, no wandb settings from outside
    )
    one_line(proc, "disk full: cannot write a metrics record")
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"tokens_per_s" in offline_run.read_bytes()  # a train record's field, not the config's


def test_a_dead_tokenising_worker_inside_train_is_one_line_and_the_other_rank_does_not_hang(
    config, corpus: Path, tmp_path: Path
) -> None:
    """Rank 0 prepares the store with 2 workers, one is SIGKILLed; rank 1 waits for the store.
    Was: both ranks waited forever (multiprocessing.Pool never returned the dead worker's job)."""
    text = corpus.read_text()
    files = []
    for name, size in (("big", 40_000), ("mid", 30_000), ("small", 10_000)):  # tokenised largest first
        (tmp_path / f"{name}.txt").write_text(text[:size])
        files.append(str(tmp_path / f"{name}.txt"))
    path, _ = config(data={"train_files": files, "cache_dir": str(tmp_path / "c"), "num_proc": 2})
    proc = launch("--config_file", TWO, "train", str(path), "parallel.ep_size=2", MOE_LM_FAULT="shard:2")
    line = one_line(proc, "was killed by SIGKILL while tokenising", "lower data.num_proc", code=3)
    assert line.startswith("error: a tokenising worker (pid ")
    assert f"'{tmp_path / 'small.txt'}'; the 2 shard(s) finished are kept" in line


def test_a_hung_rank_ends_the_run_at_parallel_timeout_naming_it(config) -> None:
    """Rank 1 stands still inside step 3; rank 0 waits for it in the step's gradient-norm all-reduce.
    Was: rank 0 waited out gloo's default of 30 minutes (here: until rank 1 went on by itself)."""
    path, _ = config(checkpoint={"every": 0})
    start = time.monotonic()
    proc = launch(
        "--config_file",
        TWO,
        "train",
        str(path),
        "parallel.ep_size=2",
        "parallel.timeout=10",
        MOE_LM_FAULT="pause:3@1",
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 3, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(
        "error: process 0 timed out after 10 s (parallel.timeout) in a collective during 'training step 3'; "
        "process 1 is at 'training step 3' (for "
    )
    assert seconds < 55  # the pause would give up by itself after 60 s


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--config_file", ONE], "no command to run"),
        (["--config_file", "nope.yaml", "train", "x.yaml"], "--config_file 'nope.yaml' not found"),
        (
            ["--num_processes", "two", "train", "x.yaml"],
            "argument --num_processes/--num-processes: invalid int value",
        ),
    ],
)
def test_launcher_usage_errors_are_one_line(args: list[str], fragment: str) -> None:
    one_line(launch(*args), fragment)


@pytest.mark.skipif(
    shutil.which("make") is None or not (REPO / ".venv" / ".installed").is_file(),
    reason="needs make and the repository's set-up .venv",
)
@pytest.mark.parametrize("target", ["train", "train-ep2"])
def test_make_train_prints_the_one_line_and_then_only_makes_own(target: str) -> None:
    """GNU make always adds `make: *** [Makefile:N: target] Error 2` for a failed recipe (and exits 2)."""
    proc = run(["make", "-s", "-o", ".venv/.installed", target, "ARGS=train.max_step=10"])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 2, proc.stderr
    assert lines[0].startswith("error: unknown config key 'train.max_step'; did you mean 'train.max_steps'?")
    assert lines[1].startswith("make: *** [Makefile:") and lines[1].endswith(f"{target}] Error 2")
    assert proc.stdout == ""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_is_offline_unless_told_otherwise_so_push_at_end_can_run() -> None:
    """HF_HUB_OFFLINE was forced to 1, so `make train` could never push (hub.push_at_end)."""
    show = ["make", "-s", "--eval", "show-offline: ; @echo $$HF_HUB_OFFLINE", "show-offline"]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    offline = subprocess.run(show, capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    online = subprocess.run(
        [*show, "HF_HUB_OFFLINE=0"], capture_output=True, text=True, cwd=REPO, env=env, timeout=60
    )
    assert (offline.stdout.strip(), online.stdout.strip()) == ("1", "0")


def test_a_process_whose_peer_never_starts_gives_up_at_parallel_timeout(config) -> None:
    """Rank 0 of 2 started by hand; rank 1 never comes. Was: torch's 30-minute default, then a traceback."""
    path, _ = config()
    port = str(_free_port())
    env = dict(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=port,
    )
    start = time.monotonic()
    proc = run([sys.executable, "-m", "moe_lm", "train", str(path), "parallel.timeout=3"], **env)
    line = one_line(proc, code=3)
    assert line.startswith(
        "error: process 0 waited 3 s (parallel.timeout) for the other 1 process(es) to join"
    )
    assert line.endswith("check that every process was started, with the same MASTER_ADDR and MASTER_PORT")
    assert time.monotonic() - start < 60


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch_in_own_session(argv: list[str], fault: str) -> subprocess.Popen[str]:
    """`moe-lm launch` in its own session, as a job under a scheduler: a signal sent to it reaches
    the launcher's pid only. Pipes for stdout and stderr; MOE_LM_FAULT set to `fault`."""
    outer = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    env = {**outer, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MOE_LM_FAULT": fault}
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.parametrize(
    ("accelerate_config", "sig", "times"),
    [
        (ONE, signal.SIGTERM, 1),
        (TWO, signal.SIGTERM, 1),
        (TWO, signal.SIGINT, 1),
        (ONE, signal.SIGHUP, 1),
        (TWO, signal.SIGHUP, 1),
        (ONE, signal.SIGTERM, 2),
        (TWO, signal.SIGTERM, 2),
        (TWO, signal.SIGTERM, 3),
    ],
    ids=[
        "1proc-SIGTERM",
        "2proc-SIGTERM",
        "2proc-SIGINT",
        "1proc-SIGHUP",
        "2proc-SIGHUP",
        "1proc-SIGTERM-twice",
        "2proc-SIGTERM-twice",
        "2proc-SIGTERM-thrice",
    ],
)
def test_a_stop_signal_to_the_launcher_alone_saves_a_checkpoint_and_exits_0(
    config, accelerate_config: str, sig: signal.Signals, times: int
) -> None:
    """The signal reaches `moe-lm launch` only (`kill PID`, docker stop, a scheduler signalling its
    main process). Was: with one process, the launcher died at once (exit 143, no line) and left
    its worker training; with two, torchrun's SignalException traceback and exit 1. SIGHUP: the
    workers died of it (exit 129, nothing saved). Two or three, 50 ms apart: torchrun sent the
    workers the signal again, which killed them after their checkpoint, and a third interrupted its
    wait for them (exit 143, 'ended without stopping cleanly', a checkpoint saved)."""
    path, run_dir = config(train={"max_steps": 8}, checkpoint={"every": 0})
    args = ["--config_file", accelerate_config]
    if accelerate_config == TWO:
        args += ["--main_process_port", str(_free_port())]
    argv = [sys.executable, "-m", "moe_lm", "launch", *args, "train", str(path)]
    proc = _launch_in_own_session(argv, "pause:3")
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # every process pauses in step 3 until the signal
            if line.startswith("fault: paused at step 3"):
                break
        time.sleep(0.5)  # the other process reaches its pause too
        for n in range(times):
            if n:
                time.sleep(0.05)  # while the launcher waits for the processes to save and end
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1].startswith(
        f"moe-lm launch: stopped by {sig.name}; every process ended cleanly"
    )
    assert "done: step 3" in out
    assert (run_dir / "checkpoints" / "step-3" / "trainer_state.json").is_file()


def test_a_stop_signal_that_reaches_one_process_only_stops_them_all_at_the_same_step(config) -> None:
    """The far end of a signal that reaches the processes on either side of a step boundary. Was:
    process 1 saved its checkpoint while process 0 trained on; each waited on the other until
    parallel.timeout (exit 3, nothing saved since step 2)."""
    import psutil

    path, run_dir = config(train={"max_steps": 8}, checkpoint={"every": 2})
    argv = [sys.executable, "-m", "moe_lm", "launch", "--config_file", TWO]
    argv += ["--main_process_port", str(_free_port()), "train", str(path), "parallel.timeout=60"]
    proc = _launch_in_own_session(argv, "pause:3@1")
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # process 1 pauses in step 3 until the signal
            if line.startswith("fault: paused at step 3"):
                break
        rank1 = [p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "1"]
        assert len(rank1) == 1
        rank1[0].send_signal(signal.SIGTERM)
        start = time.monotonic()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert time.monotonic() - start < 30  # not at parallel.timeout
    assert "done: step 3" in out
    assert (run_dir / "checkpoints" / "step-3" / "trainer_state.json").is_file()
