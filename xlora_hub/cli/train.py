"""``xlora-hub train``: train a mixture's classifier on a JSONL file and save it (in place or to ``-o``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..refs import is_local_argument
from .loading import load_model, load_tokenizer
from .options import EXIT_OK, PROG, AddCommand, hub_options, model_options, print_lines


def cmd_train(args: argparse.Namespace) -> int:
    """Check the output and data first, then train the classifier and save the mixture."""
    from ..data import load_examples
    from ..errors import InvalidConfigError
    from ..staging import check_overwrite
    from ..training import train_classifier

    output = args.output or args.mixture
    if args.output is None and not is_local_argument(args.mixture):
        raise InvalidConfigError(f"{args.mixture!r} is a Hub repo: pass -o/--output, the folder to save to.")
    in_place = args.output is None or (
        is_local_argument(args.mixture)
        and Path(args.output).expanduser().resolve() == Path(args.mixture).expanduser().resolve()
    )
    check_overwrite(output, overwrite=args.overwrite or in_place, replaces="the mixture in it")  # before training
    load_examples(args.data)  # a bad data file fails before any model is loaded
    if args.eval_data:
        load_examples(args.eval_data)
    model = load_model(args, args.mixture)
    tokenizer = load_tokenizer(args)
    result = train_classifier(
        model,
        args.data,  # read again by the library, so its errors name the file and line
        tokenizer=tokenizer,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        eval_dataset=args.eval_data,
        eval_every=args.eval_every,
        routing_loss_weight=args.routing_loss_weight,
        label_field=args.label_field,
        text_field=args.text_field,
        prompt_field=args.prompt_field,
        completion_field=args.completion_field,
        progress=not args.quiet,
    )
    path = model.save_pretrained(output, overwrite=args.overwrite or in_place)
    lines = [
        f"Trained {result.steps} steps ({result.epochs} epoch{'s' if result.epochs != 1 else ''}): loss "
        f"{result.train_losses[0]:.4f} -> "
        f"{result.final_train_loss:.4f}"
    ]
    if result.eval_losses:
        lines.append("eval loss: " + ", ".join(f"step {s}: {loss:.4f}" for s, loss in result.eval_losses))
    lines.append(f"Saved the mixture to {path}")
    print_lines(*lines)
    return EXIT_OK


def add_command(add: AddCommand, sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(
        "train",
        "train the mixture's classifier on a JSONL file",
        [
            f"{PROG} train ./mix --data train.jsonl --epochs 3 --lr 1e-3",
            f"{PROG} train my-org/my-mixture --data train.jsonl -o ./mix-trained --routing-loss-weight 0.5",
        ],
        description="Train the gating classifier (and the experts, if the mixture makes them trainable). Each "
        'JSONL line is {"text": ...} or {"prompt": ..., "completion": ...}, optionally with "expert": NAME for '
        "the routing loss. The trained mixture is saved in place, or to -o.",
    )
    p.set_defaults(func=cmd_train)
    p.add_argument("mixture", metavar="MIXTURE", help="mixture folder (or Hub repo id, with -o)")
    p.add_argument("--data", required=True, metavar="FILE", help="training data (.jsonl or .txt)")
    p.add_argument("--eval-data", metavar="FILE", help="evaluation data, scored each epoch")
    p.add_argument("-o", "--output", metavar="DIR", help="where to save the trained mixture (default: in place)")
    p.add_argument("--overwrite", action="store_true", help="replace a mixture (or other files) already in -o DIR")
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, default=1, help="default %(default)s")
    t.add_argument("--lr", type=float, default=1e-3, help="default %(default)s")
    t.add_argument("--batch-size", type=int, default=8, help="default %(default)s")
    t.add_argument("--max-length", type=int, default=512, help="tokens per example (default %(default)s)")
    t.add_argument("--seed", type=int, default=0, help="default %(default)s")
    t.add_argument("--eval-every", type=int, default=None, metavar="STEPS", help="default: every epoch")
    t.add_argument("--routing-loss-weight", type=float, default=0.0, metavar="W", help="default %(default)s")
    t.add_argument("--label-field", default="expert", help="field naming an example's expert (default %(default)s)")
    t.add_argument("--text-field", default="text", help="default %(default)s")
    t.add_argument("--prompt-field", default="prompt", help="default %(default)s")
    t.add_argument("--completion-field", default="completion", help="default %(default)s")
    model_options(p)
    hub_options(p)
