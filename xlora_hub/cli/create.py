"""``xlora-hub create``: a new mixture (untrained classifier) from a base model and LoRA experts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..refs import is_local_argument
from .expert_args import expert_refs
from .loading import load_base_model
from .options import EXIT_OK, PROG, AddCommand, hub_kwargs, hub_options, print_lines


def cmd_create(args: argparse.Namespace) -> int:
    """Check every setting, load the base model, build the mixture from the experts and save it."""
    from ..config import BaseModelRef, XLoraConfig
    from ..errors import InvalidConfigError
    from ..model import XLoraModel

    experts = expert_refs(args.experts, args.name)
    output = Path(args.output).expanduser()
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise InvalidConfigError(
            f"Output {str(output)!r} already exists and is not empty; pass --overwrite to replace the mixture in it."
        )
    settings = {
        key: value
        for key, value in {
            "top_k_lora": args.top_k,
            "enable_softmax": args.softmax,
            "enable_softmax_topk": args.softmax_topk,
            "softmax_temperature": args.softmax_temperature,
            "layerwise_scalings": args.layerwise,
            "xlora_depth": args.depth,
            "xlora_size": args.classifier_size,
            "xlora_dropout_p": args.dropout,
            "use_trainable_adapters": args.trainable_experts,
            "global_scaling_weight": args.global_scaling_weight,
        }.items()
        if value is not None
    }
    if args.scaling_pass_value is not None:
        settings["scaling_pass_value"] = None if args.scaling_pass_value == "auto" else args.scaling_pass_value
    if is_local_argument(args.base):
        folder = Path(args.base).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"Base model folder {args.base!r} does not exist.")
        if args.revision is not None:
            raise InvalidConfigError(f"--revision applies to Hub base models; {args.base!r} is a local folder.")
        base_ref = BaseModelRef(repo_id=str(folder.resolve()))
    else:
        base_ref = BaseModelRef(repo_id=args.base, revision=args.revision)
    config = XLoraConfig(experts=experts, **settings)  # every setting is checked before anything is downloaded
    base = load_base_model(args, base_ref)
    if base_ref.revision is None and not is_local_argument(base_ref.repo_id):
        commit = getattr(base.config, "_commit_hash", None)
        base_ref = BaseModelRef(repo_id=base_ref.repo_id, revision=commit) if commit else base_ref
    model = XLoraModel.from_experts(base, config.replace(base_model=base_ref), **hub_kwargs(args))
    path = model.save_pretrained(output, bundle_experts=args.bundle_experts)
    print_lines(
        f"Created an X-LoRA mixture of {model.n_experts} experts over {model.n_layers} layers in {path} "
        "(untrained classifier):",
        *(f"  {e.name}: {_where(e, path, bundled=args.bundle_experts)}" for e in model.experts),
        f"Next: {PROG} train {path} --data train.jsonl",
    )
    return EXIT_OK


def _where(expert: Any, mixture: Path, *, bundled: bool) -> str:
    if expert.ref.is_hub and not bundled:
        return f"{expert.ref} (commit {expert.commit_sha})" if expert.commit_sha else str(expert.ref)
    return f"{expert.ref} (copied into {mixture / 'experts' / expert.name})"


def _scaling_pass_value(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def add_command(add: AddCommand, sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(
        "create",
        "a new mixture (untrained classifier) from a base model and LoRA experts",
        [
            f"{PROG} create meta-llama/Llama-3.2-1B my-org/lora-math my-org/lora-code@v2 -o ./mix",
            f"{PROG} create ./base ./experts/math --name code=my-org/loras:code -o ./mix --top-k 1 --layerwise",
        ],
        description="Create a new X-LoRA mixture with an untrained classifier. Experts are Hub repos "
        "('owner/name[@revision][:subfolder]') or local peft adapter folders; each is checked against the base "
        "model before anything is saved. Local experts are copied into the mixture; Hub experts are referenced.",
    )
    p.set_defaults(func=cmd_create)
    p.add_argument("base", metavar="BASE", help="base model: Hub repo id or local folder (a transformers model)")
    p.add_argument(
        "experts",
        metavar="EXPERT",
        nargs="*",
        help="owner/name[@revision][:subfolder] or ./folder, optionally as NAME=REF (default name: from the "
        "subfolder, repo or folder name)",
    )
    p.add_argument(
        "--name", metavar="NAME=REF", action="append", default=[], help="a named expert, after the EXPERTs (repeatable)"
    )
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write the mixture to")
    p.add_argument("--overwrite", action="store_true", help="replace a mixture already in DIR")
    p.add_argument("--bundle-experts", action="store_true", help="copy Hub experts into the mixture too")
    x = p.add_argument_group("X-LoRA settings (peft's XLoraConfig fields; defaults as there)")
    x.add_argument("--top-k", type=int, default=None, metavar="K", help="keep the K largest scalings (top_k_lora)")
    x.add_argument("--softmax-topk", action="store_true", default=None, help="softmax over the kept top-k experts")
    x.add_argument(
        "--no-softmax", dest="softmax", action="store_false", default=None, help="no softmax on the classifier output"
    )
    x.add_argument("--softmax-temperature", type=float, default=None, metavar="T", help="lower is sharper (1.0)")
    x.add_argument("--layerwise", action="store_true", default=None, help="one set of scalings per layer")
    x.add_argument("--depth", type=int, default=None, help="classifier depth in linear layers (xlora_depth, 1)")
    x.add_argument("--classifier-size", type=int, default=None, metavar="N", help="classifier width (xlora_size)")
    x.add_argument("--dropout", type=float, default=None, metavar="P", help="classifier dropout (xlora_dropout_p)")
    x.add_argument(
        "--scaling-pass-value",
        type=_scaling_pass_value,
        default=None,
        metavar="V",
        help="expert scaling in the scaling pass (0; 'auto': 1/n)",
    )
    x.add_argument("--global-scaling-weight", type=float, default=None, metavar="W", help="weight of every expert")
    x.add_argument(
        "--trainable-experts", action="store_true", default=None, help="train the experts too (use_trainable_adapters)"
    )
    hub_options(p, revision="revision of the base model (Hub repo only)")
