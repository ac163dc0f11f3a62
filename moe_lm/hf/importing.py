"""transformers folders in: import a Mixtral folder, or upcycle a dense Llama-style one, as a
moe_lm checkpoint (step 0, weights only) for `train.init_from`; or load a Mixtral folder as a
moe_lm model in memory (`load_hf_model`, for `moe-lm routing`).

The checkpoint is built under a temporary name beside its destination and renamed into place at
the end (moe_lm.fsutil.staged_dir), so an interrupted command never leaves a half-written one.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import torch
import yaml

from moe_lm.config import Config, ModelConfig, config_from_dict, load_config
from moe_lm.errors import UserError
from moe_lm.fsutil import staged_dir
from moe_lm.hf.convert import (
    check_exportable,
    check_upcycle_config,
    from_hf_config,
    from_hf_state_dict,
    upcycle_state_dict,
)
from moe_lm.libraries import configure_deepspeed
from moe_lm.model import MoETransformer
from moe_lm.state.checkpoint import write_weights_checkpoint


def _hf_config(path: Path, kinds: tuple[str, ...]) -> Any:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise UserError(f"'{path}' is not a transformers model folder (no config.json)")
    try:
        hf = AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise UserError(f"cannot read '{path / 'config.json'}': {_first_line(e)}") from None
    if hf.model_type not in kinds:
        raise UserError(f"'{path}' holds a '{hf.model_type}' model; expected {' or '.join(kinds)}")
    return hf


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """The folder's weights, loaded without running code from it: no custom modeling code
    (trust_remote_code=False), and `.bin` files only through torch's restricted unpickler
    (weights_only=True); safetensors need neither."""
    from transformers import AutoModelForCausalLM

    try:
        # dtype="auto" keeps the stored precision; loading into our fp32 model upcasts later.
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype="auto", local_files_only=True, trust_remote_code=False, weights_only=True
        )
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError):
            raise UserError(
                f"the weights in '{path}' hold pickled objects that are not tensors, so they were not loaded "
                "(loading them could run code); use a folder from a source you trust, preferably with "
                "model.safetensors"
            ) from None
        raise UserError(f"cannot load the weights in '{path}': {_first_line(e)}") from None
    return {k: v.detach() for k, v in model.state_dict().items()}


# Architecture keys: an import's config must agree with the HF model on these.
_ARCH_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "max_seq_len",
    "rope_theta",
    "rms_norm_eps",
    "tie_embeddings",
    "num_experts",
    "top_k",
    "moe_intermediate_size",
    "moe_layer_freq",
    "first_dense_layers",
    "num_shared_experts",
    "capacity_factor",
    "aux_free_bias",
)


def _import_config(model: ModelConfig, hf_dir: Path, config: str | None, name: str) -> Config:
    """The run config of an import: the HF architecture, the rest from --config (or defaults).

    Architecture keys set in --config must agree with the HF model; other model keys (aux loss
    coefficient, jitter, init std) follow the HF config unless --config sets them.
    """
    hf_values = dataclasses.asdict(model)
    if config is None:
        data: dict[str, Any] = {
            "name": name,
            "model": hf_values,
            "data": {"seq_len": min(256, model.max_seq_len)},
        }
        if (hf_dir / "tokenizer.model").is_file():
            data["data"]["tokenizer"] = str(hf_dir.resolve())
        return config_from_dict(data)
    base = load_config(config)  # the config file's own errors first
    given = (yaml.safe_load(Path(config).read_text()) or {}).get("model") or {}
    data = base.to_dict()
    for key, value in hf_values.items():
        if key in _ARCH_KEYS and key in given and getattr(base.model, key) != value:
            raise UserError(
                f"model.{key} = {getattr(base.model, key)} in '{config}' but the imported model has "
                f"{value}; remove it from the config or set model.{key}={value}"
            )
        if key in _ARCH_KEYS or key not in given:
            data["model"][key] = value
    return config_from_dict(data)


def import_hf(
    hf_dir: str | Path, out: str | Path, config: str | None = None, overwrite: bool = False
) -> Path:
    """A local transformers Mixtral folder -> a moe_lm checkpoint (step 0)."""
    configure_deepspeed()  # transformers imports DeepSpeed, which has a notice for CPU machines
    src = Path(hf_dir)
    hf = _hf_config(src, ("mixtral",))
    model_cfg = from_hf_config(hf)
    cfg = _import_config(model_cfg, src, config, Path(out).name)
    check_exportable(cfg.model)  # a Mixtral checkpoint cannot need anything export refuses
    with staged_dir(out, overwrite, lambda p: False, "--overwrite") as tmp:
        write_weights_checkpoint(tmp, cfg, from_hf_state_dict(_hf_weights(src), cfg.model))
    return Path(out)


def upcycle_dense(
    dense_dir: str | Path, config: str, out: str | Path, overwrite: bool = False, seed: int = 0
) -> Path:
    """A dense Llama-style folder -> an MoE checkpoint whose experts all start as the dense MLP."""
    configure_deepspeed()
    src = Path(dense_dir)
    cfg = load_config(config)
    dense = _hf_config(src, ("llama", "mistral"))
    check_upcycle_config(cfg.model, dense)
    generator = torch.Generator().manual_seed(seed)
    with staged_dir(out, overwrite, lambda p: False, "--overwrite") as tmp:
        write_weights_checkpoint(tmp, cfg, upcycle_state_dict(_hf_weights(src), cfg.model, generator))
    return Path(out)


class HFTextCodec:
    """A transformers tokenizer as the analysis code's TextCodec (moe_lm.analysis.routing)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no end-of-sequence token; documents could not be separated")
        self.eos_id = int(tokenizer.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Any) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


def load_hf_model(
    hf_dir: str | Path, tokenizer: str | None = None
) -> tuple[Config, MoETransformer, HFTextCodec]:
    """A local transformers Mixtral folder as a moe_lm model in memory (every expert, fp32) and its
    tokenizer (the folder's, or `tokenizer`), for analysis; nothing is written."""
    from transformers import AutoTokenizer

    src = Path(hf_dir)
    cfg = _import_config(from_hf_config(_hf_config(src, ("mixtral",))), src, None, src.name)
    model = MoETransformer(cfg.model)
    model.load_state_dict(from_hf_state_dict(_hf_weights(src), cfg.model))
    where = Path(tokenizer) if tokenizer else src
    try:
        tok = AutoTokenizer.from_pretrained(str(where), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises many kinds; the user needs the cause in one line
        raise UserError(
            f"no tokenizer loads from '{where}' ({type(e).__name__}); pass --tokenizer DIR"
        ) from None
    return cfg, model.float(), HFTextCodec(tok)
