"""``python -m xlora_hub.convert {detect,import,export}``: the conversions from a shell.

Errors in the input are one line on stderr and exit status 1, as in the ``xlora-hub`` CLI; argparse's usage
errors exit 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from torch import nn

from ..config import BaseModelRef
from ..error_messages import format_error
from ..errors import InvalidConfigError
from ..hub import load_base_model
from ..model import load_mixture
from ..redact import redacted_traceback
from ..staging import check_overwrite
from .common import LoadOptions
from .detect import source_folder
from .flatten import calibration_tokenizer, flatten_to_lora, parse_weights
from .importing import import_mixture
from .mistralrs import export_mistralrs
from .original_export import export_xlora
from .peft_format import export_peft

PROG = "python -m xlora_hub.convert"
_ACCEPT_HELP = "(xlora) accept enable_softmax_topk computed per token, not batch-wide as in the original package"


def _parse_adapters(values: list[str] | None) -> dict[str, str] | None:
    """``--adapter NAME=LOCATION`` values as the ``adapters=`` mapping (``None`` when none was given)."""
    if not values:
        return None
    out = {}
    for value in values:
        name, sep, where = value.partition("=")
        if not sep or not name or not where:
            raise InvalidConfigError(f"--adapter takes NAME=LOCATION (a folder or Hub repo id), got {value!r}.")
        out[name] = where
    return out


def _base(value: str | None, token: str | None) -> nn.Module | None:
    """The ``--base-model`` to load, or ``None`` (then the one the checkpoint names)."""
    return load_base_model(BaseModelRef(repo_id=value), token=token) if value else None


def _parser() -> argparse.ArgumentParser:
    """The command line: ``detect``, ``import`` and ``export``."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Convert X-LoRA checkpoints to and from xlora-hub mixtures."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    detect = sub.add_parser("detect", help="print the format of a checkpoint folder or Hub repo")
    detect.add_argument("source")
    detect.add_argument("--revision")
    imp = sub.add_parser("import", help="import a peft / original xlora / xlora-hub checkpoint and save it")
    imp.add_argument("source", help="checkpoint folder or Hub repo id")
    imp.add_argument("output", help="folder to save the xlora-hub mixture to")
    imp.add_argument("--base-model", help="base model repo id or folder (default: the one the checkpoint names)")
    imp.add_argument("--adapter", action="append", metavar="NAME=LOCATION", help="where an expert is (repeatable)")
    imp.add_argument("--revision")
    imp.add_argument("--token")
    imp.add_argument("--bundle-experts", action="store_true", help="copy Hub experts into the mixture too")
    imp.add_argument("--overwrite", action="store_true", help="replace the mixture OUTPUT already holds")
    imp.add_argument("--accept-softmax-topk-change", action="store_true", help=_ACCEPT_HELP)
    exp = sub.add_parser(
        "export", help="export a mixture to peft's format, a mistral.rs folder, the original xlora's or one plain LoRA"
    )
    exp.add_argument("format", choices=["peft", "mistralrs", "xlora", "lora"])
    exp.add_argument("mixture", help="xlora-hub mixture folder or Hub repo id")
    exp.add_argument("output")
    exp.add_argument("--base-model", help="base model repo id or folder (default: the one the mixture names)")
    exp.add_argument("--base-model-id", help="(mistralrs, xlora) the base model id written in the files")
    exp.add_argument("--accept-softmax-topk-change", action="store_true", help=_ACCEPT_HELP)
    exp.add_argument("--calibration", metavar="DATA", help="(lora) .jsonl/.txt data the routing is averaged over")
    exp.add_argument("--weights", metavar="NAME=W,...", help="(lora) fixed expert weights instead of calibration")
    exp.add_argument(
        "--tokenizer", help="(lora) tokenizer for --calibration (default: the mixture's, then --base-model's)"
    )
    exp.add_argument("--lossy", action="store_true", help="(mistralrs) leave out the LoRA mistral.rs cannot run")
    exp.add_argument("--revision")
    exp.add_argument("--token")
    return parser


_EXPORT_ONLY = (  # (flag, its argparse dest, the formats it applies to)
    ("--base-model-id", "base_model_id", ("mistralrs", "xlora")),
    ("--accept-softmax-topk-change", "accept_softmax_topk_change", ("xlora",)),
    ("--calibration", "calibration", ("lora",)),
    ("--weights", "weights", ("lora",)),
    ("--tokenizer", "tokenizer", ("lora",)),
    ("--lossy", "lossy", ("mistralrs",)),
)


def _check_export_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """An ``export`` flag given with a format it does not apply to is a usage error, never silently ignored."""
    if args.command != "export":
        return
    for flag, dest, formats in _EXPORT_ONLY:
        if getattr(args, dest, None) and args.format not in formats:
            parser.error(f"{flag} only applies to export {' or '.join(formats)}, not {args.format}.")


def _run(args: argparse.Namespace) -> None:
    """Do the command, printing its result (a format, or the folder written)."""
    if args.command == "detect":
        _, fmt = source_folder(args.source, revision=args.revision, options=LoadOptions())
        print(fmt)
    elif args.command == "import":
        check_overwrite(args.output, overwrite=args.overwrite, replaces="the mixture in it")  # before any download
        model = import_mixture(
            args.source,
            base_model=_base(args.base_model, args.token),
            adapters=_parse_adapters(args.adapter),
            revision=args.revision,
            token=args.token,
            accept_softmax_topk_change=args.accept_softmax_topk_change,
        )
        print(model.save_pretrained(args.output, bundle_experts=args.bundle_experts, overwrite=args.overwrite))
    else:
        model = load_mixture(
            args.mixture, base_model=_base(args.base_model, args.token), revision=args.revision, token=args.token
        )
        if args.format == "peft":
            print(export_peft(model, args.output))
        elif args.format == "xlora":
            accept = args.accept_softmax_topk_change
            print(export_xlora(model, args.output, base_model_id=args.base_model_id, accept_softmax_topk_change=accept))
        elif args.format == "lora":
            tokenizer = None
            if args.calibration:
                tokenizer = calibration_tokenizer(
                    args.mixture,
                    tokenizer=args.tokenizer,
                    base_model=args.base_model,
                    revision=args.revision,
                    token=args.token,
                )
            weights = parse_weights(args.weights) if args.weights else None
            print(
                flatten_to_lora(model, args.output, calibration=args.calibration, weights=weights, tokenizer=tokenizer)
            )
        else:
            print(export_mistralrs(model, args.output, base_model_id=args.base_model_id, lossy=args.lossy))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xlora_hub.convert {detect,import,export} ...``: see ``--help``."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_export_flags(parser, args)
    try:
        _run(args)
    except Exception as err:  # the input is wrong: one line; a bug: its traceback, redacted (as `xlora-hub` does)
        token = getattr(args, "token", None)
        line = format_error(err, token=token)
        print(
            redacted_traceback(err, [token]) if line is None else f"{PROG} {args.command}: error: {line}",
            file=sys.stderr,
        )
        return 1
    return 0
