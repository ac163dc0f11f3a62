"""`moe-lm train`, `moe-lm eval` and `moe-lm generate`.

The trainer, accelerate and the Hub client are imported inside the command that needs them, so
`eval` and `generate` do not pay for them and a config error is reported before they load.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from typing import TYPE_CHECKING

import torch

from moe_lm.config import Config, load_config
from moe_lm.errors import ArgumentParser, RunError, UserError, report
from moe_lm.validation import config_warnings

if TYPE_CHECKING:
    from moe_lm.parallel.layout import Layout


def train_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="moe-lm train", description="Pretrain from a YAML config.")
    parser.add_argument("config", help="YAML run config, e.g. configs/tiny-shakespeare.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100")
    return parser


def train_main(argv: list[str]) -> int:
    args = train_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    preflight(cfg)
    from moe_lm.parallel.layout import start_processes

    layout = start_processes(cfg)
    if layout.world_size == 1:
        return _train(cfg, layout)
    # A worker of a multi-process run says why it failed here (peers told at once, a lost peer or a
    # timed-out collective in one line); `moe_lm.cli.run` then ends it without the interpreter's
    # teardown (moe_lm/parallel/teardown.py).
    try:
        code = _train(cfg, layout)
    except (UserError, RunError) as e:
        layout.waits.announce_failure(e)  # peers waiting on this process stop now, not at a timeout
        code = report(e)
    except Exception as e:
        explained = layout.waits.explain(e)  # a peer went away or a collective timed out: one line
        if explained is None:  # this process's own crash: the others stop, its traceback is the cause
            layout.waits.announce_failure(e)
            raise
        code = report(explained)
    return code


def preflight(cfg: Config) -> None:
    """What would otherwise fail late, checked before any process group, data or model: the
    TensorBoard package, the checkpoint train.init_from starts from (so a missing or misshapen one
    never leaves a tokenizer or token store trained for nothing), everything the final push needs (on
    the first process only: it asks the Hub once), and on GPUs whether the run's layout fits the
    device (the plan, rehearsed on the first process in a fake process group of the launched size:
    moe_lm/plan/preflight.py)."""
    _check_init_from(cfg)
    if cfg.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError(
            "logging.tensorboard needs the tensorboard package: pip install 'moe_lm[tensorboard]' "
            "(or set logging.tensorboard=false)"
        )
    if cfg.hub.push_at_end and cfg.hub.repo_id and os.environ.get("RANK", "0") == "0":
        from moe_lm.hf.hub import check_can_push

        user = check_can_push(cfg.hub.repo_id, key="hub.repo_id")
        print(f"hub.push_at_end: '{user}' may push to {cfg.hub.repo_id}; the run is pushed when it finishes")
    if torch.cuda.is_available():
        from moe_lm.plan.preflight import check_gpu_run

        check_gpu_run(cfg)


def _check_init_from(cfg: Config) -> None:
    """train.init_from exists, is complete and has this config's model shape (unless resume=auto
    finds the run's own checkpoints, which are loaded instead)."""
    from moe_lm.state.checkpoint import check_compatible
    from moe_lm.state.resolve import resolve_resume, step_dirs

    if not cfg.train.init_from:
        return
    if cfg.train.resume == "auto" and step_dirs(cfg.output_dir / "checkpoints"):
        return
    init = resolve_resume(cfg.train.init_from, cfg.output_dir, key="train.init_from")
    check_compatible(load_config(init / "config.yaml"), cfg, init)


def _train(cfg: Config, layout: Layout) -> int:
    from moe_lm.train.rundir import RunFinished
    from moe_lm.train.trainer import Trainer

    try:
        trainer = Trainer(cfg, layout)
    except RunFinished as done:  # a requeued job whose run already ended: every rank stops here
        message = str(done)
    else:
        message = ""
    if message:
        layout.shutdown()
        if layout.is_main:
            print(message)
        return 0
    if layout.is_main:  # once every input has loaded: a run that fails on bad input only says why
        for line in config_warnings(cfg):
            print(line, file=sys.stderr, flush=True)
    try:
        summary = trainer.fit()
    finally:
        layout.shutdown()
    final = summary["final_checkpoint"]
    if summary["finished"] and final is not None and cfg.hub.push_at_end and layout.is_main:
        from moe_lm.hf.hub import push_at_end

        push_at_end(cfg, final)
    if layout.is_main:
        print(
            f"done: step {summary['step']}, {summary['tokens']} tokens"
            + (f", val_loss {summary['val_loss']:.4f}" if "val_loss" in summary else "")
        )
    return 0


def _load(path: str, device: str) -> tuple:
    from moe_lm.data.tokenizer import Tokenizer
    from moe_lm.state.weights import load_pretrained

    cfg, model = load_pretrained(path, device)
    model.eval()
    return cfg, model, Tokenizer.load(cfg.data.tokenizer)


def eval_main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="moe-lm eval", description="Validation loss and perplexity.")
    parser.add_argument("checkpoint", help="a checkpoint directory or a run directory (its latest)")
    parser.add_argument(
        "--data",
        nargs="+",
        help="text/JSON/parquet files to evaluate on (default: the run's validation sets)",
    )
    parser.add_argument(
        "--kind",
        choices=["chat", "text"],
        help="with --data: conversations (the loss over the run's data.train_on tokens) or text (every "
        "token); default: chat when the run trained on conversations only",
    )
    parser.add_argument(
        "--format",
        choices=["auto", "text", "json", "parquet"],
        help="with --data: how to read the files (default: the run's data.format)",
    )
    parser.add_argument(
        "--text-field", help="with --data: the JSON/parquet field holding the text (default: the run's)"
    )
    parser.add_argument("--sets", nargs="+", metavar="NAME", help="only these of the run's validation sets")
    parser.add_argument("--max-batches", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from moe_lm.data.corpus import open_data
    from moe_lm.data.loader import eval_batches
    from moe_lm.data.sources import eval_plan
    from moe_lm.errors import UserError
    from moe_lm.train.step import forward

    cfg, model, tokenizer = _load(args.checkpoint, args.device)
    given = [
        f
        for f, v in (("--kind", args.kind), ("--format", args.format), ("--text-field", args.text_field))
        if v
    ]
    if given and not args.data:
        raise UserError(f"{given[0]} says how to read --data FILE...; the run's own sets are read as trained")
    plan = eval_plan(cfg, args.data, args.kind, args.format, args.text_field) if args.data else None
    data = open_data(cfg, tokenizer, plan=plan, train=False)
    sets = data.val
    if args.sets:
        unknown = [n for n in args.sets if n not in sets]
        if unknown:
            raise UserError(
                f"--sets: no validation set {unknown[0]!r} in this run (sets: {', '.join(sets) or 'none'})"
            )
        sets = {n: sets[n] for n in args.sets}
    if not sets:
        raise UserError(
            "the run has no validation set (data.val_fraction = 0 and no val_files); pass --data FILE..."
        )
    results = {}
    with torch.no_grad():
        for name, blocks in sets.items():
            total_loss, total_tokens = 0.0, 0
            for batch in eval_batches(
                blocks, args.batch_size or cfg.train.micro_batch_size, max_batches=args.max_batches
            ):
                labels = batch[1]
                # as training's evaluation computes it: documents, and padding kept out of routing
                out = forward(cfg, torch.device(args.device), tokenizer.eos_id, model, batch)
                assert out.lm_loss is not None
                tokens = int((labels != -100).sum())  # the mean is over these, as in training's eval
                if tokens:
                    total_loss += float(out.lm_loss) * tokens
                    total_tokens += tokens
            if not total_tokens:
                raise UserError(
                    f"validation set {name!r} has no tokens to evaluate; pass --data FILE... with text"
                )
            results[name] = (total_loss / total_tokens, total_tokens)
    loss = sum(v[0] for v in results.values()) / len(results)
    tokens = sum(v[1] for v in results.values())
    over = f" (over {cfg.data.train_on or 'assistant'} tokens)" if data.chat else ""
    print(f"val_loss {loss:.4f}  val_ppl {math.exp(loss):.3f}  tokens {tokens}{over}")
    if len(results) > 1:
        for name, (set_loss, set_tokens) in results.items():
            print(f"  val/{name}  loss {set_loss:.4f}  ppl {math.exp(set_loss):.3f}  tokens {set_tokens}")
    return 0


def generate_main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="moe-lm generate", description="Sample text with a KV cache.")
    parser.add_argument("checkpoint", help="a checkpoint directory or a run directory (its latest)")
    parser.add_argument("--prompt", default="", help="text to continue; with --chat, the user's message")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="answer --prompt as the assistant: render it with the tokenizer's chat template, stop at "
        "the end of the reply and print only the reply",
    )
    parser.add_argument("--system", help="with --chat: a system message before the user's")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.system is not None and not args.chat:
        raise UserError("--system needs --chat (it is a message of the conversation)")
    _, model, tokenizer = _load(args.checkpoint, args.device)
    if args.chat:
        from moe_lm.data.chat import chat_encoder

        messages = [{"role": "user", "content": args.prompt}]
        if args.system is not None:
            messages.insert(0, {"role": "system", "content": args.system})
        prompt = chat_encoder(tokenizer).prompt_ids(messages)
    else:
        prompt = tokenizer.encode(args.prompt) or [tokenizer.bos_id]
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    ids = torch.tensor([prompt], device=args.device)
    out = model.generate(
        ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        eos_id=tokenizer.eos_id,
        generator=gen,
    )
    print(tokenizer.decode(out[0, len(prompt) :].tolist() if args.chat else out[0].tolist()))
    return 0
