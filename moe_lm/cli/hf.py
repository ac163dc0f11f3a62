"""`moe-lm export | import | upcycle | push`: argument parsing only; the work is in moe_lm.hf."""

from __future__ import annotations

import argparse

from moe_lm.errors import ArgumentParser


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return ArgumentParser(prog=f"moe-lm {prog}", description=description)


def export_main(argv: list[str]) -> int:
    from moe_lm.hf.export import DTYPES, export_checkpoint

    p = _parser(
        "export", "Export a checkpoint as a transformers MixtralForCausalLM folder (with tokenizer and card)."
    )
    p.add_argument(
        "checkpoint", metavar="RUN_OR_CHECKPOINT", help="a checkpoint dir or a run dir (its latest)"
    )
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--max-shard-size", default="5GB", help="largest weight file, e.g. 5GB or 500MB")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer dir (default: the config's data.tokenizer)")
    p.add_argument("--repo-id", metavar="OWNER/NAME", help="name used in the model card")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out that is not an export")
    p.add_argument(
        "--routing", metavar="DIR", help="a `moe-lm routing` output for the card (default: RUN/routing)"
    )
    args = p.parse_args(argv)
    out = export_checkpoint(
        args.checkpoint,
        args.out,
        args.dtype,
        args.max_shard_size,
        args.overwrite,
        args.tokenizer,
        args.repo_id,
        args.routing,
    )
    print(f"exported {args.checkpoint} to {out} ({args.dtype})")
    return 0


def import_main(argv: list[str]) -> int:
    from moe_lm.hf.importing import import_hf

    p = _parser("import", "Import a local transformers Mixtral folder as a moe_lm checkpoint (step 0).")
    p.add_argument("hf_dir", metavar="HF_DIR")
    p.add_argument("--out", required=True, metavar="CHECKPOINT")
    p.add_argument("--config", help="a run config for everything but the architecture (data, optim, ...)")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    out = import_hf(args.hf_dir, args.out, args.config, args.overwrite)
    print(f"imported {args.hf_dir} to {out}; train from it with train.init_from={out}")
    return 0


def upcycle_main(argv: list[str]) -> int:
    from moe_lm.hf.convert import UPCYCLE_ROUTER_STD_SCALE
    from moe_lm.hf.importing import upcycle_dense

    p = _parser(
        "upcycle", "Turn a dense Llama-style folder into an MoE checkpoint (every expert = the dense MLP)."
    )
    p.add_argument("dense_dir", metavar="DENSE_HF_DIR")
    p.add_argument(
        "--config", required=True, help="the MoE run config; its shapes must match the dense model"
    )
    p.add_argument("--out", required=True, metavar="CHECKPOINT")
    p.add_argument(
        "--seed", type=int, default=0, help=f"router init seed (std {UPCYCLE_ROUTER_STD_SCALE} x init_std)"
    )
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    out = upcycle_dense(args.dense_dir, args.config, args.out, args.overwrite, args.seed)
    print(f"upcycled {args.dense_dir} to {out}; train from it with train.init_from={out}")
    return 0


def push_main(argv: list[str]) -> int:
    from moe_lm.hf.hub import describe_push, push_folder

    p = _parser(
        "push",
        "Upload an exported folder to the Hugging Face Hub; its model card is filled in for --repo-id.",
    )
    p.add_argument("folder", metavar="DIR")
    p.add_argument("--repo-id", required=True, metavar="OWNER/NAME")
    p.add_argument("--private", action="store_true", help="create the repo private (no effect if it exists)")
    p.add_argument("--revision", metavar="BRANCH", help="branch to commit to (created if missing)")
    p.add_argument("--commit-message", metavar="M")
    p.add_argument(
        "--endpoint",
        metavar="URL",
        help="the Hub's URL (default: HF_ENDPOINT, else https://huggingface.co), e.g. a private Hub",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="list what would be uploaded, and where; send nothing"
    )
    args = p.parse_args(argv)
    if args.dry_run:
        print(describe_push(args.folder, args.repo_id, args.private, args.revision, args.endpoint))
        return 0
    url = push_folder(
        args.folder, args.repo_id, args.private, args.revision, args.commit_message, args.endpoint
    )
    print(f"pushed {args.folder} to {args.repo_id}: {url}")
    return 0
