"""The ``xlora-hub`` command: from LoRA experts to a published, tested X-LoRA mixture.

A thin layer over the library: every sub-command parses its arguments, calls one or two library
functions (:mod:`xlora_hub.hub`, :mod:`xlora_hub.convert`, :mod:`xlora_hub.training`,
:mod:`xlora_hub.space`) and prints the result. User errors (a missing file, a bad expert ref, an
unknown repo, a bad JSONL line) exit with status 1 and a one-line message (at most
:data:`MAX_ERROR_CHARS` characters); ``--debug`` prints the traceback instead. Bad usage exits with
status 2, as argparse does.

Tokens are taken from ``--token`` (stripped of surrounding whitespace, as ``huggingface_hub`` does for
``HF_TOKEN``), else ``HF_TOKEN`` or the ``huggingface_hub`` login (``token=None`` is passed through), and
are never printed: every error line, warning and traceback goes through :func:`xlora_hub.redact.redact`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROG = "xlora-hub"
EXIT_OK, EXIT_USER_ERROR, EXIT_USAGE = 0, 1, 2
BENCH_SCRIPT = Path("benchmarks") / "bench_generation.py"

# Files of a base model repo that loading it (and its tokenizer) needs; never pickles.
_ANSI_BACKGROUNDS = (41, 42, 43, 44, 45, 46, 101, 102, 103, 104, 105, 106)


# ---------------------------------------------------------------------------------------------- errors
def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input is wrong" (exit 1, one line) rather than "xlora-hub has a bug"."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .errors import XLoraHubError
    from .hub import transport_errors

    return (
        XLoraHubError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
        EntryNotFoundError,
        LocalEntryNotFoundError,
        HFValidationError,
        OSError,  # FileNotFoundError, NotADirectoryError, ConnectionError, transformers' "can't load" errors
        ValueError,
        ImportError,  # an optional extra (gradio for `demo`) is not installed; see `is_user_error`
        *transport_errors(),
    )


OPTIONAL_PACKAGES = frozenset({"gradio", "matplotlib", "datasets", "accelerate"})


def is_user_error(err: BaseException) -> bool:
    """An ImportError is the user's only when an optional extra is missing; a broken import is a bug."""
    if isinstance(err, ImportError):
        return (getattr(err, "name", None) or "").split(".")[0] in OPTIONAL_PACKAGES
    return True


MAX_ERROR_CHARS = 2000
"""The longest one-line error the CLI prints; a longer one is cut (``--debug`` shows it whole)."""


def one_line(err: BaseException, *, secrets: Sequence[str | None] = ()) -> str:
    """The error as one line, with a hint for the Hub's own errors, every secret redacted, at most
    :data:`MAX_ERROR_CHARS` characters."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .hub import hub_connection_error, hub_endpoint, transport_errors
    from .redact import redact

    if isinstance(err, transport_errors()):  # a connection nothing in the library wrapped: name the endpoint
        err = hub_connection_error(err, token=next((s for s in secrets if s), None))
    lines = [line.strip() for line in redact(str(err), secrets).splitlines() if line.strip()]
    text = " ".join(" ".join(lines).split()) or type(err).__name__
    if isinstance(err, GatedRepoError):
        text = f"{_hub_reason(lines)} The repo is gated: accept its conditions on the Hub and pass --token."
    elif isinstance(err, RepositoryNotFoundError):
        repo = _repo_in_url(text)
        text = (
            (f"Hub repo {repo!r} was not found" if repo else _hub_reason(lines).rstrip("."))
            + " (or it is private and the token cannot read it). Check the repo id; for a private repo pass "
            "--token, set HF_TOKEN or run `hf auth login`."
        )
    elif isinstance(err, RevisionNotFoundError):
        text = f"{_hub_reason(lines)} Give an existing branch, tag or commit with --revision."
    elif isinstance(err, LocalEntryNotFoundError):
        text = (
            f"A file is not in the local cache and the Hub ({hub_endpoint()}) cannot be used (--offline, "
            "HF_HUB_OFFLINE=1 or no connection: check the network and HF_ENDPOINT). Run "
            f"`{PROG} pull MIXTURE` while online first."
        )
    elif isinstance(err, HFValidationError):
        text = f"{text} Give a Hub repo id ('owner/name') or an existing local folder ('./path')."
    elif isinstance(err, ImportError):
        extra = "demo" if err.name in ("gradio", "matplotlib") else "train"
        text = f"{text}. This command needs an optional dependency: pip install 'xlora-hub[{extra}]'."
    return _capped(redact(text, secrets))


def _capped(text: str) -> str:
    """``text`` cut to :data:`MAX_ERROR_CHARS`, saying so (a config value can be megabytes long)."""
    if len(text) <= MAX_ERROR_CHARS:
        return text
    return (
        text[:MAX_ERROR_CHARS].rstrip()
        + f"... [message cut: {len(text):,d} characters; run with --debug to see all of it]"
    )


def _repo_in_url(text: str) -> str | None:
    """The ``owner/name`` of the Hub URL an HTTP error names, if any."""
    match = re.search(r"https?://[^\s/]+/(?:api/(?:models|datasets|spaces)/)?([\w.\-]+/[\w.\-]+)/", text)
    return match.group(1) if match else None


def _hub_reason(lines: list[str]) -> str:
    """The informative line of a Hub HTTP error (the one naming the repo or revision), else all of it."""
    for line in lines:
        if re.search(r"not found|does not exist|invalid|gated|restricted", line, re.I) and "Request ID" not in line:
            return line.rstrip(".") + "."
    return " ".join(lines)


class UsageError(Exception):
    """Arguments that parse but do not make sense together (exit 2, like argparse's own errors)."""


# ---------------------------------------------------------------------------------------------- parsing
_NAMED_REF = re.compile(r"^[A-Za-z_]\w*=.")


def parse_named_ref(value: str) -> tuple[str, str]:
    """``NAME=REF`` of ``--name`` (the name must be a Python identifier)."""
    from .errors import InvalidConfigError

    name, sep, ref = value.partition("=")
    name, ref = name.strip(), ref.strip()
    if not sep or not name or not ref:
        raise InvalidConfigError(f"Expected NAME=REF (for example 'math=my-org/lora-math@v1'), got {value!r}.")
    if not name.isidentifier():
        raise InvalidConfigError(
            f"{value!r}: expert name {name!r} is not a valid identifier; use letters, digits and '_'."
        )
    return name, ref


def default_expert_name(ref: Any) -> str:
    """A name for an expert from where it lives: its subfolder, else the repo name or folder name."""
    if ref.subfolder:
        source = ref.subfolder.rstrip("/").rsplit("/", 1)[-1]
    elif ref.is_hub:
        source = ref.repo_id.rsplit("/", 1)[-1]
    else:
        source = Path(os.path.expanduser(ref.path)).resolve().name
    name = re.sub(r"\W+", "_", source).strip("_").lower()
    if not name:
        return "expert"
    return name if name[0].isalpha() or name[0] == "_" else f"expert_{name}"


def expert_refs(positional: Sequence[str], named: Sequence[str]) -> dict[str, Any]:
    """Ordered ``{name: ExpertRef}``: the ``EXPERT`` arguments in order (``NAME=REF`` or a bare ref), then the
    ``--name NAME=REF`` ones. Bare refs get a name derived from their repo, subfolder or folder, made unique."""
    from .config import ExpertRef
    from .errors import InvalidConfigError

    entries: list[tuple[str | None, str]] = []
    for text in positional:
        named_here = _NAMED_REF.match(text)
        if named_here and not Path(text).expanduser().exists():
            entries.append(parse_named_ref(text))
        else:
            entries.append((None, text))
    entries += [parse_named_ref(value) for value in named]
    taken: set[str] = set()
    for name, _ in entries:
        if name in taken:
            raise InvalidConfigError(f"The expert name {name!r} is given twice; every expert needs its own name.")
        if name:
            taken.add(name)
    refs: dict[str, Any] = {}
    for name, text in entries:
        ref = ExpertRef.parse(text)
        if name is None:
            base = default_expert_name(ref)
            name, index = base, 2
            while name in taken:
                name, index = f"{base}_{index}", index + 1
            taken.add(name)
        refs[name] = ref
    if not refs:
        raise InvalidConfigError("Give at least one expert: a Hub repo id, a local folder, or NAME=REF.")
    return refs


def _looks_like_path(value: str) -> bool:
    return value.startswith(("./", "../", "/", "~", ".\\")) or value in (".", "..") or os.path.isabs(value)


def _is_local(value: str) -> bool:
    return Path(value).expanduser().exists() or _looks_like_path(value)


def _scaling_pass_value(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _torch_dtype(name: str | None):
    if name in (None, "auto"):
        return None
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


# ---------------------------------------------------------------------------------------------- shared helpers
def _hub_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``token`` / ``cache_dir`` / ``local_files_only`` as the library functions take them."""
    return dict(
        token=args.token, cache_dir=getattr(args, "cache_dir", None), local_files_only=getattr(args, "offline", False)
    )


def load_model(args: argparse.Namespace, mixture: str):
    """The mixture named on the command line, loaded with the command's Hub, dtype and device options."""
    from .hub import load_mixture

    return load_mixture(
        mixture,
        revision=getattr(args, "revision", None),
        torch_dtype=_torch_dtype(getattr(args, "dtype", None)),
        device=getattr(args, "device", None),
        **_hub_kwargs(args),
    )


def load_tokenizer(model: Any, args: argparse.Namespace):
    """The tokenizer of the mixture's base model (or ``--tokenizer``), with the same Hub options."""
    from transformers import AutoTokenizer

    from .errors import InvalidMixtureError

    override = getattr(args, "tokenizer", None)
    base = model.xlora_config.base_model
    if override:
        name, revision = override, None
    elif base is not None:
        name, revision = base.repo_id, (None if _is_local(base.repo_id) else base.revision)
    else:
        raise InvalidMixtureError("The mixture names no base model to take the tokenizer from; pass --tokenizer.")
    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, **_hub_kwargs(args))
    except (OSError, ValueError) as err:
        from .redact import redact

        why = redact(" ".join(str(err).split()), [args.token])[:160]  # redacted before it is cut
        raise InvalidMixtureError(
            f"No tokenizer could be loaded from {name!r} ({why}). Pass --tokenizer "
            "with a Hub repo id or folder that has one."
        ) from err


def _print(*lines: str) -> None:
    for line in lines:
        print(line)


# ---------------------------------------------------------------------------------------------- create
def cmd_create(args: argparse.Namespace) -> int:
    from .config import BaseModelRef, XLoraConfig
    from .errors import InvalidConfigError
    from .hub import load_base_model
    from .model import XLoraModel

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
    if _is_local(args.base):
        folder = Path(args.base).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"Base model folder {args.base!r} does not exist.")
        if args.revision is not None:
            raise InvalidConfigError(f"--revision applies to Hub base models; {args.base!r} is a local folder.")
        base_ref = BaseModelRef(repo_id=str(folder.resolve()))
    else:
        base_ref = BaseModelRef(repo_id=args.base, revision=args.revision)
    config = XLoraConfig(experts=experts, **settings)  # every setting is checked before anything is downloaded
    base = load_base_model(base_ref, **_hub_kwargs(args))
    if base_ref.revision is None and not _is_local(base_ref.repo_id):
        commit = getattr(base.config, "_commit_hash", None)
        base_ref = BaseModelRef(repo_id=base_ref.repo_id, revision=commit) if commit else base_ref
    model = XLoraModel.from_experts(base, config.replace(base_model=base_ref), **_hub_kwargs(args))
    path = model.save_pretrained(output, bundle_experts=args.bundle_experts)
    _print(
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


# ---------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from .data import load_examples
    from .errors import InvalidConfigError
    from .staging import check_overwrite
    from .training import train_classifier

    output = args.output or args.mixture
    if args.output is None and not _is_local(args.mixture):
        raise InvalidConfigError(f"{args.mixture!r} is a Hub repo: pass -o/--output, the folder to save to.")
    in_place = args.output is None or (
        _is_local(args.mixture)
        and Path(args.output).expanduser().resolve() == Path(args.mixture).expanduser().resolve()
    )
    check_overwrite(output, overwrite=args.overwrite or in_place, replaces="the mixture in it")  # before training
    load_examples(args.data)  # a bad data file fails before any model is loaded
    if args.eval_data:
        load_examples(args.eval_data)
    model = load_model(args, args.mixture)
    tokenizer = load_tokenizer(model, args)
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
    _print(*lines)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    from .hub import inspect_mixture

    summary = inspect_mixture(args.mixture, revision=args.revision, **_hub_kwargs(args))
    if args.json:
        print(json.dumps(dataclasses.asdict(summary), indent=2))
    else:
        print(summary)
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- generate
@dataclass
class RoutedToken:
    """One token of a generation and the expert that weighed most on it (``None``: never fed back)."""

    text: str
    expert: str | None
    weights: list[float] | None = None
    generated: bool = False


@dataclass
class Generation:
    """The generated text (prompt excluded) and, with ``show_routing``, every token of the sequence."""

    text: str
    tokens: list[RoutedToken] = field(default_factory=list)


def generate_text(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int,
    show_routing: bool = False,
    layer: int | None = None,
    generate_kwargs: dict[str, Any] | None = None,
) -> Generation:
    """Generate from ``prompt`` with ``model.generate``; with ``show_routing``, each token's dominant expert."""
    import torch

    from .space import dominant_experts, layer_view, routing_from_log

    encoded = tokenizer(prompt, return_tensors="pt").to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, **(generate_kwargs or {}))
    if show_routing:
        model.clear_scalings_log()
        model.enable_scalings_logging()
    try:
        with torch.no_grad():
            output = model.generate(**encoded, **kwargs)
    finally:
        if show_routing:
            model.disable_scalings_logging()
    prompt_len = encoded["input_ids"].shape[1]
    ids = output[0].tolist()
    result = Generation(text=tokenizer.decode(ids[prompt_len:], skip_special_tokens=True))
    if show_routing:
        routing = routing_from_log(model.get_scalings_log())  # [tokens - 1, n_layers, n_experts]
        model.clear_scalings_log()
        weights = layer_view(routing, layer)
        dominant = dominant_experts(weights)
        names = model.expert_names
        for position, token_id in enumerate(ids):
            routed = position < len(dominant)
            result.tokens.append(
                RoutedToken(
                    text=tokenizer.decode([token_id]),
                    expert=names[dominant[position]] if routed else None,
                    weights=[round(float(w), 6) for w in weights[position]] if routed else None,
                    generated=position >= prompt_len,
                )
            )
    return result


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
    model = load_model(args, args.mixture)
    tokenizer = load_tokenizer(model, args)
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


# ---------------------------------------------------------------------------------------------- push
def cmd_push(args: argparse.Namespace) -> int:
    from .errors import InvalidMixtureError
    from .hub import push_mixture

    if not Path(args.mixture).expanduser().is_dir():
        raise InvalidMixtureError(f"`push` takes a local mixture folder; {args.mixture!r} is not a folder.")
    model = load_model(args, args.mixture)
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
    )
    url = getattr(info, "pr_url", None) or getattr(info, "commit_url", None)
    _print(f"Pushed {args.mixture} to {args.repo_id}" + (f" ({url})" if url else ""))
    oid = getattr(info, "oid", None)
    if oid:
        _print(f"commit {oid}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- pull
def cmd_pull(args: argparse.Namespace) -> int:
    from .hub import download_mixture

    result = download_mixture(
        args.mixture,
        revision=args.revision,
        token=args.token,
        cache_dir=args.cache_dir,
        local_dir=args.local_dir,
        include_base_model=not args.no_base_model,
    )
    _print(
        f"Pulled {result.mixture}" + (f" @ {result.commit}" if result.commit else "") + f" into {result.folder}",
        *(f"  expert {name}: {where}" for name, where in result.experts.items()),
    )
    if result.base_model:
        _print(f"  base model: {result.base_model}")
    target = args.local_dir or args.mixture
    _print(f"It now loads without network: {PROG} generate {target} 'prompt' --offline")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    from .config import BaseModelRef
    from .convert import detect_format, export_mistralrs, export_peft, import_mixture
    from .errors import InvalidConfigError
    from .hub import load_base_model
    from .staging import check_overwrite

    adapters = None
    if args.adapter:
        adapters = dict(parse_named_ref(value) for value in args.adapter)
    if args.base_model_id and args.to != "mistralrs":
        raise UsageError("--base-model-id only applies with --to mistralrs.")
    if args.bundle_experts and args.to != "xlora-hub":
        raise UsageError("--bundle-experts only applies with --to xlora-hub (the other formats always bundle).")
    check_overwrite(  # before anything is downloaded or converted
        args.dest, overwrite=args.overwrite, replaces="the mixture in it" if args.to == "xlora-hub" else "it"
    )
    source_format = detect_format(args.source) if Path(args.source).expanduser().is_dir() else None
    base = None
    if args.base_model:
        if _is_local(args.base_model) and not Path(args.base_model).expanduser().is_dir():
            raise InvalidConfigError(f"Base model folder {args.base_model!r} does not exist.")
        base = load_base_model(BaseModelRef(repo_id=args.base_model), **_hub_kwargs(args))
    model = import_mixture(
        args.source,
        base_model=base,
        adapters=adapters,
        revision=args.revision,
        torch_dtype=_torch_dtype(args.dtype),
        **_hub_kwargs(args),
    )
    if args.to == "xlora-hub":
        path = model.save_pretrained(args.dest, bundle_experts=args.bundle_experts, overwrite=args.overwrite)
    elif args.to == "peft":
        path = export_peft(model, args.dest, overwrite=args.overwrite)
    else:
        path = export_mistralrs(model, args.dest, base_model_id=args.base_model_id, overwrite=args.overwrite)
    _print(f"Converted {args.source}" + (f" ({source_format})" if source_format else "") + f" to {args.to}: {path}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- demo / space / bench
def cmd_demo(args: argparse.Namespace) -> int:
    from .space import launch_demo

    launch_demo(
        args.mixture, port=args.port, share=args.share, revision=args.revision, token=args.token, server_name=args.host
    )
    return EXIT_OK


def cmd_space_push(args: argparse.Namespace) -> int:
    from .space import push_space

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
        _print(f"Wrote the Space for {args.mixture} to {where} (nothing pushed)")
    else:
        _print(f"Published the Space for {args.mixture}: {where}")
    return EXIT_OK


def bench_script() -> Path | None:
    """``benchmarks/bench_generation.py`` of a source checkout (next to the package), if present."""
    script = Path(__file__).resolve().parent.parent / BENCH_SCRIPT
    return script if script.is_file() else None


def cmd_bench(args: argparse.Namespace) -> int:
    script = bench_script()
    if script is None:
        raise FileNotFoundError(
            f"The benchmark ({BENCH_SCRIPT}) is not installed with the package; run `{PROG} bench` from a source "
            "checkout of xlora-hub (git clone, then pip install -e .)."
        )
    return subprocess.call([sys.executable, str(script), *args.bench_args])


# ---------------------------------------------------------------------------------------------- parser
class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _common_parent() -> argparse.ArgumentParser:
    """``-q`` and ``--debug``, accepted before or after the sub-command (SUPPRESS keeps the earlier value)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("output")
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    group.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    return parent


def _hub_options(
    parser: argparse.ArgumentParser,
    *,
    revision: str | None = "revision of the mixture (branch, tag or commit)",
    offline: bool = True,
    cache: bool = True,
) -> None:
    group = parser.add_argument_group("Hub")
    group.add_argument(
        "--token", default=None, help="Hub token (default: HF_TOKEN or the `hf auth login` token); never printed"
    )
    if revision:
        group.add_argument("--revision", default=None, help=revision)
    if cache:
        group.add_argument("--cache-dir", default=None, help="Hub cache folder (default: HF_HUB_CACHE)")
    if offline:
        group.add_argument("--offline", action="store_true", help="use only files already in the cache")


def _model_options(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="weights dtype"
    )
    if device:
        group.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps... (default: cpu)")
    group.add_argument("--tokenizer", default=None, help="tokenizer repo id or folder (default: the base model's)")


def _add_create(add: Callable[..., argparse.ArgumentParser], sub: Any, common: argparse.ArgumentParser) -> None:
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
    _hub_options(p, revision="revision of the base model (Hub repo only)")


def _add_train(add: Callable[..., argparse.ArgumentParser], sub: Any, common: argparse.ArgumentParser) -> None:
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
    _model_options(p)
    _hub_options(p)


def _add_info(add: Callable[..., argparse.ArgumentParser], sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(
        "info",
        "show a mixture's experts, pinned revisions, sizes and settings (no weights loaded)",
        [f"{PROG} info my-org/my-mixture", f"{PROG} info ./mix --json"],
    )
    p.set_defaults(func=cmd_info)
    p.add_argument("mixture", metavar="MIXTURE", help="Hub repo id or mixture folder")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _hub_options(p)


def _add_generate(add: Callable[..., argparse.ArgumentParser], sub: Any, common: argparse.ArgumentParser) -> None:
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
    _model_options(p)
    _hub_options(p)


def _add_push(add: Callable[..., argparse.ArgumentParser], sub: Any, common: argparse.ArgumentParser) -> None:
    p = add(
        "push",
        "push a mixture folder to the Hub, every expert pinned to a commit",
        [
            f"{PROG} push ./mix my-org/my-mixture --private",
            f"{PROG} push ./mix my-org/my-mixture --push-local-experts --create-pr",
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
    _hub_options(p, revision=None, offline=False)


def _add_pull(add: Callable[..., argparse.ArgumentParser], sub: Any, common: argparse.ArgumentParser) -> None:
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
    _hub_options(p, offline=False)


def _add_convert(add: Callable[..., argparse.ArgumentParser], sub: Any, common: argparse.ArgumentParser) -> None:
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
    p.add_argument("--bundle-experts", action="store_true", help="(xlora-hub) copy Hub experts into DEST")
    p.add_argument("--overwrite", action="store_true", help="replace what DEST already holds")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    _hub_options(p, revision="revision of SRC (Hub repo only)")


def _add_demo(add: Callable[..., argparse.ArgumentParser], sub: Any, common: argparse.ArgumentParser) -> None:
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
    _hub_options(p, cache=False, offline=False)


def _add_space(add: Callable[..., argparse.ArgumentParser], sub: Any, common: argparse.ArgumentParser) -> None:
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
        epilog=_examples(
            f"{PROG} space push my-org/my-mixture my-org/my-mixture-demo --hardware t4-small",
            f"{PROG} space push my-org/my-mixture my-org/demo --dry-run ./space",
        ),
        formatter_class=_Formatter,
        parents=[common],
    )
    sp.set_defaults(func=cmd_space_push)
    sp.add_argument("mixture", metavar="MIXTURE_REPO", help="the mixture's Hub repo id")
    sp.add_argument("space_repo", metavar="SPACE_REPO", help="the Space repo id, 'owner/name'")
    sp.add_argument("--private", action="store_true", default=None)
    sp.add_argument("--hardware", default=None, help="Space hardware, e.g. cpu-basic, t4-small")
    sp.add_argument("--dry-run", default=None, metavar="DIR", help="write the Space folder to DIR, push nothing")
    sp.add_argument("--overwrite", action="store_true", help="(--dry-run) replace what DIR already holds")
    _hub_options(sp, revision="revision of the mixture to pin", cache=False, offline=False)


def _add_bench(add: Callable[..., argparse.ArgumentParser], sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bench",
        help="run the generation benchmark (source checkout only)",
        description=f"Run {BENCH_SCRIPT.as_posix()} with this Python: xlora-hub against peft's X-LoRA and the "
        "base model. Every argument after `bench` is passed to the benchmark; `--` first to pass --help.",
        epilog=_examples(
            f"{PROG} bench --quick", f"{PROG} bench --device cuda --dtype bfloat16", f"{PROG} bench -- --help"
        ),
        formatter_class=_Formatter,
    )
    p.set_defaults(func=cmd_bench, bench_args=[])


def build_parser() -> argparse.ArgumentParser:
    """The parser of every sub-command (each defined by one ``_add_<command>`` function)."""
    from . import __version__

    common = _common_parent()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="X-LoRA mixtures of LoRA experts on the Hugging Face Hub: create, train, inspect, generate, "
        "push, pull, convert, demo.",
        epilog=_examples(
            f"{PROG} create my-org/base my-org/lora-math my-org/lora-code -o ./mix",
            f"{PROG} train ./mix --data train.jsonl --epochs 2",
            f"{PROG} push ./mix my-org/my-mixture",
            f"{PROG} generate my-org/my-mixture 'What is 2+3?' --show-routing",
            f"Run `{PROG} COMMAND --help` for the options of each command.",
        ),
        formatter_class=_Formatter,
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, examples: Sequence[str], description: str | None = None, **kwargs: Any):
        return sub.add_parser(
            name,
            help=help,
            description=description or help[0].upper() + help[1:] + ".",
            epilog=_examples(*examples),
            formatter_class=_Formatter,
            parents=[common],
            **kwargs,
        )

    _add_create(add, sub, common)
    _add_train(add, sub, common)
    _add_info(add, sub, common)
    _add_generate(add, sub, common)
    _add_push(add, sub, common)
    _add_pull(add, sub, common)
    _add_convert(add, sub, common)
    _add_demo(add, sub, common)
    _add_space(add, sub, common)
    _add_bench(add, sub, common)
    return parser


# ---------------------------------------------------------------------------------------------- main
def _split_bench(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``(own args, benchmark args)``: everything after ``bench`` goes to the benchmark untouched."""
    for index, arg in enumerate(argv):
        if not arg.startswith("-"):
            if arg != "bench":
                return argv, None
            rest = argv[index + 1 :]
            if rest[:1] == ["--"]:
                return argv[: index + 1], rest[1:]
            if any(a in ("-h", "--help") for a in rest):
                return argv[: index + 1] + ["--help"], None
            return argv[: index + 1], rest
    return argv, None


class _RedactingFilter(logging.Filter):
    """Redacts the secrets out of every log record a handler prints (message and traceback)."""

    def __init__(self, secrets: Sequence[str | None]) -> None:
        super().__init__()
        self.secrets = list(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        from .redact import redact

        record.msg, record.args = redact(record.getMessage(), self.secrets), None
        if record.exc_info:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)), self.secrets).rstrip()
            record.exc_info = None
        return True


def _redacting_showwarning(secrets: Sequence[str | None]) -> Callable[..., None]:
    """``warnings.showwarning`` with the secrets redacted from the printed warning."""
    from .redact import redact

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        (file or sys.stderr).write(redact(text, secrets))

    return show


@contextlib.contextmanager
def output_settings(*, quiet: bool, debug: bool, secrets: Sequence[str | None] = ()) -> Iterator[None]:
    """For one command: progress bars off with ``-q``, xlora-hub's log records as ``xlora-hub: warning: ...``
    lines, transformers' chatter and third-party deprecation warnings hidden unless ``--debug``, and the
    ``secrets`` redacted from every warning and log line (ours, huggingface_hub's, transformers', the root
    logger's). Everything is restored afterwards, so calling :func:`main` in-process changes nothing global."""
    import transformers
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    tf_logging = transformers.utils.logging
    package_logger = logging.getLogger("xlora_hub")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    redacting = _RedactingFilter(secrets)
    handlers = {handler}
    for name in (None, "huggingface_hub", "transformers"):
        handlers.update(logging.getLogger(name).handlers)
    for each in handlers:
        each.addFilter(redacting)
    saved = (
        package_logger.level,
        package_logger.propagate,
        tf_logging.get_verbosity(),
        are_progress_bars_disabled(),
        tf_logging.is_progress_bar_enabled(),
    )
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.DEBUG if debug else (logging.ERROR if quiet else logging.WARNING))
    package_logger.propagate = False
    tf_logging.set_verbosity(tf_logging.INFO if debug else tf_logging.ERROR)
    if quiet:
        disable_progress_bars()
        tf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _redacting_showwarning(secrets)
            if not debug:
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for each in handlers:
            each.removeFilter(redacting)
        package_logger.removeHandler(handler)
        package_logger.setLevel(saved[0])
        package_logger.propagate = saved[1]
        tf_logging.set_verbosity(saved[2])
        if quiet and not saved[3]:
            enable_progress_bars()
        if quiet and saved[4]:
            tf_logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``xlora-hub`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, bench_args = _split_bench(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, bad usage
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    if bench_args is not None:
        args.bench_args = bench_args
    args.quiet = getattr(args, "quiet", False)
    args.debug = getattr(args, "debug", False)
    raw_token = getattr(args, "token", None)
    if isinstance(raw_token, str):  # as huggingface_hub does for HF_TOKEN and its token file
        args.token = raw_token.strip() or None
    secrets = [s for s in (raw_token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")) if s]
    try:
        with output_settings(quiet=args.quiet, debug=args.debug, secrets=secrets):
            return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except UsageError as err:
        if args.debug:
            _print_traceback(err, secrets)
        else:
            print(f"{PROG} {args.command}: error: {one_line(err, secrets=secrets)}", file=sys.stderr)
        return EXIT_USAGE
    except user_errors() as err:
        if args.debug or not is_user_error(err):
            return _print_traceback(err, secrets)
        print(f"{PROG} {args.command}: error: {one_line(err, secrets=secrets)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as err:  # a bug: the traceback, as Python prints it, but with the secrets redacted
        return _print_traceback(err, secrets)


def _print_traceback(err: BaseException, secrets: Sequence[str | None]) -> int:
    """Print ``err``'s whole traceback (its causes included) with every secret redacted; exit status 1.

    The CLI prints it itself rather than letting Python do it: the HTTP client's exceptions in the chain
    can hold the token (as the repr of a header it refused)."""
    from .redact import redact

    print(redact("".join(traceback.format_exception(err)), secrets).rstrip(), file=sys.stderr)
    return EXIT_USER_ERROR


__all__ = ["build_parser", "expert_refs", "generate_text", "main"]


if __name__ == "__main__":
    sys.exit(main())
