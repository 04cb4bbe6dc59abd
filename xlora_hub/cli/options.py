"""What every sub-command shares: the program name, exit codes, help layout and the common option groups.

Each command module builds its parser with the ``add`` helper :func:`xlora_hub.cli.app.build_parser` hands
it and these groups, so ``--token``, ``--revision``, ``--dtype``... read and behave the same in every command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

PROG = "xlora-hub"
EXIT_OK, EXIT_USER_ERROR, EXIT_USAGE = 0, 1, 2
DTYPES = ["auto", "float32", "bfloat16", "float16"]

AddCommand = Callable[..., argparse.ArgumentParser]
"""``add(name, help, examples, description=None, **kwargs)``: a sub-parser with the shared layout."""


class UsageError(Exception):
    """Arguments that parse but do not make sense together (exit 2, like argparse's own errors)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's layout, with the examples kept as written and option help starting at column 32."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def examples(*lines: str) -> str:
    """The ``examples:`` epilog of a command's ``--help``."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def common_parent() -> argparse.ArgumentParser:
    """``-q`` and ``--debug``, accepted before or after the sub-command (SUPPRESS keeps the earlier value)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("output")
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    return parent


def hub_options(
    parser: argparse.ArgumentParser,
    *,
    revision: str | None = "revision of the mixture (branch, tag or commit)",
    offline: bool = True,
    cache: bool = True,
) -> None:
    """The ``Hub`` group: ``--token`` always; ``--revision``, ``--cache-dir`` and ``--offline`` where they apply."""
    group = parser.add_argument_group("Hub")
    group.add_argument(
        "--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token); never printed"
    )
    if revision:
        group.add_argument("--revision", default=None, help=revision)
    if cache:
        group.add_argument("--cache-dir", default=None, help="Hub cache folder (default: HF_HUB_CACHE)")
    if offline:
        group.add_argument("--offline", action="store_true", help="use only files already in the cache")


def model_options(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    """The ``model`` group of the commands that load weights: ``--dtype``, ``--device``, ``--tokenizer``."""
    group = parser.add_argument_group("model")
    group.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype")
    if device:
        group.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps... (default: cpu)")
    group.add_argument("--tokenizer", default=None, help="tokenizer repo id or folder (default: the base model's)")


def hub_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``token`` / ``cache_dir`` / ``local_files_only`` as the library functions take them."""
    return dict(
        token=args.token, cache_dir=getattr(args, "cache_dir", None), local_files_only=getattr(args, "offline", False)
    )


def torch_dtype(name: str | None):
    """The ``torch.dtype`` of a ``--dtype`` choice (``None`` for ``auto``: the checkpoint's own)."""
    if name in (None, "auto"):
        return None
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def print_lines(*lines: str) -> None:
    """Print each line of a command's result to stdout."""
    for line in lines:
        print(line)
