"""The ``mopd`` command: dispatch only. Each subcommand lives in its own module, which offers ``HELP``,
``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args) -> int``; only the chosen one is imported.

    mopd train --config FILE [key=value ...]        (megatron_mopd/trainer/command.py)
    mopd demo [--output DIR] [key=value ...]        (megatron_mopd/demo/__init__.py)
    mopd build-projection --student TOK --teacher TOK -o FILE   (megatron_mopd/crosstok/command.py)
    mopd serve-teacher --model DIR [--port ...]     (megatron_mopd/teachers/server.py)
    mopd check-teacher URL... --topk K [...]        (megatron_mopd/teachers/check.py)

The project's own errors (configuration, teacher, alignment, projection, a non-finite loss) and bad
files end the command with one line on stderr and exit status 1, not a traceback (``MOPD_DEBUG=1``
shows the traceback). Megatron's import-time warnings about Transformer Engine and Apex are hidden
unless ``MOPD_VERBOSE=1``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from typing import Optional, Sequence

COMMANDS = {
    "train": ("megatron_mopd.trainer.command", "train a student: Megatron-Core distillation from a YAML config"),
    "demo": ("megatron_mopd.demo", "the CPU demo: the trainer on the embedded default configuration"),
    "build-projection": ("megatron_mopd.crosstok.command", "build the cross-tokenizer vocabulary projection"),
    "serve-teacher": ("megatron_mopd.teachers.server", "serve a Hugging Face causal LM as a vLLM/SGLang teacher"),
    "check-teacher": ("megatron_mopd.teachers.check", "probe teacher servers: health, top-K, speed, agreement"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mopd", description="Multi-teacher on-policy distillation for Megatron-Core.",
        epilog="commands:\n" + "\n".join(f"  {name:<18}{help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\n`mopd COMMAND --help` describes a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    return parser


def run_command(command: str, argv: Sequence[str]) -> int:
    """Parse ``argv`` for ``command`` and run it; project errors become one line and exit status 1."""
    _quiet_megatron_imports()
    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"mopd {command}", description=module.DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return module.run(args)
    except KeyboardInterrupt:
        print(f"mopd {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the project's errors become one line; others re-raise
        if os.environ.get("MOPD_DEBUG") or not _is_user_error(error):
            raise
        print(f"mopd {command}: error: {error}", file=sys.stderr)
        return 1


def _is_user_error(error: BaseException) -> bool:
    from megatron_mopd.teachers.protocols import TeacherError

    user_errors: tuple[type, ...] = (ValueError, OSError, TeacherError)
    if "megatron_mopd.trainer.forward_step" in sys.modules:
        user_errors += (sys.modules["megatron_mopd.trainer.forward_step"].NonFiniteLossError,)
    return isinstance(error, user_errors)


def _quiet_megatron_imports() -> None:
    if not os.environ.get("MOPD_VERBOSE"):
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
        warnings.filterwarnings("ignore", message=".*apex.*", category=UserWarning)
        warnings.filterwarnings("ignore", message="full scope is deprecated")  # Megatron's own default config


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        _top_parser().parse_args(argv or ["--help"])
        return 2
    if argv[0] not in COMMANDS:
        _top_parser().parse_args(argv[:1])  # prints the valid choices and exits 2
    if argv[0] == "train":  # the platform first: on NPU, MindSpeed's adaptor before any Megatron import
        from megatron_mopd.train import main as train

        return train(argv[1:])
    return run_command(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
