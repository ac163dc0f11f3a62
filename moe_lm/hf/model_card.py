"""The README.md model card of an exported folder: Hub metadata, usage, intended use and limitations,
training data, architecture, the router coefficient, training summary, expert load.

Metadata (`datasets:`) names only real Hub dataset ids, since the Hub links them; local files are
named in the text. `retarget_card` fills the usage snippet and title in for the repo a push goes to.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from moe_lm.analysis.expert_load import LATEST_PNG, load_table
from moe_lm.analysis.records import RunRecords
from moe_lm.config import Config
from moe_lm.hf.routing_card import routing_section
from moe_lm.model.params import count_params, human

PLACEHOLDER = "PATH_TO_THIS_FOLDER"
# A Hub dataset id: NAME or OWNER/NAME (a local save_to_disk directory is named in the text instead).
_DATASET_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def hub_datasets(cfg: Config) -> list[str]:
    """Training sources that are Hub datasets (by id, not a local directory or file)."""
    ids = {
        str(src.dataset)
        for src in cfg.data.sources.values()
        if src.dataset and _DATASET_ID.match(src.dataset) and not Path(src.dataset).exists()
    }
    return sorted(ids)


def front_matter(cfg: Config) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["moe", "mixtral", "moe_lm"],
    }
    datasets = hub_datasets(cfg)
    if datasets:
        meta["datasets"] = datasets
    return meta


def is_chat(cfg: Config) -> bool:
    """Instruction-tuned: some training source is conversations (data.kind: chat)."""
    d = cfg.data
    return any((s.kind or d.kind) == "chat" for s in d.sources.values()) or (
        not d.sources and d.kind == "chat"
    )


def _chat_loss(cfg: Config) -> str:
    return "every token of them" if cfg.data.train_on == "all" else "the assistant's tokens only"


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


def data_section(cfg: Config) -> str:
    """Where the training text came from: Hub datasets linked, local files by name."""
    hub = set(hub_datasets(cfg))
    lines = []
    for name, inputs in _training_inputs(cfg).items():
        shown = [f"[{i}](https://huggingface.co/datasets/{i})" if i in hub else f"`{i}`" for i in inputs]
        weight = f" (weight {cfg.data.sources[name].weight:g})" if cfg.data.sources else ""
        kind = (
            "Hub dataset" if any(i in hub for i in inputs) else "local files, not published with this model"
        )
        lines.append(f"- {name}{weight}: {', '.join(shown)} ({kind})")
    lines += [
        "",
        f"Documents were tokenised with the tokenizer in this folder, joined with `</s>` and packed into "
        f"sequences of {cfg.data.seq_len} tokens.",
    ]
    if is_chat(cfg):
        lines[-1] = (
            "Conversations were rendered with the chat template in this folder (`chat_template.jinja`, also "
            "in `tokenizer_config.json`), each packed whole into sequences of "
            f"{cfg.data.seq_len + 1} tokens with document masking (no conversation attends to another), "
            f"and the loss was on {_chat_loss(cfg)}."
        )
    return "\n".join(lines)


def limitations_section(cfg: Config, records: RunRecords) -> str:
    tokens = (records.trainer_state or {}).get("tokens") or (records.latest or {}).get("tokens")
    seen = f"{int(tokens):,} tokens" if tokens else "its training data"
    first = (
        f"- A base language model pretrained from scratch on {seen} (see Training data): it continues "
        "text in the style of that data. It is not instruction-tuned, not aligned and not safety-tested."
    )
    if is_chat(cfg):
        first = (
            f"- Instruction-tuned on {seen} of conversations (see Training data), with the loss on "
            f"{_chat_loss(cfg)}: it answers in their format, in the style of that data. It is not "
            "aligned and not safety-tested."
        )
    return "\n".join(
        [
            first,
            "- Meant for research and for testing training and serving pipelines; not for factual answers, "
            "advice, or decisions about people. What it writes may be wrong, and may repeat biases or "
            "offensive content of its training data.",
            f"- Context: {cfg.model.max_seq_len} tokens by configuration (trained on sequences of "
            f"{cfg.data.seq_len}); longer inputs are outside what it was trained on.",
            "- Evaluated only by the loss on held-out text of its training data (below); no benchmark was run.",
        ]
    )


def router_section(cfg: Config) -> str:
    m = cfg.model
    hf_coef = m.aux_loss_coef / m.top_k
    return "\n".join(
        [
            f"Each token goes to its top {m.top_k} of {m.num_experts} experts (softmax over the router "
            "logits, top-k renormalised, as in Mixtral). `config.json` holds `num_experts_per_tok` = "
            f"{m.top_k} and `router_aux_loss_coef` = {hf_coef:g} on purpose: inference ignores the "
            "coefficient, but fine-tuning with `output_router_logits=True` adds transformers' "
            "load-balancing loss times it, and this value keeps the balance pressure of pretraining.",
            "",
            f"Pretraining used coefficient {m.aux_loss_coef:g} on the Switch-Transformer form of the loss "
            "(per layer, 1.0 when the experts are balanced, averaged over layers); transformers pools "
            f"all layers and its loss is {m.top_k} (top-k) when balanced, hence {m.aux_loss_coef:g} / "
            f"{m.top_k}. The router z-loss (coefficient {m.z_loss_coef:g}) has no transformers counterpart.",
        ]
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
inputs = tokenizer({prompt}, return_tensors="pt")
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
    counts = count_params(cfg.model)
    total, active = counts.total_params, counts.active_params
    sections = [
        f"---\n{meta}\n---",
        f"# {repo_id or cfg.name}",
        f"A Mixtral-style mixture-of-experts language model ({human(total)} parameters, {human(active)} "
        f"active per token), {'instruction-tuned' if is_chat(cfg) else 'pretrained from scratch'} with "
        "moe_lm and exported as a `transformers` `MixtralForCausalLM`.",
        "## Usage",
        (USAGE_CHAT if is_chat(cfg) else USAGE).format(
            path=repo_id or PLACEHOLDER,
            prompt=json.dumps(cfg.train.sample_prompt or "Hello", ensure_ascii=False),
        ),
        "## Intended use and limitations",
        limitations_section(cfg, records),
        "## Training data",
        data_section(cfg),
        "## Architecture",
        architecture_table(cfg),
        "## Router",
        router_section(cfg),
        "## Training",
        training_section(cfg, records),
        "## Expert load",
        expert_load_section(cfg, records, has_heatmap),
    ]
    if routing is not None:  # the figures of `moe-lm routing` (moe_lm/hf/routing_card.py)
        sections += ["## Routing", routing_section(routing)]
    return "\n\n".join(sections) + "\n"


USAGE_CHAT = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

tokenizer = AutoTokenizer.from_pretrained("{path}")  # its chat template renders the messages
model = AutoModelForCausalLM.from_pretrained("{path}")
chat = pipeline("text-generation", model=model, tokenizer=tokenizer)
messages = [{{"role": "user", "content": {prompt}}}]
print(chat(messages, max_new_tokens=50)[0]["generated_text"][-1]["content"])
```"""


_FROM_PRETRAINED = re.compile(r'(\.from_pretrained\()"[^"\n]*"(\))')


def retarget_card(card: str, repo_id: str) -> str:
    """The card as it should read in `repo_id`: the usage snippet loads from there and the title
    names it. Text a user added is kept; a README that is not our card is returned unchanged."""
    if "- moe_lm" not in card.split("\n---", 1)[0]:
        return card
    card = _FROM_PRETRAINED.sub(lambda m: f'{m.group(1)}"{repo_id}"{m.group(2)}', card)
    return re.sub(r"^# .*$", f"# {repo_id}", card, count=1, flags=re.MULTILINE)
