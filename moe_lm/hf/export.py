"""Export a checkpoint as a transformers `MixtralForCausalLM` folder: weights, config, tokenizer,
generation config, model card and expert-load heatmap (and the run's routing figures, if any).

The folder is built under a temporary name beside its destination and renamed into place at the
end (moe_lm.fsutil.staged_dir), so an interrupted export never leaves a half-written folder.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from moe_lm.analysis.expert_load import LATEST_PNG, plot_latest
from moe_lm.analysis.records import load_records
from moe_lm.config import Config, load_config
from moe_lm.data.chat_template import TEMPLATE_FILE, load_chat_template, write_chat_template
from moe_lm.errors import UserError
from moe_lm.fsutil import staged_dir
from moe_lm.hf.convert import check_exportable, to_hf_model
from moe_lm.hf.model_card import render_model_card
from moe_lm.hf.routing_card import copy_routing, find_routing
from moe_lm.libraries import configure_deepspeed
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
    TEMPLATE_FILE,
)


def _is_export(path: Path) -> bool:
    """A folder this module wrote before: a Mixtral config.json and our model card."""
    try:
        config = json.loads((path / "config.json").read_text())
        readme = (path / "README.md").read_text()
    except (OSError, ValueError):
        return False
    return config.get("model_type") == "mixtral" and "- moe_lm" in readme


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
    """Copy (or, from a bare tokenizer.model, create) the transformers tokenizer files, with the chat
    template (chat_template.jinja and tokenizer_config.json's chat_template); return it loaded."""
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
    template = load_chat_template(src)
    if template is not None:  # in both places transformers (any version), TGI and vLLM look
        write_chat_template(dst, template)
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
    routing: str | None = None,
) -> Path:
    """Write a folder that `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer` load offline."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    configure_deepspeed()  # transformers imports DeepSpeed, which has a notice for CPU machines
    _check_shard_size(max_shard_size)
    ckpt = resolve_checkpoint(checkpoint)
    cfg = load_config(ckpt / "config.yaml")
    check_exportable(cfg.model)  # before any weight is read
    tok_dir = find_tokenizer(cfg, ckpt, tokenizer)
    routing_dir = find_routing(ckpt, routing)
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
            set_model_max_length(tmp, cfg.model.max_seq_len)
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
        summary = copy_routing(routing_dir, tmp) if routing_dir is not None else None
        (tmp / "README.md").write_text(render_model_card(cfg, records, has_png, repo_id, summary))
    return Path(out)


def set_model_max_length(folder: Path, context: int) -> None:
    """The tokenizer's model_max_length is the model's context; transformers' default when it is
    unset (1e30) lets pipelines feed inputs of any length without truncation or a warning."""
    path = folder / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        config["model_max_length"] = context
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


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
