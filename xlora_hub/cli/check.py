"""``xlora-hub check``: a mixture's pins, digests, shapes, base model and layer order checked without downloading
weights; exit 0 when sound, 1 with one line per problem (``--json``: a machine-readable report)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .options import EXIT_OK, EXIT_USER_ERROR, PROG, AddCommand, hub_options


def cmd_check(args: argparse.Namespace) -> int:
    """Print the problems (or that there are none) and return 1 when there is any."""
    from ..hub import check_mixture

    problems = check_mixture(
        args.mixture,
        revision=args.revision,
        token=args.token,
        cache_dir=args.cache_dir,
        base_model=args.base_model,
    )
    if args.json:
        report = {
            "mixture": args.mixture,
            "revision": args.revision,
            "ok": not problems,
            "problems": [{"subject": p.subject, "message": p.message} for p in problems],
        }
        print(json.dumps(report, indent=2))
    elif problems:
        for problem in problems:
            print(f"{args.mixture}: {problem}")
    else:
        print(f"{args.mixture}: ok (pins, digests, shapes, base model and layer order checked; no weights downloaded)")
    return EXIT_USER_ERROR if problems else EXIT_OK


def add_command(add: AddCommand, sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(
        "check",
        "check a mixture's pins, digests and shapes against its base model without downloading weights",
        [f"{PROG} check my-org/my-mixture", f"{PROG} check my-org/my-mixture --json --revision v1"],
        description="Check a mixture the way a load would, without downloading any weight: every expert pin "
        "resolves, each expert's recorded sha256/size is the Hub's, each expert's tensor header (read remotely) "
        "fits the base model, the classifier fits the config, and the layer order is the one a load builds. "
        "Exit 0 when sound, 1 with one line per problem.",
    )
    p.set_defaults(func=cmd_check)
    p.add_argument("mixture", metavar="MIXTURE", help="Hub repo id or mixture folder")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument(
        "--base-model",
        default=None,
        metavar="MODEL",
        help="Hub repo id or folder of the base model, for a mixture that records none (only config.json is read)",
    )
    hub_options(p, offline=False)
