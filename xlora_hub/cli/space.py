"""``xlora-hub space push``: publish a mixture's demo as a Hugging Face Space, pinned to the mixture's commit."""

from __future__ import annotations

import argparse
from typing import Any

from .options import EXIT_OK, PROG, AddCommand, HelpFormatter, UsageError, examples, hub_options, print_lines


def cmd_space_push(args: argparse.Namespace) -> int:
    """Publish the Space (or write it to ``--dry-run DIR``) and print where."""
    from ..space import push_space

    if args.overwrite and not args.dry_run:
        raise UsageError("--overwrite only applies with --dry-run DIR (a pushed Space keeps the files others added).")
    where = push_space(
        args.mixture,
        args.space_repo,
        private=args.private,
        hardware=args.hardware,
        token=args.token,
        revision=args.revision,
        dry_run_dir=args.dry_run,
        overwrite=args.overwrite,
    )
    if args.dry_run:
        print_lines(f"Wrote the Space for {args.mixture} to {where} (nothing pushed)")
    else:
        print_lines(f"Published the Space for {args.mixture}: {where}")
    return EXIT_OK


def add_command(add: AddCommand, sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(
        "space",
        "publish a mixture's demo as a Hugging Face Space",
        [f"{PROG} space push my-org/my-mixture my-org/my-mixture-demo"],
    )
    space_sub = p.add_subparsers(dest="space_command", metavar="SPACE_COMMAND", required=True)
    sp = space_sub.add_parser(
        "push",
        help="create or update a Gradio Space serving a Hub mixture, pinned to its current commit",
        description="Create or update a Gradio Space serving a Hub mixture, pinned to the commit --revision "
        "resolves to now.",
        epilog=examples(
            f"{PROG} space push my-org/my-mixture my-org/my-mixture-demo --hardware t4-small",
            f"{PROG} space push my-org/my-mixture my-org/demo --dry-run ./space",
        ),
        formatter_class=HelpFormatter,
        parents=[common],
    )
    sp.set_defaults(func=cmd_space_push)
    sp.add_argument("mixture", metavar="MIXTURE_REPO", help="the mixture's Hub repo id")
    sp.add_argument("space_repo", metavar="SPACE_REPO", help="the Space repo id, 'owner/name'")
    sp.add_argument("--private", action="store_true", default=None)
    sp.add_argument("--hardware", default=None, help="Space hardware, e.g. cpu-basic, t4-small, zero-a10g (ZeroGPU)")
    sp.add_argument("--dry-run", default=None, metavar="DIR", help="write the Space folder to DIR, push nothing")
    sp.add_argument("--overwrite", action="store_true", help="(--dry-run) replace what DIR already holds")
    hub_options(sp, revision="revision of the mixture to pin", cache=False, offline=False)
