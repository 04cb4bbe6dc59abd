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
    from ..convert import detect_format, export_mistralrs, export_peft, import_mixture
    from ..errors import InvalidConfigError
    from ..staging import check_overwrite

    adapters = None
    if args.adapter:
        adapters = dict(parse_named_ref(value) for value in args.adapter)
    if args.base_model_id and args.to != "mistralrs":
        raise UsageError("--base-model-id only applies with --to mistralrs.")
    if args.lossy and args.to != "mistralrs":
        raise UsageError("--lossy only applies with --to mistralrs.")
    if args.bundle_experts and args.to != "xlora-hub":
        raise UsageError("--bundle-experts only applies with --to xlora-hub (the other formats always bundle).")
    check_overwrite(  # before anything is downloaded or converted
        args.dest, overwrite=args.overwrite, replaces="the mixture in it" if args.to == "xlora-hub" else "it"
    )
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
        **hub_kwargs(args),
    )
    if args.to == "xlora-hub":
        path = model.save_pretrained(args.dest, bundle_experts=args.bundle_experts, overwrite=args.overwrite)
    elif args.to == "peft":
        path = export_peft(model, args.dest, overwrite=args.overwrite)
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
        ],
        description="Convert an X-LoRA checkpoint (folder or Hub repo; its format is detected from the files) "
        "to another format.",
    )
    p.set_defaults(func=cmd_convert)
    p.add_argument("source", metavar="SRC", help="checkpoint folder or Hub repo id")
    p.add_argument("dest", metavar="DEST", help="output folder")
    p.add_argument("--to", required=True, choices=["xlora-hub", "peft", "mistralrs"], help="output format")
    p.add_argument("--base-model", default=None, help="base model repo id or folder (default: the one recorded)")
    p.add_argument("--adapter", action="append", metavar="NAME=REF", help="where an expert is now (repeatable)")
    p.add_argument("--base-model-id", default=None, help="(mistralrs) base model id written in the files")
    p.add_argument("--lossy", action="store_true", help="(mistralrs) leave out LoRA mistral.rs cannot run")
    p.add_argument("--bundle-experts", action="store_true", help="(xlora-hub) copy Hub experts into DEST")
    p.add_argument("--overwrite", action="store_true", help="replace what DEST already holds")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    hub_options(p, revision="revision of SRC (Hub repo only)")
