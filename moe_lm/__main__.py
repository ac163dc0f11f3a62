"""`python -m moe_lm` (and `accelerate launch -m moe_lm train ...`, the form accelerate's docs use)."""

from moe_lm.cli import run

run()
