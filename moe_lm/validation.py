"""Impossible combinations of config values, each refused with one line naming the key and the fix.

Runs after the types are checked (moe_lm.config), before anything is built.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from moe_lm.errors import ConfigError

if TYPE_CHECKING:
    from moe_lm.config import Config, SourceConfig


# The longest parallel.timeout: torch.distributed keeps deadlines in int64 nanoseconds, so a timeout
# past ~9e9 s wraps round and fires at once (1e10: "timed out after 10000000000000ms" while joining),
# and Python's timedelta overflows at ~8.6e13 s (a crash). 1e8 leaves a wide margin below both.
MAX_TIMEOUT_S = 1e8


def _positive(key: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if (
        value < 0
        or (value == 0 and not allow_zero)
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        need = "≥ 0" if allow_zero else "> 0"
        raise ConfigError(f"{key} = {value} must be {need}")


def validate(cfg: Config) -> None:
    """Impossible combinations, each named by its key with the fix."""
    m, d, t, o, p = cfg.model, cfg.data, cfg.train, cfg.optim, cfg.parallel
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "max_seq_len",
        "num_experts",
        "top_k",
        "moe_layer_freq",
        "head_dim",
        "moe_intermediate_size",
    ):
        _positive(f"model.{name}", getattr(m, name))
    for name in ("rope_theta", "rms_norm_eps", "init_std"):
        _positive(f"model.{name}", getattr(m, name))
    for name in (
        "num_shared_experts",
        "first_dense_layers",
        "aux_loss_coef",
        "z_loss_coef",
        "router_jitter",
        "aux_free_update_rate",
    ):
        _positive(f"model.{name}", getattr(m, name), allow_zero=True)
    _positive("model.capacity_factor", m.capacity_factor)
    if m.top_k > m.num_experts:
        raise ConfigError(f"model.top_k = {m.top_k} exceeds model.num_experts = {m.num_experts}; lower top_k")
    if m.head_dim is None and m.hidden_size % m.num_heads:
        raise ConfigError(
            f"model.num_heads = {m.num_heads} does not divide model.hidden_size = {m.hidden_size}; "
            "pick a divisor or set model.head_dim"
        )
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(
            f"model.num_kv_heads = {m.num_kv_heads} does not divide model.num_heads = {m.num_heads}"
        )
    if m.resolved_head_dim % 2:
        raise ConfigError(
            f"head dim {m.resolved_head_dim} must be even for rotary embeddings; change model.num_heads"
        )
    if m.router_jitter >= 1:
        raise ConfigError(f"model.router_jitter = {m.router_jitter} must be < 1")
    if p.ep_size < 1:
        raise ConfigError(f"parallel.ep_size = {p.ep_size} must be ≥ 1")
    if m.num_experts % p.ep_size:
        raise ConfigError(
            f"model.num_experts = {m.num_experts} is not divisible by parallel.ep_size = {p.ep_size}; "
            "choose an ep_size that divides it"
        )
    if p.zero_stage not in (0, 1, 2):
        raise ConfigError(
            f"parallel.zero_stage = {p.zero_stage} is not supported: use 0, 1 or 2 (ZeRO-3 partitions every "
            "weight over all ranks, which defeats expert parallelism and our any-topology checkpoints)"
        )
    if p.backend == "ddp" and p.zero_stage:
        raise ConfigError("parallel.zero_stage needs parallel.backend: deepspeed")
    _positive("parallel.timeout", p.timeout)
    if p.timeout is not None and p.timeout > MAX_TIMEOUT_S:
        raise ConfigError(
            f"parallel.timeout = {p.timeout:g} s is more than torch.distributed can wait: at most "
            f"{MAX_TIMEOUT_S:.0f} s (about 3 years); lower it, or remove it for the default"
        )
    _positive("data.seq_len", d.seq_len)
    _positive("data.num_proc", d.num_proc)
    _validate_sources(cfg)
    _validate_chat(cfg)
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len = {d.seq_len} exceeds model.max_seq_len = {m.max_seq_len}")
    for name in (
        "micro_batch_size",
        "grad_accum_steps",
        "max_steps",
        "eval_batches",
        "collapse_patience",
        "max_nonfinite_steps",
    ):
        _positive(f"train.{name}", getattr(t, name))
    for name in ("eval_every", "sample_every", "sample_tokens"):
        _positive(f"train.{name}", getattr(t, name), allow_zero=True)
    _positive("train.max_tokens", t.max_tokens)
    _positive("train.stop_at_step", t.stop_at_step)
    _positive("train.collapse_ratio", t.collapse_ratio)
    if t.resume and t.resume != "auto" and t.init_from:
        raise ConfigError(
            "train.resume and train.init_from are exclusive: resume continues a run, "
            "init_from starts a new one from weights (train.resume=auto takes both: init_from on the "
            "first start, the run's own checkpoints after)"
        )
    _positive("optim.lr", o.lr)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.grad_clip", o.grad_clip, allow_zero=True)
    _positive("optim.eps", o.eps)
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError(f"optim.min_lr_ratio = {o.min_lr_ratio} must be in [0, 1]")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(o, name) < 1:
            raise ConfigError(f"optim.{name} = {getattr(o, name)} must be in [0, 1)")
    _positive("logging.log_every", cfg.logging.log_every)
    _positive("checkpoint.every", cfg.checkpoint.every, allow_zero=True)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last, allow_zero=True)
    if cfg.hub.push_at_end and not cfg.hub.repo_id:
        raise ConfigError("hub.push_at_end needs hub.repo_id (OWNER/NAME)")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _validate_source(
    key: str, name: str, src: SourceConfig, for_validation: bool, cfg_kind: str = "text"
) -> None:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{key}: source name {name!r} must be letters, digits, '_', '.' or '-' (it names metrics and files)"
        )
    if bool(src.files) == bool(src.dataset):
        raise ConfigError(f"{key}: set either files or dataset (exactly one of them)")
    if src.dataset_config is not None and not src.dataset:
        raise ConfigError(f"{key}.dataset_config needs {key}.dataset")
    if for_validation:
        for field_name, default in (("val_files", []), ("val_fraction", None), ("weight", 1.0)):
            if getattr(src, field_name) != default:
                raise ConfigError(
                    f"{key}.{field_name} has no meaning for a validation set; list its text as files or dataset"
                )
        if src.streaming:
            raise ConfigError(
                f"{key}.streaming: validation sets are prepared into the store; remove streaming"
            )
        return
    if not (math.isfinite(src.weight) and src.weight > 0):
        raise ConfigError(f"{key}.weight = {src.weight} must be > 0 (drop the source to leave it out)")
    if src.val_fraction is not None and not 0 <= src.val_fraction < 1:
        raise ConfigError(f"{key}.val_fraction = {src.val_fraction} must be in [0, 1)")
    if src.streaming and not src.dataset:
        raise ConfigError(
            f"{key}.streaming reads a dataset; files are prepared into the store (remove streaming)"
        )
    if src.streaming and (src.kind or cfg_kind) == "chat":
        raise ConfigError(
            f"{key}.streaming: conversations are packed from the token store (every example's length is "
            "needed first); remove streaming"
        )
    if src.streaming and src.val_fraction:
        raise ConfigError(
            f"{key}.val_fraction: a streaming source has no tail to hold out; set it to 0 and list "
            f"{key}.val_files or data.val_sources"
        )


def _validate_sources(cfg: Config) -> None:
    d = cfg.data
    if not 0 <= d.val_fraction < 1:
        raise ConfigError(f"data.val_fraction = {d.val_fraction} must be in [0, 1)")
    if not d.sources:
        if not d.train_files:
            raise ConfigError("data.train_files is empty; list at least one text, JSON(L) or parquet file")
    else:
        # type(d)(): a DataConfig with every default (config.py imports this module, not the reverse)
        if d.train_files != type(d)().train_files or d.val_files:
            raise ConfigError(
                "data.train_files / data.val_files and data.sources are exclusive: move the files into a source "
                "(data.sources.NAME.files, .val_files)"
            )
        for name, src in d.sources.items():
            _validate_source(f"data.sources.{name}", name, src, for_validation=False, cfg_kind=d.kind)
    for name, src in d.val_sources.items():
        _validate_source(f"data.val_sources.{name}", name, src, for_validation=True, cfg_kind=d.kind)
        if name in d.sources or (not d.sources and name == "corpus"):
            raise ConfigError(
                f"data.val_sources.{name}: the name is taken by a training source's validation set; rename it"
            )


def _validate_chat(cfg: Config) -> None:
    """Conversation settings: `train_on: assistant` needs a source whose records have roles, and
    conversations come as records (JSON(L), parquet, a dataset), never as plain text files."""
    d = cfg.data
    kinds = {f"data.sources.{n}": s.kind or d.kind for n, s in d.sources.items()} or {"data": d.kind}
    if d.train_on == "assistant" and "chat" not in kinds.values():
        raise ConfigError(
            "data.train_on: assistant needs conversations with roles, but every training source is plain "
            "text; set data.kind: chat (records with a 'messages' list of {role, content}, or 'prompt' and "
            "'response' fields), or remove data.train_on"
        )
    formats = {f"data.sources.{n}": s.format or d.format for n, s in d.sources.items()} or {"data": d.format}
    for key, kind in kinds.items():
        if kind == "chat" and formats[key] == "text":
            where = "data.format" if key == "data" else f"{key}.format"
            raise ConfigError(
                f"{where}: text files hold no conversation records; chat data is JSON(L), parquet or a "
                "dataset (set the format to auto, json or parquet)"
            )


def config_warnings(cfg: Config) -> list[str]:
    """Legal but probably unintended settings, one line each (`moe-lm train` prints them before step 1)."""
    o, t = cfg.optim, cfg.train
    found = []
    if o.warmup_steps >= t.max_steps:
        peak = o.lr * t.max_steps / o.warmup_steps
        found.append(
            f"warning: optim.warmup_steps = {o.warmup_steps} ≥ train.max_steps = {t.max_steps}: training ends "
            f"inside the warm-up, at lr {peak:.3g} instead of optim.lr = {o.lr:g}, with no decay; lower "
            "optim.warmup_steps"
        )
    return found
