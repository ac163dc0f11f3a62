"""`python -m moe_lm.cli` (what `accelerate launch -m moe_lm.cli` runs)."""

from moe_lm.cli import run

run()
