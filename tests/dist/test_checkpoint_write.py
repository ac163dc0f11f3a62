"""Writing a checkpoint on 2 processes when the main process cannot even make its temp dir."""

from __future__ import annotations

from pathlib import Path

from tests.dist.checkpoint_scenarios import TIMEOUT_S
from tests.dist.harness import run_workers


def test_a_temp_dir_the_main_process_cannot_make_stops_both_ranks_with_its_line(tmp_path: Path) -> None:
    # Before: rank 1 waited at the barrier after the mkdir while rank 0 reported its error through an
    # all-reduce: a hang until parallel.timeout (1800 s by default).
    (tmp_path / "checkpoints").write_text("a file where the checkpoints directory should be")
    results = run_workers(
        "tests.dist.checkpoint_scenarios:main_cannot_make_the_temp_dir", 2, {"output_dir": str(tmp_path)}
    )
    for rank, result in enumerate(results):
        assert result["outcome"].startswith("UserError: cannot write checkpoint step-3 in"), (rank, result)
        assert "continue with train.resume=auto" in result["outcome"], (rank, result)
        assert "\n" not in result["outcome"]
        assert result["seconds"] < TIMEOUT_S / 2, (rank, result)
    assert results[0]["outcome"] == results[1]["outcome"]  # the same cause on every rank
