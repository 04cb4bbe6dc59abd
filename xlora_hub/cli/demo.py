"""``xlora-hub demo``: the Gradio demo of a mixture, run locally (default: the embedded demo mixture)."""

from __future__ import annotations

import argparse
from typing import Any

from .options import EXIT_OK, PROG, AddCommand, hub_options


def cmd_demo(args: argparse.Namespace) -> int:
    """Serve the Gradio demo until it is stopped."""
    from ..space import launch_demo

    launch_demo(
        args.mixture, port=args.port, share=args.share, revision=args.revision, token=args.token, server_name=args.host
    )
    return EXIT_OK


def add_command(add: AddCommand, sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(
        "demo",
        "run the Gradio demo locally on a mixture (default: the embedded demo mixture)",
        [f"{PROG} demo", f"{PROG} demo my-org/my-mixture --port 7860", f"{PROG} demo ./mix --share"],
    )
    p.set_defaults(func=cmd_demo)
    p.add_argument("mixture", metavar="MIXTURE", nargs="?", default=None, help="Hub repo id or mixture folder")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link")
    hub_options(p, cache=False, offline=False)
