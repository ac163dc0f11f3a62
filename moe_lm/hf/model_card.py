"""The README.md model card of an exported folder: Hub metadata, architecture, training summary, expert load."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from moe_lm.analysis.expert_load import LATEST_PNG, load_table
from moe_lm.analysis.records import RunRecords
from moe_lm.config import Config
from moe_lm.hf.routing_card import routing_section
from moe_lm.model.params import count_params, human


def front_matter(cfg: Config) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["moe", "mixtral", "moe_lm"],
    }
    datasets = sorted({name for inputs in _training_inputs(cfg).values() for name in inputs})
    if datasets:
        meta["datasets"] = datasets
    return meta


def _training_inputs(cfg: Config) -> dict[str, list[str]]:
    """Per training source, its file names or dataset name."""
    d = cfg.data
    if not d.sources:
        return {"corpus": [Path(f).name for f in d.train_files]}
    return {
        name: [Path(f).name for f in src.files] if src.files else [str(src.dataset)]
        for name, src in d.sources.items()
    }


def _training_data(cfg: Config) -> str:
    inputs = _training_inputs(cfg)
    if not cfg.data.sources:
        return ", ".join(inputs["corpus"])
    return "; ".join(
        f"{n} (weight {cfg.data.sources[n].weight:g}): {', '.join(v)}" for n, v in inputs.items()
    )


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}" if math.isfinite(value) else str(value)
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def architecture_table(cfg: Config) -> str:
    m = cfg.model
    counts = count_params(m)
    total, active = counts.total_params, counts.active_params
    rows = [
        ("architecture", "MixtralForCausalLM (decoder-only, every FFN a mixture of experts)"),
        ("layers", m.num_layers),
        ("hidden size", m.hidden_size),
        ("attention heads / KV heads", f"{m.num_heads} / {m.num_kv_heads} (head dim {m.resolved_head_dim})"),
        ("experts / active per token", f"{m.num_experts} / top-{m.top_k}"),
        ("expert FFN size", m.expert_intermediate_size),
        ("vocabulary", m.vocab_size),
        ("context length", m.max_seq_len),
        ("RoPE theta", f"{m.rope_theta:g}"),
        ("tied embeddings", m.tie_embeddings),
        ("total parameters", f"{human(total)} ({total:,})"),
        ("active parameters per token", f"{human(active)} ({active:,})"),
    ]
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows])


def training_section(cfg: Config, records: RunRecords) -> str:
    state = records.trainer_state or {}
    latest = records.latest or {}
    rows: list[tuple[str, Any]] = []
    for label, value in (
        ("steps", state.get("step", latest.get("step"))),
        ("tokens", state.get("tokens", latest.get("tokens"))),
    ):
        if value is not None:
            rows.append((label, value))
    for label, key in (
        ("final loss", "loss"),
        ("final LM loss", "lm_loss"),
        ("final aux loss (Switch form, 1.0 = balanced)", "aux_loss"),
        ("final aux loss (transformers form, top-k = balanced)", "hf_aux_loss"),
        ("final router z-loss", "z_loss"),
    ):
        if latest.get(key) is not None:
            rows.append((label, float(latest[key])))
    # The run's newest eval up to this checkpoint (it may be logged just after the checkpoint was
    # written, so trainer_state's val_loss can be one evaluation older) beats trainer_state's.
    val, where = state.get("val_loss"), ""
    if records.latest_eval is not None:
        val, where = records.latest_eval.get("val_loss"), f" (step {records.latest_eval.get('step', '?')})"
    if val is not None:
        rows.append((f"validation loss{where}", float(val)))
        rows.append((f"validation perplexity{where}", math.exp(min(float(val), 700.0))))
    t, o = cfg.train, cfg.optim
    rows += [
        ("sequence length", cfg.data.seq_len),
        ("batch (micro x accumulation, per process)", f"{t.micro_batch_size} x {t.grad_accum_steps}"),
        (
            "optimizer",
            f"AdamW, lr {o.lr:g} ({o.schedule}, {o.warmup_steps} warmup steps), weight decay {o.weight_decay:g}",
        ),
        ("router losses", f"aux coef {cfg.model.aux_loss_coef:g}, z-loss coef {cfg.model.z_loss_coef:g}"),
        ("training data", _training_data(cfg)),
    ]
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows])


def expert_load_section(cfg: Config, records: RunRecords, has_heatmap: bool) -> str:
    latest = records.latest or {}
    load = latest.get("expert_load")
    if not load:
        return "No expert-load statistics were recorded for this checkpoint."
    parts = [
        f"Share of routed (token, slot) assignments per expert at step {latest.get('step', '?')} "
        f"(balanced = {100 / len(load[0]):.1f}% each).",
        "",
        load_table(load, cfg.model.moe_layer_indices),
    ]
    if has_heatmap:
        parts += ["", f"![expert load per layer]({LATEST_PNG})"]
    return "\n".join(parts)


USAGE = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForCausalLM.from_pretrained("{path}")
inputs = tokenizer("ROMEO:", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=50, do_sample=True)[0]))
```"""


def render_model_card(
    cfg: Config,
    records: RunRecords,
    has_heatmap: bool,
    repo_id: str | None = None,
    routing: dict[str, Any] | None = None,
) -> str:
    meta = yaml.safe_dump(front_matter(cfg), sort_keys=False).strip()
    sections = [
        f"---\n{meta}\n---",
        f"# {repo_id or cfg.name}",
        "A Mixtral-style mixture-of-experts language model pretrained with "
        "moe_lm and exported as a `transformers` `MixtralForCausalLM`.",
        "## Usage",
        USAGE.format(path=repo_id or "PATH_TO_THIS_FOLDER"),
        "## Architecture",
        architecture_table(cfg),
        "## Training",
        training_section(cfg, records),
        "## Expert load",
        expert_load_section(cfg, records, has_heatmap),
    ]
    if routing is not None:  # the figures of `moe-lm routing` (moe_lm/hf/routing_card.py)
        sections += ["## Routing", routing_section(routing)]
    return "\n\n".join(sections) + "\n"
