"""Candidate layouts of a job: expert-parallel size, backend and ZeRO stage, micro-batch and
accumulation, activation checkpointing; as `--layouts` spells them, and checked against the job.

    ep8/zero2/mb1x8/ac     EP 8, DeepSpeed ZeRO-2, micro-batch 1 x 8 accumulation, checkpointing on
    ep4/ddp/noac           EP 4, DDP, no checkpointing; the micro-batch as the config has it
    config                 the config's own layout

Any part left out is the config's.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from moe_lm.config import Config
from moe_lm.errors import UserError

_BACKENDS = {
    "ddp": ("ddp", 0),
    "zero0": ("deepspeed", 0),
    "zero1": ("deepspeed", 1),
    "zero2": ("deepspeed", 2),
}
SPELLING = "ep<N>, ddp | zero0 | zero1 | zero2, mb<micro>x<accum>, ac | noac, joined by '/' (e.g. ep8/zero2/mb1x8/ac)"


@dataclass(frozen=True)
class JobLayout:
    ep_size: int
    backend: str  # ddp | deepspeed
    zero_stage: int
    micro_batch_size: int
    grad_accum_steps: int
    activation_checkpointing: bool

    @property
    def name(self) -> str:
        backend = "ddp" if self.backend == "ddp" else f"zero{self.zero_stage}"
        ac = "ac" if self.activation_checkpointing else "noac"
        return f"ep{self.ep_size}/{backend}/mb{self.micro_batch_size}x{self.grad_accum_steps}/{ac}"

    def overrides(self) -> list[str]:
        """The config overrides that give a run this layout (what `moe-lm train` takes)."""
        return [
            f"parallel.ep_size={self.ep_size}",
            f"parallel.backend={self.backend}",
            f"parallel.zero_stage={self.zero_stage}",
            f"train.micro_batch_size={self.micro_batch_size}",
            f"train.grad_accum_steps={self.grad_accum_steps}",
            f"train.activation_checkpointing={str(self.activation_checkpointing).lower()}",
        ]

    def apply(self, cfg: Config) -> Config:
        return cfg.replace(
            parallel=dataclasses.replace(
                cfg.parallel,
                ep_size=self.ep_size,
                backend=self.backend,  # type: ignore[arg-type]
                zero_stage=self.zero_stage,
            ),
            train=dataclasses.replace(
                cfg.train,
                micro_batch_size=self.micro_batch_size,
                grad_accum_steps=self.grad_accum_steps,
                activation_checkpointing=self.activation_checkpointing,
            ),
        )


def of_config(cfg: Config) -> JobLayout:
    p, t = cfg.parallel, cfg.train
    return JobLayout(
        p.ep_size, p.backend, p.zero_stage if p.backend == "deepspeed" else 0,
        t.micro_batch_size, t.grad_accum_steps, t.activation_checkpointing,
    )  # fmt: skip


def parse_layout(text: str, cfg: Config) -> JobLayout:
    """A layout as `--layouts` spells it; "config" (or nothing) is the config's own."""
    layout = of_config(cfg)
    for part in filter(None, text.strip().split("/")):
        if part == "config":
            continue
        elif m := re.fullmatch(r"ep(\d+)", part):
            layout = dataclasses.replace(layout, ep_size=int(m.group(1)))
        elif part in _BACKENDS:
            backend, stage = _BACKENDS[part]
            layout = dataclasses.replace(layout, backend=backend, zero_stage=stage)
        elif m := re.fullmatch(r"mb(\d+)x(\d+)", part):
            layout = dataclasses.replace(
                layout, micro_batch_size=int(m.group(1)), grad_accum_steps=int(m.group(2))
            )
        elif part in ("ac", "noac"):
            layout = dataclasses.replace(layout, activation_checkpointing=part == "ac")
        else:
            raise UserError(f"--layouts: cannot read '{part}' in '{text}'; spell a layout as {SPELLING}")
    return layout


def check_layout(layout: JobLayout, cfg: Config, gpus: int) -> None:
    """One line for a layout the job cannot run."""
    e = cfg.model.num_experts
    if layout.ep_size < 1 or e % layout.ep_size or gpus % layout.ep_size:
        raise UserError(
            f"layout {layout.name}: ep_size {layout.ep_size} must divide both the {e} experts and the "
            f"{gpus} GPUs; use one of {', '.join(str(n) for n in valid_ep_sizes(e, gpus)) or 'none'}"
        )
    if layout.micro_batch_size < 1 or layout.grad_accum_steps < 1:
        raise UserError(f"layout {layout.name}: micro-batch and accumulation must be at least 1")


def valid_ep_sizes(num_experts: int, gpus: int) -> list[int]:
    return [n for n in range(1, num_experts + 1) if num_experts % n == 0 and gpus % n == 0]


def auto_layouts(cfg: Config, gpus: int, gpus_per_node: int) -> list[JobLayout]:
    """The config's own layout, then for the two largest EP sizes whose all-to-all stays inside a
    node: ZeRO-2 with and without activation checkpointing, and DDP with it (the global batch as
    the config has it)."""
    own = of_config(cfg)
    eps = [n for n in valid_ep_sizes(cfg.model.num_experts, gpus) if gpus_per_node % n == 0][-2:]
    found = [own]
    for ep in reversed(eps):
        for backend, stage, ac in (("deepspeed", 2, True), ("deepspeed", 2, False), ("ddp", 0, True)):
            layout = dataclasses.replace(
                own, ep_size=ep, backend=backend, zero_stage=stage, activation_checkpointing=ac
            )
            if layout not in found:
                found.append(layout)
    return found
