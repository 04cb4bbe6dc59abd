"""``xlora-hub convert``: between xlora-hub, peft X-LoRA and the original xlora / mistral.rs format."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..refs import is_local_argument
from .expert_args import parse_named_ref
from .loading import load_base_model
from .options import EXIT_OK, PROG, AddCommand, UsageError, hub_kwargs, hub_options, print_lines, torch_dtype


def cmd_convert(args: argparse.Namespace) -> int:
    """Check the options and DEST first, import the checkpoint, then save it in the ``--to`` format."""
    from ..config import BaseModelRef
    from ..convert import (
        calibration_tokenizer,
        detect_format,
        export_mistralrs,
        export_peft,
        export_xlora,
        flatten_to_lora,
        import_mixture,
        parse_weights,
    )
    from ..data import load_examples
    from ..errors import InvalidConfigError
    from ..staging import check_overwrite

    adapters = None
    if args.adapter:
        adapters = dict(parse_named_ref(value) for value in args.adapter)
    if args.base_model_id and args.to not in ("mistralrs", "xlora"):
        raise UsageError("--base-model-id only applies with --to mistralrs or --to xlora.")
    if args.lossy and args.to != "mistralrs":
        raise UsageError("--lossy only applies with --to mistralrs.")
    if args.bundle_experts and args.to != "xlora-hub":
        raise UsageError("--bundle-experts only applies with --to xlora-hub (the other formats always bundle).")
    if (args.calibration or args.weights) and args.to != "lora":
        raise UsageError("--calibration and --weights only apply with --to lora.")
    if args.tokenizer and not args.calibration:
        raise UsageError("--tokenizer only applies with --to lora --calibration DATA.")
    if args.to == "lora" and not (args.calibration or args.weights):
        raise UsageError("--to lora needs --calibration DATA (a .jsonl or .txt file) or --weights NAME=W,...")
    weights = parse_weights(args.weights) if args.weights else None
    if args.calibration:
        load_examples(args.calibration)  # a bad data file fails before any model is loaded
    check_overwrite(  # before anything is downloaded or converted
        args.dest, overwrite=args.overwrite, replaces="the mixture in it" if args.to == "xlora-hub" else "it"
    )
    accept = {"accept_softmax_topk_change": args.accept_softmax_topk_change}
    source_format = detect_format(args.source) if Path(args.source).expanduser().is_dir() else None
    base = None
    if args.base_model:
        if is_local_argument(args.base_model) and not Path(args.base_model).expanduser().is_dir():
            raise InvalidConfigError(f"Base model folder {args.base_model!r} does not exist.")
        base = load_base_model(args, BaseModelRef(repo_id=args.base_model))
    model = import_mixture(
        args.source,
        base_model=base,
        adapters=adapters,
        revision=args.revision,
        torch_dtype=torch_dtype(args.dtype),
        **accept,
        **hub_kwargs(args),
    )
    if args.to == "xlora-hub":
        path = model.save_pretrained(args.dest, bundle_experts=args.bundle_experts, overwrite=args.overwrite)
    elif args.to == "peft":
        path = export_peft(model, args.dest, overwrite=args.overwrite)
    elif args.to == "xlora":
        path = export_xlora(model, args.dest, base_model_id=args.base_model_id, overwrite=args.overwrite, **accept)
    elif args.to == "lora":
        tokenizer = None
        if args.calibration:
            tokenizer = calibration_tokenizer(
                args.source,
                tokenizer=args.tokenizer,
                base_model=args.base_model,
                revision=args.revision,
                **hub_kwargs(args),
            )
        path = flatten_to_lora(
            model,
            args.dest,
            calibration=args.calibration,
            weights=weights,
            tokenizer=tokenizer,
            overwrite=args.overwrite,
        )
    else:
        path = export_mistralrs(
            model, args.dest, base_model_id=args.base_model_id, lossy=args.lossy, overwrite=args.overwrite
        )
    print_lines(
        f"Converted {args.source}" + (f" ({source_format})" if source_format else "") + f" to {args.to}: {path}"
    )
    return EXIT_OK


def add_command(add: AddCommand, sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(
        "convert",
        "convert between xlora-hub, peft X-LoRA and the original xlora / mistral.rs format",
        [
            f"{PROG} convert ./peft-xlora ./mix --to xlora-hub",
            f"{PROG} convert ./mix ./peft-xlora --to peft",
            f"{PROG} convert lamm-mit/x-lora ./mix --to xlora-hub --base-model HuggingFaceH4/zephyr-7b-beta",
            f"{PROG} convert ./mix ./flat-lora --to lora --calibration prompts.jsonl",
        ],
        description="Convert an X-LoRA checkpoint (folder or Hub repo; its format is detected from the files) "
        "to another format.",
    )
    p.set_defaults(func=cmd_convert)
    p.add_argument("source", metavar="SRC", help="checkpoint folder or Hub repo id")
    p.add_argument("dest", metavar="DEST", help="output folder")
    p.add_argument(
        "--to", required=True, choices=["xlora-hub", "peft", "mistralrs", "xlora", "lora"], help="output format"
    )
    p.add_argument("--base-model", default=None, help="base model repo id or folder (default: the one recorded)")
    p.add_argument("--adapter", action="append", metavar="NAME=REF", help="where an expert is now (repeatable)")
    p.add_argument("--base-model-id", default=None, help="(mistralrs, xlora) base model id written in the files")
    p.add_argument(
        "--accept-softmax-topk-change",
        action="store_true",
        help="accept enable_softmax_topk computed per token, not batch-wide as in the original xlora package",
    )
    p.add_argument("--lossy", action="store_true", help="(mistralrs) leave out LoRA mistral.rs cannot run")
    p.add_argument("--bundle-experts", action="store_true", help="(xlora-hub) copy Hub experts into DEST")
    p.add_argument("--calibration", metavar="DATA", help="(lora) .jsonl/.txt data the routing is averaged over")
    p.add_argument("--weights", metavar="NAME=W,...", help="(lora) fixed expert weights instead of calibration")
    p.add_argument(
        "--tokenizer", default=None, help="(lora) tokenizer for --calibration (default: SRC's, then --base-model's)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace what DEST already holds")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    hub_options(p, revision="revision of SRC (Hub repo only)")
