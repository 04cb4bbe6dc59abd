"""The ``xlora-hub`` program: its parser (one ``add_command`` per command module) and :func:`main`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import bench, check, convert, create, demo, generate, info, pull, push, space, train
from .bench import split_bench_args
from .errors import report_error
from .options import EXIT_USAGE, PROG, HelpFormatter, UsageError, common_parent, examples
from .output import output_settings

COMMANDS = (create, train, info, check, generate, push, pull, convert, demo, space, bench)
"""The command modules, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of every sub-command (each defined by the ``add_command`` of its module)."""
    from .. import __version__

    common = common_parent()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="X-LoRA mixtures of LoRA experts on the Hugging Face Hub: create, train, inspect, generate, "
        "push, pull, convert, demo.",
        epilog=examples(
            f"{PROG} create my-org/base my-org/lora-math my-org/lora-code -o ./mix",
            f"{PROG} train ./mix --data train.jsonl --epochs 2",
            f"{PROG} push ./mix my-org/my-mixture",
            f"{PROG} check my-org/my-mixture",
            f"{PROG} generate my-org/my-mixture 'What is 2+3?' --show-routing",
            f"Run `{PROG} COMMAND --help` for the options of each command.",
        ),
        formatter_class=HelpFormatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, examples_: Sequence[str], description: str | None = None, **kwargs: Any):
        return sub.add_parser(
            name,
            help=help,
            description=description or help[0].upper() + help[1:] + ".",
            epilog=examples(*examples_),
            formatter_class=HelpFormatter,
            parents=[common],
            **kwargs,
        )

    for command in COMMANDS:
        command.add_command(add, sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``xlora-hub`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, bench_args = split_bench_args(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, bad usage
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    if bench_args is not None:
        args.bench_args = bench_args
    args.quiet = getattr(args, "quiet", False)
    args.debug = getattr(args, "debug", False)
    raw_token = getattr(args, "token", None)
    if isinstance(raw_token, str):  # as huggingface_hub does for HF_TOKEN and its token file
        args.token = raw_token.strip() or None
    secrets = [s for s in (raw_token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")) if s]
    try:
        with output_settings(quiet=args.quiet, debug=args.debug, secrets=secrets):
            return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a user error: one line; a bug (or --debug): the redacted traceback
        return report_error(err, command=args.command, debug=args.debug, secrets=secrets)


__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]
