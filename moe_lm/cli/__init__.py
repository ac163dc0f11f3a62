"""`moe-lm` command line: one subcommand per job, each implemented in its own module.

Every user error (bad config, data, checkpoint or flag) is printed as one line and exits 2; a run
stopped by something outside its input (a dead worker, a wait past parallel.timeout) is one line
and exit code 3 (moe_lm/errors.py lists them all).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from moe_lm.errors import ERROR_DIR_ENV, RunError, UserError, report, write_exit, write_report

# subcommand -> (module, function taking argv and returning an exit code, one-line summary)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("moe_lm.cli.train", "train_main", "pretrain from a YAML config (also under accelerate launch)"),
    "launch": (
        "moe_lm.cli.launch",
        "launch_main",
        "accelerate launch with moe-lm's one-line errors (1 CPU to many nodes)",
    ),
    "info": (
        "moe_lm.cli.info",
        "info_main",
        "total / active parameters, per-component breakdown, resolved config",
    ),
    "tokenizer": (
        "moe_lm.data.tokenizer",
        "tokenizer_main",
        "sentencepiece BPE (byte fallback), loadable by AutoTokenizer",
    ),
    "data": (
        "moe_lm.data.cli",
        "data_main",
        "tokenise the config's sources into the token store (only what is missing)",
    ),
    "plan": ("moe_lm.cli.plan", "plan_main", "size a GPU job: memory, fit and speed per layout, rehearsed"),
    "eval": ("moe_lm.cli.train", "eval_main", "validation loss and perplexity, per validation set"),
    "generate": ("moe_lm.cli.train", "generate_main", "sample text with a KV cache"),
    "stats": ("moe_lm.cli.stats", "stats_main", "expert-load heatmaps (PNG), latest and over time"),
    "routing": (
        "moe_lm.cli.routing",
        "routing_main",
        "expert shares per data set, consecutive-token repetition against random routing, "
        "a passage coloured by expert",
    ),
    "export": (
        "moe_lm.cli.hf",
        "export_main",
        "a Hugging Face MixtralForCausalLM folder with tokenizer and model card",
    ),
    "import": ("moe_lm.cli.hf", "import_main", "a local transformers Mixtral folder -> a moe_lm checkpoint"),
    "upcycle": (
        "moe_lm.cli.hf",
        "upcycle_main",
        "sparse upcycling of a dense Llama-style model into an MoE checkpoint",
    ),
    "push": (
        "moe_lm.cli.hf",
        "push_main",
        "upload an export to the Hub (or, with --dry-run, list what would be sent)",
    ),
}

# subcommand -> (its arguments, its guide). With COMMANDS this is the one source of `moe-lm --help`,
# the last lines of `moe-lm COMMAND --help` and the README's command table (scripts/gen_docs.py
# writes the table; tests/docs checks that it is current and that every command has a row here).
USAGE: dict[str, tuple[str, str]] = {
    "train": ("CONFIG [key.sub=value ...]", "docs/launching.md"),
    "launch": ("[accelerate launch options] train CONFIG [key.sub=value ...]", "docs/launching.md"),
    "info": ("CONFIG [key.sub=value ...] [--json]", "docs/configuration.md"),
    "tokenizer": ("train --input FILE... --vocab-size N --out DIR", "docs/data.md"),
    "data": ("prepare CONFIG [key.sub=value ...] [--verify]", "docs/data.md"),
    "plan": (
        "CONFIG [key.sub=value ...] --gpus N [--gpus-per-node N] [--gpu KIND] [--layouts auto|LIST] [--imbalance F] [--json]",
        "docs/plan.md",
    ),
    "eval": (
        "RUN_OR_CHECKPOINT [--sets NAME...] [--data FILE... [--kind chat|text] [--text-field NAME]]",
        "docs/data.md",
    ),
    "generate": (
        "RUN_OR_CHECKPOINT --prompt TEXT [--chat [--system TEXT]] [--max-new-tokens N] [--temperature T] [--top-k K]",
        "docs/launching.md",
    ),
    "stats": ("RUN_OR_CHECKPOINT --out DIR", "docs/routing.md"),
    "routing": (
        "RUN_OR_CHECKPOINT_OR_HF_DIR --data NAME=FILE[,FILE...]... --out DIR [--layers N...] [--passage NAME]",
        "docs/routing.md",
    ),
    "export": (
        "RUN_OR_CHECKPOINT --out DIR [--dtype bf16|fp16|fp32] [--max-shard-size 5GB] [--routing DIR]",
        "docs/hub.md",
    ),
    "import": ("HF_DIR --out CHECKPOINT [--config CONFIG]", "docs/hub.md"),
    "upcycle": ("DENSE_HF_DIR --config CONFIG --out CHECKPOINT", "docs/hub.md"),
    "push": (
        "DIR --repo-id OWNER/NAME [--private] [--revision B] [--commit-message M] [--endpoint URL] [--dry-run]",
        "docs/hub.md",
    ),
}
GUIDES_NOTE = "The guides are docs/*.md in the moe_lm repository; its README.md lists them."


def synopsis(name: str) -> str:
    return f"moe-lm {name} {USAGE[name][0]}" if name in USAGE else f"moe-lm {name}"


def summary(name: str) -> str:
    """What `moe-lm COMMAND --help` ends with: the README's row for the command."""
    guide = f"\nguide: {USAGE[name][1]}" if name in USAGE else ""
    return f"{synopsis(name)}\n  {COMMANDS[name][2]}{guide}"


def _usage() -> str:
    lines = ["usage: moe-lm COMMAND [ARGS...]   (python -m moe_lm COMMAND ... is the same)", "", "commands:"]
    for name, (_, _, help_) in COMMANDS.items():
        guide = f"  [{USAGE[name][1]}]" if name in USAGE else ""
        lines += [f"  {synopsis(name)}", f"      {help_}{guide}"]
    lines += [
        "",
        "A user error (config, data, checkpoint, flags) is one line on stderr starting with `error:`, exit code 2.",
        f"Run `moe-lm COMMAND --help` for a command's options. {GUIDES_NOTE}",
    ]
    return "\n".join(lines)


def _wants_help(argv: list[str]) -> bool:
    return "-h" in argv or "--help" in argv


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
        code = int(func(rest) or 0)
    except (UserError, RunError) as e:
        return report(e)
    except SystemExit as e:  # argparse's --help prints and exits 0; anything else is not ours to catch
        if not (_wants_help(rest) and e.code in (0, None)):
            raise
        code = 0
    if code == 0 and _wants_help(rest):
        print(f"\n{summary(name)}")
    return code


def run() -> None:
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`moe-lm info CONFIG --json | head`): end quietly, as Unix tools do.
        # stdout is pointed at /dev/null so the interpreter's own final flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + 13  # what a process killed by SIGPIPE reports
    except KeyboardInterrupt:
        # Ctrl-C outside the training loop (inside it, the trainer saves a checkpoint and returns 0):
        # nothing half-done is ever used (stores and checkpoints are written whole), so one line.
        code = 128 + signal.SIGINT
        line = (
            "error: interrupted (SIGINT); what was complete is kept: run the same command again to continue"
        )
        if not write_report("run", line, code, consequence=False):
            print(line, file=sys.stderr)
    except Exception as e:
        if not os.environ.get(ERROR_DIR_ENV):
            raise
        # A worker of `moe-lm launch`: the launching process decides what to show (this crash is
        # the cause unless another process failed first), so the traceback goes to the report.
        import traceback

        summary = str(e).strip().splitlines()
        line = f"{type(e).__name__}: {summary[0]}" if summary else type(e).__name__
        if not write_report("crash", line, 1, consequence=False, traceback=traceback.format_exc()):
            raise
        code = 1
    write_exit(code)
    from moe_lm.parallel.teardown import launched_worker, leave

    if launched_worker():  # the interpreter's teardown of process groups and threads can hang
        leave(code)
    if sys.argv[1:2] == ["launch"]:
        # Its processes have ended and its status is decided. Python's teardown puts the default
        # action back on signals it handled: a stop signal sent a moment late (the third of three,
        # 50 ms apart) then killed a launcher that had reported a clean stop (exit -15, not 0).
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
    sys.exit(code)
