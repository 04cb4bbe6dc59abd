"""``xlora-hub info``: a mixture's experts, pinned revisions, sizes and settings, without loading weights."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from .options import EXIT_OK, PROG, AddCommand, hub_kwargs, hub_options


def cmd_info(args: argparse.Namespace) -> int:
    """Print the mixture's summary (text, or ``--json``)."""
    from ..hub import inspect_mixture

    summary = inspect_mixture(args.mixture, revision=args.revision, **hub_kwargs(args))
    if args.json:
        print(json.dumps(dataclasses.asdict(summary), indent=2))
    else:
        print(summary)
    return EXIT_OK


def add_command(add: AddCommand, sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(
        "info",
        "show a mixture's experts, pinned revisions, sizes and settings (no weights loaded)",
        [f"{PROG} info my-org/my-mixture", f"{PROG} info ./mix --json"],
    )
    p.set_defaults(func=cmd_info)
    p.add_argument("mixture", metavar="MIXTURE", help="Hub repo id or mixture folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    hub_options(p)
