"""Run configuration: frozen dataclasses, a strict YAML loader and dotted command-line overrides.

Every key has a type and a default. Unknown keys (with the closest known key suggested), wrong
types and impossible combinations raise `ConfigError` with one line naming the key and the fix,
before any model is built.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from moe_lm.errors import ConfigError
from moe_lm.validation import validate
from moe_lm.yaml_errors import yaml_problem


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000  # embedding rows; ≥ the tokenizer's vocabulary
    hidden_size: int = 4096  # residual stream width
    intermediate_size: int = 14336  # dense FFN width, and each expert's unless moe_intermediate_size
    num_layers: int = 32  # decoder blocks
    num_heads: int = 32  # query heads
    num_kv_heads: int = 8  # key/value heads (grouped-query attention); divides num_heads
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_seq_len: int = 4096  # longest sequence the model is meant for (HF max_position_embeddings)
    rope_theta: float = 1e6  # rotary embedding base
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_embeddings: bool = False  # share the input embedding with the output head
    init_std: float = 0.02  # normal init std; residual output projections get std / sqrt(2 * layers)
    # mixture of experts
    num_experts: int = 8  # routed experts per MoE layer
    top_k: int = 2  # experts each token is sent to
    moe_intermediate_size: int | None = None  # None: intermediate_size
    moe_layer_freq: int = 1  # every n-th layer is MoE (1: all); the others are dense SwiGLU
    first_dense_layers: int = 0  # the first n layers are dense (DeepSeekMoE)
    num_shared_experts: int = 0  # always-on experts beside the routed ones (DeepSeekMoE)
    capacity_factor: float | None = None  # None: dropless; else capacity = ceil(cf * T * k / E)
    router_jitter: float = 0.0  # multiplicative input noise in training (Mixtral's router_jitter_noise)
    aux_loss_coef: float = 0.01  # load-balance loss weight (Switch form, 1.0 at perfect balance)
    aux_loss_scope: Literal["micro_batch", "global_batch"] = (
        "micro_batch"  # aux loss f_i counted per micro-batch and rank, or over the step's global batch
    )
    z_loss_coef: float = 0.001  # router z-loss weight (ST-MoE)
    aux_free_bias: bool = False  # DeepSeek-V3 bias balancing: bias only picks experts
    aux_free_update_rate: float = 0.001  # gamma in b_i <- b_i - gamma * sign(load_i - mean load)
    experts_impl: Literal["grouped_mm", "loop", "auto"] = "auto"  # auto: grouped GEMM on CUDA bf16, else loop

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    def is_moe_layer(self, index: int) -> bool:
        return index >= self.first_dense_layers and (index + 1) % self.moe_layer_freq == 0

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]


@dataclass(frozen=True)
class SourceConfig:
    """One named source of text: files, or a `datasets` dataset (see docs/data.md)."""

    files: list[str] = field(default_factory=list)  # files or globs (text, JSON(L), parquet; .gz .bz2 .xz)
    dataset: str | None = None  # or: a save_to_disk directory or a dataset name (datasets.load_dataset)
    dataset_config: str | None = None  # the dataset's configuration (load_dataset's name=)
    split: str = "train"  # the dataset split to read
    text_field: str | None = None  # None: data.text_field
    format: Literal["auto", "text", "json", "parquet"] | None = None  # None: data.format
    weight: float = 1.0  # share of training blocks drawn from this source (normalised over the sources)
    val_files: list[str] = field(default_factory=list)  # this source's validation set; empty: val_fraction
    val_fraction: float | None = None  # None: data.val_fraction (the tail of this source's blocks)
    streaming: bool = False  # read a dataset as an IterableDataset while training instead of preparing it
    kind: Literal["text", "chat"] | None = None  # None: data.kind
    messages_field: str | None = None  # None: data.messages_field


@dataclass(frozen=True)
class DataConfig:
    train_files: list[str] = field(default_factory=lambda: ["data/tinyshakespeare.txt"])  # files or globs
    val_files: list[str] = field(default_factory=list)  # empty: hold out val_fraction of train
    val_fraction: float = 0.05  # share of the train blocks held out when val_files is empty (0: no eval)
    sources: dict[str, SourceConfig] = field(default_factory=dict)  # training sources by name; or train_files
    val_sources: dict[str, SourceConfig] = field(default_factory=dict)  # named validation-only sets
    format: Literal["auto", "text", "json", "parquet"] = "auto"  # auto: by file extension
    text_field: str = "text"  # the field holding the text in JSON(L) / parquet records
    tokenizer: str = "tokenizers/tiny-shakespeare"  # a directory with tokenizer.model
    seq_len: int = 256  # tokens per training sequence (blocks are packed across documents)
    cache_dir: str = ".cache/moe_lm"  # the token store lives in CACHE_DIR/store (shared by runs)
    num_proc: int = 1  # worker processes for tokenising (moe-lm data prepare and the first train)
    document_mask: bool = False  # packed documents do not attend across EOS; positions restart per doc
    # instruction tuning (docs/instruction-tuning.md)
    kind: Literal["text", "chat"] = "text"  # chat: records are conversations (docs/instruction-tuning.md)
    messages_field: str = "messages"  # chat: the field with the [{role, content}] list (else prompt/response)
    train_on: Literal["assistant", "all"] | None = None  # chat: tokens the loss is on; None: assistant
    too_long: Literal["truncate", "drop"] = "truncate"  # chat: an example over seq_len + 1 tokens


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warm-up
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps
    weight_decay: float = 0.1  # on matrices and expert tensors only; never norms, biases, router bias
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # 0 disables


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str | None = None  # None: runs/<config name>
    seed: int = 1337  # weights init, data order, router jitter
    micro_batch_size: int = 8  # sequences per process per forward pass
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps; also the length of the lr schedule
    max_tokens: int | None = None  # stop after this many training tokens (whichever comes first)
    stop_at_step: int | None = None  # end this invocation early (schedule still follows max_steps)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more time
    compile: bool = False  # torch.compile the model
    eval_every: int = 100  # steps between validation passes (0: only at the end)
    eval_batches: int = 20  # validation micro-batches per pass, all processes together
    sample_every: int = 0  # 0: only at the end
    sample_prompt: str = "ROMEO:"  # prompt of the logged text samples
    sample_tokens: int = 64  # tokens generated per sample
    resume: str | None = None  # "auto" (newest checkpoint, else a fresh start), "latest" or a checkpoint dir
    init_from: str | None = None  # start from this checkpoint's weights only (with resume=auto: first start)
    accept_changed_data: bool = (
        False  # resume over data that changed since the checkpoint (re-cuts validation)
    )
    freeze: Literal["none", "non_expert", "experts", "router"] = (
        "none"  # train only experts / all but experts / all but routers
    )
    overwrite: bool = False  # allow a fresh run in an output_dir that holds another run
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    collapse_ratio: float = 4.0  # warn when an expert's load exceeds this multiple of the mean
    collapse_patience: int = 50  # ... for this many logging steps in a row


@dataclass(frozen=True)
class ParallelConfig:
    backend: Literal["ddp", "deepspeed"] = "ddp"  # ddp: accelerate + torch DDP; deepspeed: ZeRO
    ep_size: int = 1  # expert-parallel size: experts split over this many consecutive ranks
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0/1/2 (3 is refused: it would shard the experts' weights)
    deepspeed_config: str | None = None  # a DeepSpeed JSON to use instead of the generated one
    timeout: float | None = None  # seconds a wait on another process may last (null: 1800 on CPU, 600 on GPU)


@dataclass(frozen=True)
class LoggingConfig:
    log_every: int = 10  # steps between metric records (console, metrics.jsonl, wandb)
    progress_bar: bool = True  # tqdm bar with loss, aux loss, lr, grad norm, tokens/s, ETA
    jsonl: bool = True  # write RUN/metrics.jsonl
    wandb: bool = False  # log to wandb (offline without an API key; never blocks training)
    tensorboard: bool = (
        False  # also write TensorBoard event files to RUN/tensorboard (extra: moe_lm[tensorboard])
    )
    wandb_project: str = "moe_lm"  # wandb project
    wandb_entity: str | None = None  # wandb entity (team or user)
    wandb_run_name: str | None = None  # None: the config name
    peak_tflops: float | None = None  # per process, for MFU; None: known GPUs' bf16 peak, on CPU an estimate


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # 0: only at the end
    keep_last: int = 3  # 0 keeps all


@dataclass(frozen=True)
class HubConfig:
    push_at_end: bool = False  # export to RUN/export and push when training finishes
    repo_id: str | None = None  # OWNER/NAME on the Hub
    private: bool = True  # create the repo private
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"  # dtype of the exported weights


@dataclass(frozen=True)
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir or f"runs/{self.name}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, strictly.


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}")
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:  # named entries (data.sources.web): names are keys, so overrides can reach them
        key_tp, value_tp = get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of names to entries, got {value!r}")
        return {_coerce(k, key_tp, key): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):  # YAML reads 1e3 as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this file


def _build(cls: Any, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{full}'{hint} (known: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override '{item}' is not of the form key.sub=value (e.g. train.max_steps=100)"
            )
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    data = copy.deepcopy(data)  # overrides must not write into the caller's nested dicts
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML run config, apply `key.sub=value` overrides, type-check and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file '{path}' not found; pass a YAML file such as configs/tiny-shakespeare.yaml"
        )
    text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(
            f"config file '{path}' is not valid YAML: {yaml_problem(e, text)}; fix the syntax"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file '{path}' must hold a mapping of sections (model:, data:, train:, ...)"
        )
    data.setdefault("name", path.stem)
    return config_from_dict(data, overrides)
