"""``xlora-hub generate``: generate text with a mixture, optionally showing each token's dominant expert."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..routing import RoutedToken, generate_text
from .loading import load_model, load_tokenizer
from .options import EXIT_OK, PROG, AddCommand, UsageError, hub_options, model_options

_ANSI_BACKGROUNDS = (41, 42, 43, 44, 45, 46, 101, 102, 103, 104, 105, 106)


def _token_label(text: str) -> str:
    shown = text.strip()
    return shown if shown else repr(text)


def format_routing(tokens: Sequence[RoutedToken], expert_names: Sequence[str], *, color: bool) -> list[str]:
    """``token[expert]`` for each token (plain), or each token coloured by its expert with a legend (TTY)."""
    if not color:
        parts = [_token_label(t.text) + (f"[{t.expert}]" if t.expert else "") for t in tokens]
        return [" ".join(parts)]
    colors = {name: _ANSI_BACKGROUNDS[i % len(_ANSI_BACKGROUNDS)] for i, name in enumerate(expert_names)}
    parts = [
        f"\033[30;{colors[t.expert]}m{_token_label(t.text)}\033[0m" if t.expert else _token_label(t.text)
        for t in tokens
    ]
    legend = "  ".join(f"\033[30;{colors[name]}m {name} \033[0m" for name in expert_names)
    return [" ".join(parts), f"experts: {legend}"]


def _use_color(choice: str) -> bool:
    if choice == "always":
        return True
    if choice == "never":
        return False
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from the prompt; print the text, then with ``--show-routing`` each token's expert."""
    model = load_model(args, args.mixture)
    tokenizer = load_tokenizer(args)
    gen_kwargs: dict[str, Any] = {"do_sample": args.sample, "routing": args.routing}
    if args.sample:
        import torch

        torch.manual_seed(args.seed)
        gen_kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.layer is not None and not 0 <= args.layer < model.n_layers:
        raise UsageError(f"--layer {args.layer} is out of range: the mixture has {model.n_layers} X-LoRA layers.")
    result = generate_text(
        model,
        tokenizer,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        show_routing=args.show_routing,
        layer=args.layer,
        generate_kwargs=gen_kwargs,
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2, ensure_ascii=False))
        return EXIT_OK
    print(result.text)
    if args.show_routing:
        where = f"layer {args.layer}" if args.layer is not None else f"mean over {model.n_layers} layers"
        print(f"\nrouting (dominant expert of each token, {where}; the last token is never fed back):")
        for line in format_routing(result.tokens, model.expert_names, color=_use_color(args.color)):
            print(line)
    return EXIT_OK


def add_command(add: AddCommand, sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(
        "generate",
        "generate text with a mixture, optionally showing each token's dominant expert",
        [
            f"{PROG} generate my-org/my-mixture 'What is 2+3?' --max-new-tokens 16",
            f"{PROG} generate ./mix 'def fib(n):' --show-routing --layer 0",
        ],
        description="Generate from a prompt with the mixture (greedy unless --sample) and print the generated "
        "text. --show-routing then prints each token with the expert that weighs most on it: coloured on a "
        "terminal, 'token[expert]' otherwise.",
    )
    p.set_defaults(func=cmd_generate)
    p.add_argument("mixture", metavar="MIXTURE", help="Hub repo id or mixture folder")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("--max-new-tokens", type=int, default=32, help="default %(default)s")
    p.add_argument("--show-routing", action="store_true", help="print each token with its dominant expert")
    p.add_argument("--layer", type=int, default=None, help="routing of one X-LoRA layer (default: mean of all)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="colour the routing")
    p.add_argument("--json", action="store_true", help="machine-readable output (text and routing)")
    p.add_argument(
        "--routing",
        choices=["dynamic", "static"],
        default="dynamic",
        help="dynamic: X-LoRA as in the paper; static: route with the prompt's mean scalings (faster)",
    )
    s = p.add_argument_group("sampling")
    s.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    model_options(p)
    hub_options(p)
