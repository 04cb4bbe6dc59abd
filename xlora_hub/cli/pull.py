"""``xlora-hub pull``: download a mixture, its experts and its base model so that it loads offline."""

from __future__ import annotations

import argparse
from typing import Any

from .options import EXIT_OK, PROG, AddCommand, hub_options, print_lines


def cmd_pull(args: argparse.Namespace) -> int:
    """Download the mixture, its experts and base model; print where each is."""
    from ..hub import download_mixture

    result = download_mixture(
        args.mixture,
        revision=args.revision,
        token=args.token,
        cache_dir=args.cache_dir,
        local_dir=args.local_dir,
        include_base_model=not args.no_base_model,
    )
    print_lines(
        f"Pulled {result.mixture}" + (f" @ {result.commit}" if result.commit else "") + f" into {result.folder}",
        *(f"  expert {name}: {where}" for name, where in result.experts.items()),
    )
    if result.base_model:
        print_lines(f"  base model: {result.base_model}")
    target = args.local_dir or args.mixture
    print_lines(f"It now loads without network: {PROG} generate {target} 'prompt' --offline")
    return EXIT_OK


def add_command(add: AddCommand, sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(
        "pull",
        "download a mixture, its experts and its base model so it loads offline",
        [f"{PROG} pull my-org/my-mixture", f"{PROG} pull my-org/my-mixture --revision v1 --local-dir ./mix"],
        description="Download a mixture (into the cache, or --local-dir), each Hub expert at its pinned revision "
        "and the base model into the cache, so that loading it then works with --offline / HF_HUB_OFFLINE=1.",
    )
    p.set_defaults(func=cmd_pull)
    p.add_argument("mixture", metavar="MIXTURE", help="Hub repo id (or a local mixture folder: fetch its experts)")
    p.add_argument("--local-dir", default=None, metavar="DIR", help="put the mixture's files in DIR")
    p.add_argument("--no-base-model", action="store_true", help="do not download the base model")
    hub_options(p, offline=False)
