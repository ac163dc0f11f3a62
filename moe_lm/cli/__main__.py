"""`python -m moe_lm.cli`, the same as `python -m moe_lm` (kept for launch lines written before it)."""

from moe_lm.cli import run

run()
