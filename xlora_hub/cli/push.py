"""``xlora-hub push``: push a mixture folder to the Hub in one commit, every expert pinned to a commit."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .loading import load_model, load_tokenizer
from .options import EXIT_OK, PROG, AddCommand, UsageError, hub_options, print_lines


def cmd_push(args: argparse.Namespace) -> int:
    """Push the mixture folder in one commit and print where it went."""
    from ..errors import InvalidMixtureError
    from ..hub import push_mixture

    if args.eval is None and (args.eval_no_plots or args.tokenizer is not None):
        flag = "--eval-no-plots" if args.eval_no_plots else "--tokenizer"
        raise UsageError(f"{flag} only applies with --eval DATA.")
    if not Path(args.mixture).expanduser().is_dir():
        raise InvalidMixtureError(f"`push` takes a local mixture folder; {args.mixture!r} is not a folder.")
    if args.eval is not None and not args.eval_no_plots:
        from ..evidence import require_plots

        require_plots()  # before the model is loaded
    model = load_model(args, args.mixture)
    evidence = _evidence(args, model)
    info = push_mixture(
        model,
        args.repo_id,
        private=args.private,
        token=args.token,
        commit_message=args.commit_message,
        branch=args.branch,
        create_pr=args.create_pr,
        bundle_experts=args.bundle_experts,
        push_local_experts=args.push_local_experts,
        base_model=args.base_model,
        evidence=evidence,
        collection=args.collection,
    )
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None)
    print_lines(f"Pushed {args.mixture} to {args.repo_id}" + (f" ({url})" if url else ""))
    oid = getattr(info, "oid", None)
    if oid:
        print_lines(f"commit {oid}")
    if args.collection is not None:
        print_lines(f"collection {args.collection!r} holds the mixture, its experts, base model and Spaces")
    return EXIT_OK


def _evidence(args: argparse.Namespace, model: Any):
    """The routing evidence measured on ``--eval DATA`` (``None`` without it), printed as one line per expert."""
    if args.eval is None:
        return None
    from ..evidence import compute_evidence

    evidence = compute_evidence(model, args.eval, tokenizer=load_tokenizer(args), plots=not args.eval_no_plots)
    for name, weight, share in zip(evidence.expert_names, evidence.mean_weights, evidence.top1_shares):
        print_lines(f"expert {name}: mean routing weight {weight:.3f}, top-1 on {100 * share:.1f}% of tokens")
    print_lines(f"routing entropy {evidence.entropy:.3f} nats per token over {evidence.n_tokens} tokens")
    return evidence


def add_command(add: AddCommand, sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(
        "push",
        "push a mixture folder to the Hub, every expert pinned to a commit",
        [
            f"{PROG} push ./mix my-org/my-mixture --private",
            f"{PROG} push ./mix my-org/my-mixture --push-local-experts --create-pr",
            f"{PROG} push ./mix my-org/my-mixture --eval eval.jsonl --collection 'My mixtures'",
        ],
        description="Push a mixture folder to a Hub repo in one commit. Hub experts are referenced at a pinned "
        "commit; experts that only exist locally need --bundle-experts (copied into the repo) or "
        "--push-local-experts (each pushed to its own repo).",
    )
    p.set_defaults(func=cmd_push)
    p.add_argument("mixture", metavar="DIR", help="mixture folder")
    p.add_argument("repo_id", metavar="REPO_ID", help="target repo, 'owner/name'")
    p.add_argument("--private", action="store_true", default=None, help="create the repo private")
    p.add_argument("--bundle-experts", action="store_true", help="copy every expert into the mixture repo")
    p.add_argument("--push-local-experts", action="store_true", help="push local experts to <REPO_ID>-<name>")
    p.add_argument("--branch", default=None, help="push to this branch (created if missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--commit-message", default=None)
    p.add_argument(
        "--base-model",
        default=None,
        metavar="REPO_ID",
        help="Hub repo id to record as the base model (a local base folder is never published)",
    )
    evidence = p.add_argument_group("routing evidence and collections")
    evidence.add_argument(
        "--eval",
        default=None,
        metavar="DATA",
        help="JSONL or text data (as `train` reads it): put routing evidence and scores on the card",
    )
    evidence.add_argument("--eval-no-plots", action="store_true", help="with --eval: no pictures (no matplotlib)")
    evidence.add_argument("--tokenizer", default=None, help="tokenizer for --eval (default: the mixture's)")
    evidence.add_argument(
        "--collection", default=None, metavar="TITLE", help="create or update a Hub collection with the mixture"
    )
    hub_options(p, revision=None, offline=False)
