"""`moe-lm` command line: one subcommand per job, each implemented in its own module.

Every user error (bad config, data, checkpoint or flag) is printed as one line and exits 2.
"""

from __future__ import annotations

import importlib
import os
import sys

from moe_lm.errors import ERROR_DIR_ENV, UserError, report

# subcommand -> (module, function taking argv and returning an exit code, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("moe_lm.cli.train", "train_main", "pretrain from a YAML config (also under accelerate launch)"),
    "tokenizer": ("moe_lm.data.tokenizer", "tokenizer_main", "train or ensure a sentencepiece tokenizer"),
    "data": ("moe_lm.data.cli", "data_main", "prepare: tokenise a config's sources into the token store"),
    "info": ("moe_lm.cli.info", "info_main", "parameter counts (total / active) and the resolved config"),
    "plan": ("moe_lm.cli.plan", "plan_main", "size a GPU job: memory, fit and speed per layout, rehearsed"),
    "eval": ("moe_lm.cli.train", "eval_main", "validation loss and perplexity of a checkpoint"),
    "generate": ("moe_lm.cli.train", "generate_main", "sample text from a checkpoint"),
    "stats": ("moe_lm.cli.stats", "stats_main", "expert-load heatmaps (PNG) from a run or checkpoint"),
    "routing": (
        "moe_lm.cli.routing",
        "routing_main",
        "expert shares, repetition and a coloured passage per data set",
    ),
    "export": (
        "moe_lm.cli.hf",
        "export_main",
        "export a checkpoint as a transformers MixtralForCausalLM folder",
    ),
    "import": ("moe_lm.cli.hf", "import_main", "import a local transformers Mixtral folder as a checkpoint"),
    "upcycle": ("moe_lm.cli.hf", "upcycle_main", "turn a dense Llama-style folder into an MoE checkpoint"),
    "push": ("moe_lm.cli.hf", "push_main", "upload an exported folder to the Hugging Face Hub"),
    "launch": (
        "moe_lm.cli.launch",
        "launch_main",
        "accelerate launch with moe-lm's one-line errors: moe-lm launch [accelerate options] train ...",
    ),
}


def _usage() -> str:
    lines = ["usage: moe-lm COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `moe-lm COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command '{name}'; run `moe-lm --help` for the list", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[name]
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(rest) or 0)
    except UserError as e:
        return report(e)


def run() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`moe-lm info CONFIG --json | head`): end quietly, as Unix tools do.
        # stdout is pointed at /dev/null so the interpreter's own final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + 13  # what a process killed by SIGPIPE reports
    except Exception:
        error_dir = os.environ.get(ERROR_DIR_ENV)
        if not error_dir:
            raise
        # A worker of `moe-lm launch`: the launching process prints this unless a rank reported
        # bad input (then this is most likely a peer's broken collective, not news).
        import traceback

        path = os.path.join(error_dir, f"rank{os.environ.get('RANK', '0')}.traceback")
        with open(path, "w") as f:
            f.write(traceback.format_exc())
        code = 1
    sys.exit(code)
