"""Folders in and out: export a checkpoint as a transformers folder; import Mixtral or upcycle Llama.

Every output directory is built under a temporary name beside its destination and renamed into
place at the end, so an interrupted command never leaves a half-written folder behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from moe_lm.analysis.stats import LATEST_PNG, load_records, plot_latest
from moe_lm.config import Config, ModelConfig, config_from_dict, load_config
from moe_lm.errors import UserError
from moe_lm.fsutil import replace_dir
from moe_lm.hf.convert import (
    check_exportable,
    check_upcycle_config,
    from_hf_config,
    from_hf_state_dict,
    to_hf_model,
    upcycle_state_dict,
)
from moe_lm.hf.model_card import render_model_card
from moe_lm.state.checkpoint import write_weights_checkpoint
from moe_lm.state.resolve import resolve_checkpoint
from moe_lm.state.weights import check_state, load_model_state

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Files a transformers tokenizer folder may hold; anything else in the tokenizer dir stays behind.
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


# ---------------------------------------------------------------------------------------------
# Output directories


def _is_export(path: Path) -> bool:
    """A folder this module wrote before: a Mixtral config.json and our model card."""
    try:
        config = json.loads((path / "config.json").read_text())
        readme = (path / "README.md").read_text()
    except (OSError, ValueError):
        return False
    return config.get("model_type") == "mixtral" and "- moe_lm" in readme


@contextmanager
def staged_dir(
    out: str | Path, overwrite: bool, replaceable: Callable[[Path], bool], flag: str
) -> Iterator[Path]:
    """Yield a temp dir that becomes `out` on success; refuse a non-empty `out` that is not ours."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"'{out}' is a file; choose a directory for --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not replaceable(out):
        raise UserError(
            f"'{out}' is not empty and was not written by this command; choose another --out or pass {flag}"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _default_permissions(root: Path) -> None:
    """mkdtemp makes the dir private (0700) and some writers make files 0600; give the result the
    permissions of a directory made with mkdir under the user's umask."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


# ---------------------------------------------------------------------------------------------
# Export


def find_tokenizer(cfg: Config, checkpoint: Path, override: str | None = None) -> Path | None:
    """The tokenizer dir: --tokenizer, else data.tokenizer as given or relative to the run dir."""
    if override is not None:
        if (
            not (Path(override) / "tokenizer.model").is_file()
            and not (Path(override) / "tokenizer.json").is_file()
        ):
            raise UserError(f"--tokenizer '{override}' holds no tokenizer.model or tokenizer.json")
        return Path(override)
    given = Path(cfg.data.tokenizer)
    for candidate in (given, checkpoint.parent.parent / given):  # relative to the cwd, then to the run dir
        if (candidate / "tokenizer.model").is_file() or (candidate / "tokenizer.json").is_file():
            return candidate
    return None


def copy_tokenizer(src: Path, dst: Path) -> Any:
    """Copy (or, from a bare tokenizer.model, create) the transformers tokenizer files; return it loaded."""
    from transformers import AutoTokenizer, LlamaTokenizer

    if (src / "tokenizer_config.json").is_file():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)
    else:
        # A bare sentencepiece model: moe_lm trains it without a dummy prefix (see moe_lm/data/tokenizer.py).
        tok = LlamaTokenizer.from_pretrained(str(src), add_prefix_space=False, local_files_only=True)
        tok.save_pretrained(str(dst))
        shutil.copy2(src / "tokenizer.model", dst / "tokenizer.model")
    try:
        return AutoTokenizer.from_pretrained(str(dst), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; the user needs the cause in one line
        raise UserError(f"the tokenizer in '{src}' does not load with transformers: {e}") from None


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    dtype: str = "bf16",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    tokenizer: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write a folder that `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer` load offline."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    _check_shard_size(max_shard_size)
    ckpt = resolve_checkpoint(checkpoint)
    cfg = load_config(ckpt / "config.yaml")
    check_exportable(cfg.model)  # before any weight is read
    tok_dir = find_tokenizer(cfg, ckpt, tokenizer)
    with staged_dir(out, overwrite, _is_export, "--overwrite") as tmp:
        bos, eos = 1, 2  # moe_lm's sentencepiece convention, used when there is no tokenizer
        if tok_dir is None:
            print(
                f"warning: no tokenizer at '{cfg.data.tokenizer}' (data.tokenizer); exporting without "
                "tokenizer files (pass --tokenizer DIR to include one)",
                file=sys.stderr,
            )
        else:
            tok = copy_tokenizer(tok_dir, tmp)
            if len(tok) > cfg.model.vocab_size:
                raise UserError(
                    f"the tokenizer in '{tok_dir}' has {len(tok)} tokens but model.vocab_size = "
                    f"{cfg.model.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)"
                )
            bos, eos = tok.bos_token_id, tok.eos_token_id
        state = load_model_state(ckpt)
        check_state(cfg.model, state, f"checkpoint '{ckpt}'")
        model = to_hf_model(cfg.model, state, DTYPES[dtype], bos, eos)
        _set_generation_config(model, bos, eos)
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        records = load_records(ckpt)
        has_png = False
        if records.latest and records.latest.get("expert_load"):
            step = records.latest.get("step", "?")
            plot_latest(
                records.latest["expert_load"],
                tmp / LATEST_PNG,
                f"expert load at step {step}",
                cfg.model.moe_layer_indices,
            )
            has_png = True
        (tmp / "README.md").write_text(render_model_card(cfg, records, has_png, repo_id))
    return Path(out)


def _check_shard_size(size: str) -> None:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        convert_file_size_to_int(size)
    except (ValueError, TypeError):
        raise UserError(f"--max-shard-size {size!r} is not a size such as 5GB or 500MB") from None


def _set_generation_config(model: Any, bos: int | None, eos: int | None) -> None:
    from transformers import GenerationConfig

    # No pad token exists (training packs documents); generate() pads finished rows with EOS.
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)


# ---------------------------------------------------------------------------------------------
# Import and upcycle: transformers folders -> moe_lm checkpoints


def _hf_config(path: Path, kinds: tuple[str, ...]) -> Any:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise UserError(f"'{path}' is not a transformers model folder (no config.json)")
    try:
        hf = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise UserError(f"cannot read '{path / 'config.json'}': {e}") from None
    if hf.model_type not in kinds:
        raise UserError(f"'{path}' holds a '{hf.model_type}' model; expected {' or '.join(kinds)}")
    return hf


def _hf_weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    try:
        # dtype="auto" keeps the stored precision; loading into our fp32 model upcasts later.
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto", local_files_only=True)
    except Exception as e:
        raise UserError(f"cannot load the weights in '{path}': {e}") from None
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
    src = Path(dense_dir)
    cfg = load_config(config)
    dense = _hf_config(src, ("llama", "mistral"))
    check_upcycle_config(cfg.model, dense)
    generator = torch.Generator().manual_seed(seed)
    with staged_dir(out, overwrite, lambda p: False, "--overwrite") as tmp:
        write_weights_checkpoint(tmp, cfg, upcycle_state_dict(_hf_weights(src), cfg.model, generator))
    return Path(out)
