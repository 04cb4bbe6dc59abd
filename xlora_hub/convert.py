"""Import and export of other X-LoRA checkpoint formats, so existing mixtures move in and out of xlora-hub.

Formats, detected from the files:

* ``xlora-hub``: ``xlora_config.json`` with a ``format_version`` (loaded by :func:`xlora_hub.hub.load_mixture`).
* ``peft``: peft's ``XLoraModel.save_pretrained`` output, ``adapter_config.json`` with ``peft_type: XLORA`` (the
  experts are the values of its ``adapters``) and the classifier under ``...internal_xlora_classifier.layers.*`` in
  ``adapter_model.safetensors``. The numbered ``0/``, ``1/`` folders peft writes are not usable experts and are
  ignored. peft >= 0.20 writes an empty or partial classifier file: that is detected and reported, never loaded.
* ``xlora``: the original ``xlora`` package / mistral.rs layout (for example ``lamm-mit/x-lora``):
  ``xlora_config.json`` without ``format_version`` (``adapters`` as a list or a dict, ``base_model_id``,
  ``use_bias``, ``enable_relu_and_dropout``...), classifier keys ``inner.*`` / ``last.*`` (often bfloat16), experts
  in ``<name>/`` subfolders.

Export writes peft's format (:func:`export_peft`) or a bundled, mistral.rs-ready folder (:func:`export_mistralrs`).
Run ``python -m xlora_hub.convert --help`` for the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME, BaseModelRef, ExpertRef, XLoraConfig
from .errors import (
    ExpertNotFoundError,
    InvalidConfigError,
    InvalidMixtureError,
    UnsupportedFormatError,
)
from .experts import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, safe_relative_path
from .finite import check_finite_tensors
from .hub import EXPERT_FILES, load_base_model, load_mixture, read_classifier_header, write_expert_files
from .jsonfile import read_json_object
from .staging import prepare_target, replace_folder, staging_folder

if TYPE_CHECKING:
    from .model import XLoraModel

logger = logging.getLogger(__name__)

FORMAT_XLORA_HUB = "xlora-hub"
FORMAT_PEFT = "peft"
FORMAT_ORIGINAL = "xlora"
FORMATS = (FORMAT_XLORA_HUB, FORMAT_PEFT, FORMAT_ORIGINAL)

MISTRALRS_ORDERING_NAME = "ordering.json"
"""The mistral.rs ordering file written by :func:`export_mistralrs` (``order``, ``layers``, ``base_model_id``)."""

PEFT_CLASSIFIER_MARKER = "internal_xlora_classifier."
PEFT_CLASSIFIER_PREFIX = "base_model.internal_xlora_classifier."

# Settings with the same name and meaning in peft's XLoraConfig, the original package and xlora-hub.
_SHARED_SETTINGS = (
    "enable_softmax",
    "enable_softmax_topk",
    "softmax_temperature",
    "layerwise_scalings",
    "top_k_lora",
    "xlora_depth",
    "xlora_size",
    "xlora_dropout_p",
    "use_trainable_adapters",
    "scaling_pass_value",
    "global_scaling_weight",
)


# ---------------------------------------------------------------------------------------------- detection
def detect_format(folder: str | os.PathLike[str]) -> str:
    """The format of a local checkpoint folder: ``"xlora-hub"``, ``"peft"`` or ``"xlora"``."""
    folder = Path(folder)
    config = folder / CONFIG_NAME
    if config.is_file():
        data = _read_json(config, what=str(folder))
        return FORMAT_XLORA_HUB if "format_version" in data else FORMAT_ORIGINAL
    adapter = folder / ADAPTER_CONFIG_NAME
    if adapter.is_file():
        data = _read_json(adapter, what=str(folder))
        peft_type = str(data.get("peft_type", "")).upper()
        if peft_type == "XLORA":
            return FORMAT_PEFT
        raise UnsupportedFormatError(
            f"{folder}: {ADAPTER_CONFIG_NAME} is a {peft_type or 'peft'} adapter, not an X-LoRA checkpoint. "
            "Use it as an expert of a mixture instead (`XLoraConfig(experts={...})`)."
        )
    raise UnsupportedFormatError(
        f"{folder}: neither {CONFIG_NAME} nor {ADAPTER_CONFIG_NAME} found; not an X-LoRA checkpoint in a known format "
        f"({', '.join(FORMATS)})."
    )


def _read_json(path: Path, *, what: str) -> dict[str, Any]:
    """A foreign format's JSON config, through the one bounded reader (size, depth, finite numbers, an object)."""
    return read_json_object(path, what=f"{what}: {path.name}")


def _source_folder(
    source: str | os.PathLike[str],
    *,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
) -> tuple[Path | None, str]:
    """``(folder, format)``: a local folder, or a Hub repo's JSON/safetensors files in the cache (``folder`` is
    ``None`` for an xlora-hub repo, which :func:`load_mixture` fetches itself)."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if revision is not None:
            raise InvalidMixtureError(f"`revision` applies to Hub repos only; {text!r} is a local folder.")
        return path, detect_format(path)
    if isinstance(source, os.PathLike) or text.startswith(("./", "../", "/", "~")) or os.path.isabs(text):
        raise InvalidMixtureError(f"Checkpoint folder {text!r} does not exist.")
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    kwargs: dict[str, Any] = dict(
        revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
    )
    try:
        data = _read_json(Path(hf_hub_download(text, CONFIG_NAME, **kwargs)), what=text)
        if "format_version" in data:
            return None, FORMAT_XLORA_HUB
    except RemoteEntryNotFoundError:
        try:
            hf_hub_download(text, ADAPTER_CONFIG_NAME, **kwargs)
        except RemoteEntryNotFoundError:
            raise UnsupportedFormatError(
                f"Hub repo {text!r} has neither {CONFIG_NAME} nor {ADAPTER_CONFIG_NAME}: not an X-LoRA checkpoint."
            ) from None
    # Only JSON and safetensors files: nothing downloaded is ever unpickled.
    folder = Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors"], **kwargs))
    return folder, detect_format(folder)


# ---------------------------------------------------------------------------------------------- expert refs
def _identifier(name: str, taken: set[str]) -> str:
    """A Python identifier for an expert name from another format (peft uses "0", "1"...)."""
    ident = re.sub(r"\W", "_", str(name))
    if not ident or not (ident[0].isalpha() or ident[0] == "_"):
        ident = f"expert_{ident}"
    base, n = ident, 2
    while ident in taken:
        ident, n = f"{base}_{n}", n + 1
    taken.add(ident)
    return ident


def _is_numbered_peft_folder(path: Path, folder: Path) -> bool:
    try:
        rel = path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return len(rel.parts) == 1 and rel.parts[0].isdigit()


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, every link resolved, is ``folder`` or below it."""
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _confined_ref(name: str, value: str, folder: Path, *, what: str) -> ExpertRef | None:
    """An ``adapters`` value of a checkpoint downloaded from the Hub: a folder inside the downloaded repo, else
    ``None`` (then only a Hub repo id is accepted). A stranger's absolute path, ``~``, ``..`` or a link out of
    the snapshot would import files from the downloader's own disk: refused, naming the expert and the path."""
    fix = f"Pass `adapters={{{name!r}: 'owner/repo' or './folder'}}` (`--adapter {name}=REF`) to say where it is."
    if os.path.isabs(value) or value.startswith(("~", "\\")) or re.match(r"^[A-Za-z]:", value):
        raise ExpertNotFoundError(
            f"{what}: expert {name!r} has the absolute path {value!r}. A checkpoint from the Hub may only name "
            f"folders inside its own repo or Hub repo ids; a path on the author's machine is never read. {fix}"
        )
    if ".." in PurePosixPath(value.replace("\\", "/")).parts:
        raise ExpertNotFoundError(
            f"{what}: expert {name!r} path {value!r} leaves the downloaded repo ('..'); it is never followed. {fix}"
        )
    try:
        rel = safe_relative_path(value, what=f"{what}: expert {name!r} path")
    except InvalidMixtureError:
        return None  # not a relative path (for example 'repo:subfolder'): only a Hub repo id can match
    candidate = folder / rel
    if not (candidate / ADAPTER_CONFIG_NAME).exists() and not candidate.is_symlink():
        return None
    if not _inside(candidate, folder):
        raise ExpertNotFoundError(
            f"{what}: expert {name!r} path {value!r} is a link that leaves the downloaded repo; it is never "
            f"followed. {fix}"
        )
    return _checked_folder_ref(name, value, candidate, folder, what=what)


def _checked_folder_ref(name: str, value: str, candidate: Path, folder: Path, *, what: str) -> ExpertRef:
    """The ref of an expert folder found at ``candidate`` (never one of peft's numbered whole-model folders)."""
    if _is_numbered_peft_folder(candidate, folder):
        raise ExpertNotFoundError(
            f"{what}: expert {name!r} points at {value!r}, one of the numbered folders peft writes; they hold "
            "a whole model's tensors, not a usable expert. Pass "
            f"`adapters={{{name!r}: 'owner/repo' or './folder'}}` with the original expert."
        )
    return ExpertRef(path=str(candidate.resolve()))


def _ref_from_value(name: str, value: Any, folder: Path, *, what: str, confined: bool = False) -> ExpertRef:
    """Resolve an ``adapters`` value: a local folder (as given, or relative to the checkpoint) or a Hub repo.

    ``confined`` (a checkpoint downloaded from the Hub): only a folder inside the checkpoint or a Hub repo id,
    see :func:`_confined_ref`. A local checkpoint's own paths, absolute ones included, are its owner's choice.
    """
    if not isinstance(value, str) or not value.strip():
        raise InvalidConfigError(f"{what}: expert {name!r} has location {value!r}; expected a folder or a Hub repo id.")
    value = value.strip()
    if confined:
        ref = _confined_ref(name, value, folder, what=what)
        if ref is not None:
            return ref
        candidates: list[Path] = []
    else:
        candidates = [Path(value).expanduser()]
        if not os.path.isabs(value):
            try:
                candidates.append(folder / safe_relative_path(value, what=f"{what}: expert {name!r} path"))
            except InvalidMixtureError:
                pass
    for candidate in candidates:
        if (candidate / ADAPTER_CONFIG_NAME).is_file():
            return _checked_folder_ref(name, value, candidate, folder, what=what)
    looks_local = value.startswith(("./", "../", "/", "~")) or os.path.isabs(value)
    if not looks_local:
        try:
            ref = ExpertRef.parse(value)
        except InvalidConfigError:
            parts = value.strip("/").split("/")
            if len(parts) > 2 and "@" not in value and ":" not in value:  # "owner/repo/sub/folder"
                return ExpertRef(repo_id="/".join(parts[:2]), subfolder="/".join(parts[2:]))
        else:
            if ref.is_hub or not confined:  # confined: never a folder of the working directory
                return ref
    raise ExpertNotFoundError(
        f"{what}: expert {name!r} points at {value!r}, which is neither a folder holding {ADAPTER_CONFIG_NAME} "
        + ("inside the downloaded repo " if confined else "")
        + f"nor a Hub repo id. Pass `adapters={{{name!r}: 'owner/repo' or './folder'}}` to say where it is."
    )


def _refs(adapters: Any, folder: Path, *, what: str, subfolders: bool, confined: bool = False) -> dict[str, ExpertRef]:
    """Expert refs from an ``adapters`` list (names) or dict (name -> location); ``subfolders`` first looks for
    ``<name>/`` and ``adapters/<name>/`` inside the checkpoint (the original package's layout). ``confined``:
    the checkpoint was downloaded from the Hub, so its locations must stay inside it (see :func:`_confined_ref`)."""
    if isinstance(adapters, Mapping):
        items = list(adapters.items())
    elif isinstance(adapters, (list, tuple)):
        items = [(name, None) for name in adapters]
    else:
        raise InvalidConfigError(
            f"{what}: `adapters` must be a list of expert names or a dict of name -> location, got {adapters!r}."
        )
    if not items:
        raise InvalidConfigError(f"{what}: `adapters` is empty; an X-LoRA mixture needs at least one expert.")
    taken: set[str] = set()
    refs: dict[str, ExpertRef] = {}
    for name, value in items:
        if not isinstance(name, str) or not name:
            raise InvalidConfigError(f"{what}: expert name {name!r} must be a non-empty string.")
        ref = None
        if subfolders:
            rel = safe_relative_path(name, what=f"{what}: expert {name!r} folder")
            for candidate in (folder / rel, folder / "adapters" / rel):
                if (candidate / ADAPTER_CONFIG_NAME).is_file() and (not confined or _inside(candidate, folder)):
                    ref = ExpertRef(path=str(candidate.resolve()))
                    break
        if ref is None:
            if value is None:
                raise ExpertNotFoundError(
                    f"{what}: expert {name!r} has no {name}/{ADAPTER_CONFIG_NAME} in the checkpoint and the config "
                    f"gives no location. Pass `adapters={{{name!r}: 'owner/repo' or './folder'}}`."
                )
            ref = _ref_from_value(name, value, folder, what=what, confined=confined)
        if name.isdigit() and ref.path is not None and Path(ref.path).parent == folder.resolve():
            name = Path(ref.path).name  # peft needs the keys "0".."n-1"; export_peft keeps the names as folder names
        refs[_identifier(name, taken)] = ref
    return refs


# ---------------------------------------------------------------------------------------------- foreign checkpoints
@dataclass
class _Foreign:
    """A checkpoint read from another format: our config (no layer names yet) and the classifier's linear layers."""

    config: XLoraConfig
    linears: list[tuple[torch.Tensor, torch.Tensor | None]]
    what: str


def _classifier_linear_names(config: XLoraConfig) -> list[str]:
    """Names (``layers.N``) of the Linear layers of our classifier for a config, in order."""
    from .classifier import XLoraClassifier

    meta = XLoraClassifier(
        config.replace(layerwise_scalings=False), hidden_size=1, n_layers=1, n_experts=config.n_experts, device="meta"
    )
    return [f"layers.{n}" for n, m in meta.layers.named_children() if isinstance(m, nn.Linear)]


def _load_classifier_tensors(path: Path, *, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        pickle = path.with_suffix(".pt")
        if pickle.is_file() or path.with_name(PICKLE_WEIGHTS_NAME).is_file():
            raise UnsupportedFormatError(
                f"{what}: the classifier is only saved as a pickle file; xlora-hub reads safetensors only and never "
                "unpickles downloaded files. Re-save it with safetensors."
            )
        raise InvalidMixtureError(f"{what}: classifier file {path.name} is missing.")
    read_classifier_header(path, what=what)  # a clear error for truncated files
    tensors = load_file(str(path))
    check_finite_tensors(tensors.items(), what=f"{what}: {path.name}")
    return tensors


def _read_peft(folder: Path, adapters: Any, *, from_hub: bool = False) -> _Foreign:
    what = f"peft X-LoRA checkpoint {folder}"
    raw = _read_json(folder / ADAPTER_CONFIG_NAME, what=what)
    if "hidden_size" not in raw:
        raise InvalidConfigError(f"{what}: {ADAPTER_CONFIG_NAME} has no `hidden_size`.")
    confined = from_hub and adapters is None  # the caller's own `adapters=` are the caller's choice
    experts = _refs(
        adapters if adapters is not None else raw.get("adapters"),
        folder,
        what=what,
        subfolders=False,
        confined=confined,
    )
    settings = {k: raw[k] for k in _SHARED_SETTINGS if k in raw}
    if settings.get("scaling_pass_value") is None:
        settings.pop("scaling_pass_value", None)
    try:
        config = XLoraConfig(
            experts=experts,
            base_model=raw.get("base_model_name_or_path") or None,
            hidden_size=raw["hidden_size"],
            **settings,
        )
    except InvalidConfigError as err:
        raise InvalidConfigError(f"{what}: {err}") from None
    if config.use_trainable_adapters:
        logger.warning(
            "%s was trained with use_trainable_adapters=True; peft keeps the trained experts only in its numbered "
            "folders, which are not usable experts, so the original experts are imported.",
            what,
        )
    state = _load_classifier_tensors(folder / ADAPTER_WEIGHTS_NAME, what=what)
    tensors = {k.split(PEFT_CLASSIFIER_MARKER, 1)[1]: v for k, v in state.items() if PEFT_CLASSIFIER_MARKER in k}
    names = _classifier_linear_names(config)
    expected = [f"{n}.{p}" for n in names for p in ("weight", "bias")]
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise UnsupportedFormatError(
            f"{what}: {ADAPTER_WEIGHTS_NAME} holds {len([k for k in expected if k in tensors])} of the {len(expected)} "
            f"classifier tensors (missing {missing}). peft >= 0.20 writes an empty or partial X-LoRA classifier file "
            "when saving, so this checkpoint lost its trained classifier and loading it would route at random. "
            "Re-save the classifier from the live peft model with `xlora_hub.convert.save_peft_classifier(peft_model, "
            "folder)` and import again."
        )
    return _Foreign(config, [(tensors[f"{n}.weight"], tensors[f"{n}.bias"]) for n in names], what)


_ORIGINAL_KEY = re.compile(r"^(?:inner\.(\d+)|last)\.(weight|bias)$")


def _read_original(folder: Path, adapters: Any, *, from_hub: bool = False) -> _Foreign:
    what = f"xlora checkpoint {folder}"
    raw = _read_json(folder / CONFIG_NAME, what=what)
    if raw.get("use_mean_pool"):
        raise UnsupportedFormatError(
            f"{what}: use_mean_pool=true routes whole sequences, not tokens; xlora-hub cannot represent it."
        )
    state = _load_classifier_tensors(folder / CLASSIFIER_WEIGHTS_NAME, what=what)
    inner: dict[int, dict[str, torch.Tensor]] = {}
    last: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _ORIGINAL_KEY.match(key)
        if match is None:
            raise UnsupportedFormatError(
                f"{what}: unexpected classifier tensor {key!r} (expected inner.N.* and last.*)."
            )
        (inner.setdefault(int(match.group(1)), {}) if match.group(1) is not None else last)[match.group(2)] = value
    if "weight" not in last:
        raise InvalidMixtureError(f"{what}: {CLASSIFIER_WEIGHTS_NAME} has no `last.weight`.")
    layers = [inner[i] for i in sorted(inner)] + [last]
    if any("weight" not in layer for layer in layers):
        raise InvalidMixtureError(f"{what}: an inner classifier layer has a bias but no weight.")
    depth = len(layers)
    if "xlora_depth" in raw and raw["xlora_depth"] != depth:
        raise InvalidMixtureError(
            f"{what}: xlora_depth is {raw['xlora_depth']} but {CLASSIFIER_WEIGHTS_NAME} has {depth} linear layers."
        )
    if depth > 1 and not raw.get("enable_relu_and_dropout", False):
        raise UnsupportedFormatError(
            f"{what}: a classifier of depth {depth} without ReLU (enable_relu_and_dropout=false) has no equivalent in "
            "xlora-hub or peft, whose classifiers put a ReLU between linear layers."
        )
    if "hidden_size" not in raw:
        raise InvalidConfigError(f"{what}: {CONFIG_NAME} has no `hidden_size`.")
    confined = from_hub and adapters is None
    experts = _refs(
        adapters if adapters is not None else raw.get("adapters"), folder, what=what, subfolders=True, confined=confined
    )
    settings = {k: raw[k] for k in _SHARED_SETTINGS if k in raw}
    settings["xlora_depth"] = depth
    if depth > 1:
        settings["xlora_size"] = int(layers[0]["weight"].shape[0])
    if settings.get("scaling_pass_value") is None:
        settings["scaling_pass_value"] = 0.0  # mistral.rs' default when it is missing
    try:
        config = XLoraConfig(
            experts=experts,
            base_model=raw.get("base_model_id") or None,
            hidden_size=raw["hidden_size"],
            **settings,
        )
    except (InvalidConfigError, TypeError) as err:
        raise InvalidConfigError(f"{what}: {err}") from None
    linears = [(layer["weight"], layer.get("bias")) for layer in layers]
    if raw.get("use_bias", True) and any(b is None for _, b in linears):
        raise InvalidMixtureError(f"{what}: use_bias is true but {CLASSIFIER_WEIGHTS_NAME} lacks a bias tensor.")
    return _Foreign(config, linears, what)


def _check_linears(foreign: _Foreign) -> None:
    """Shapes of the foreign classifier against its config, before any model is built."""
    config, what = foreign.config, foreign.what
    width = config.hidden_size
    for i, (weight, bias) in enumerate(foreign.linears):
        if weight.dim() != 2 or weight.shape[1] != width:
            raise InvalidMixtureError(
                f"{what}: classifier layer {i} has weight shape {list(weight.shape)}, expected input size {width} "
                f"(hidden_size={config.hidden_size}, xlora_size={config.xlora_size})."
            )
        if bias is not None and list(bias.shape) != [weight.shape[0]]:
            raise InvalidMixtureError(f"{what}: classifier layer {i} has bias shape {list(bias.shape)}.")
        width = weight.shape[0]
    out = foreign.linears[-1][0].shape[0]
    if (not config.layerwise_scalings and out != config.n_experts) or out % config.n_experts:
        raise InvalidMixtureError(
            f"{what}: the classifier has {out} outputs but there are {config.n_experts} experts "
            f"(layerwise_scalings={config.layerwise_scalings})."
        )


def _build(
    foreign: _Foreign,
    *,
    base_model: nn.Module | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
    force_download: bool,
    torch_dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> XLoraModel:
    from .model import XLoraModel

    _check_linears(foreign)
    config = foreign.config
    if base_model is None:
        if config.base_model is None:
            raise InvalidMixtureError(f"{foreign.what} names no base model; pass `base_model=`.")
        base_model = load_base_model(
            config.base_model,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            torch_dtype=torch_dtype,
        )
    model = XLoraModel.from_experts(
        base_model,
        config,
        device=device,
        torch_dtype=torch_dtype,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    names = _classifier_linear_names(model.xlora_config)
    state: dict[str, torch.Tensor] = {}
    for name, (weight, bias) in zip(names, foreign.linears):
        state[f"{name}.weight"] = weight
        state[f"{name}.bias"] = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    expected = model.classifier.shapes()
    if {k: list(v.shape) for k, v in state.items()} != expected:
        raise InvalidMixtureError(
            f"{foreign.what}: the classifier was trained for another number of X-LoRA layers "
            f"(this base model and these experts give {model.n_layers})."
        )
    model.classifier.load_state_dict(state, strict=True)  # casts (for example bfloat16) to the model's dtype
    return model.eval()


# ---------------------------------------------------------------------------------------------- import
def import_mixture(
    source: str | os.PathLike[str],
    *,
    base_model: nn.Module | None = None,
    adapters: Mapping[str, str] | Sequence[str] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> XLoraModel:
    """Load an X-LoRA checkpoint in any known format (folder or Hub repo) as an :class:`XLoraModel`.

    ``adapters`` overrides where the experts are (name -> folder or Hub repo), for checkpoints whose
    recorded locations no longer exist. Save the result with ``model.save_pretrained`` or ``push_to_hub``.
    """
    folder, fmt = _source_folder(
        source, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
    )
    if fmt == FORMAT_XLORA_HUB:
        if adapters is not None:
            raise InvalidConfigError("`adapters=` only applies to peft and original xlora checkpoints.")
        return load_mixture(
            folder if folder is not None else source,
            base_model=base_model,
            revision=revision if folder is None else None,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
            torch_dtype=torch_dtype,
            device=device,
        )
    assert folder is not None
    from_hub = not Path(os.fspath(source)).expanduser().is_dir()  # a snapshot in the cache, written by a stranger
    read = _read_peft if fmt == FORMAT_PEFT else _read_original
    foreign = read(folder, adapters, from_hub=from_hub)
    return _build(
        foreign,
        base_model=base_model,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
        torch_dtype=torch_dtype,
        device=device,
    )


def save_peft_classifier(peft_model: nn.Module, save_directory: str | os.PathLike[str]) -> Path:
    """Write the complete classifier of a live peft X-LoRA model into ``adapter_model.safetensors``.

    The workaround for peft >= 0.20, whose ``save_pretrained`` writes an empty or partial classifier file:
    call it after ``peft_model.save_pretrained(save_directory)``. peft itself loads the result.
    """
    classifier = getattr(getattr(peft_model, "base_model", peft_model), "internal_xlora_classifier", None)
    if classifier is None:
        raise InvalidMixtureError(f"{type(peft_model).__name__} is not a peft X-LoRA model (no internal classifier).")
    path = Path(save_directory) / ADAPTER_WEIGHTS_NAME
    state = {PEFT_CLASSIFIER_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in classifier.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- export
def _write_experts(model: XLoraModel, folder: Path, names: Mapping[str, str]) -> None:
    trained = model.xlora_config.use_trainable_adapters
    for expert in model.experts:
        write_expert_files(model, expert, folder / names[expert.name], from_model=trained)


def _export(model: XLoraModel, save_directory: str | os.PathLike[str], writer, *, overwrite: bool) -> Path:
    """Write an export through the one guarded folder writer: a folder holding files is replaced as a whole only
    with ``overwrite=True``, and a kill at any point leaves the old or the new folder (:mod:`.staging`)."""
    target = prepare_target(save_directory, overwrite=overwrite, what="Export folder")
    with staging_folder(target) as tmp:
        writer(tmp, target.resolve())
        replace_folder(tmp, target)
    return target


def export_peft(model: XLoraModel, save_directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the mixture in peft's X-LoRA format, the experts copied into ``<name>/``.

    A ``save_directory`` that already holds files is refused unless ``overwrite=True`` (it is then replaced whole).

    ``PeftModel.from_pretrained(base_model, save_directory)`` loads it. peft needs the ``adapters`` keys to be
    ``"0"``..``"n-1"`` and reads the experts from the absolute paths in their values (pass ``adapters=`` to peft if
    the folder moves); :func:`import_mixture` takes the expert names back from the folder names.
    """
    import peft

    config = model.xlora_config
    first = model.peft_model.peft_config[model.expert_names[0]] if model.peft_model is not None else None
    task_type = getattr(first, "task_type", None) or "CAUSAL_LM"

    def write(tmp: Path, final: Path) -> None:
        names = {name: name for name in model.expert_names}
        _write_experts(model, tmp, names)
        settings = {k: getattr(config, k) for k in _SHARED_SETTINGS}
        settings["scaling_pass_value"] = config.resolved_scaling_pass_value()
        adapter_config = {
            "peft_type": "XLORA",
            "task_type": str(getattr(task_type, "value", task_type)),
            "base_model_name_or_path": config.base_model.repo_id if config.base_model else None,
            "revision": config.base_model.revision if config.base_model else None,
            "inference_mode": True,
            "hidden_size": config.hidden_size,
            "adapters": {str(i): str(final / name) for i, name in enumerate(model.expert_names)},
            **settings,
            "peft_version": peft.__version__,
        }
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
        state = {
            PEFT_CLASSIFIER_PREFIX + k: v.detach().to("cpu").contiguous()
            for k, v in model.classifier.state_dict().items()
        }
        save_file(state, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})

    return _export(model, save_directory, write, overwrite=overwrite)


def _mistralrs_files(names: Sequence[str]) -> list[str]:
    fixed = [CONFIG_NAME, CLASSIFIER_WEIGHTS_NAME, MISTRALRS_ORDERING_NAME]
    return fixed + [f"{name}/{filename}" for name in names for filename in EXPERT_FILES]


def _mistralrs_names_ok(names: Sequence[str]) -> bool:
    """mistral.rs gives each file of the repo to the first adapter whose name occurs in its path: every file must
    contain its own expert's name and no other."""
    for path in _mistralrs_files(names):
        owner = path.split("/", 1)[0] if "/" in path else None
        if [n for n in names if n in path] != ([owner] if owner else []):
            return False
    return True


def mistralrs_expert_names(names: Sequence[str]) -> list[str]:
    """Expert names safe for mistral.rs (none is part of another or of a file name): the names themselves when they
    are, else ``e<i>_<name>``, else ``xlora_expert_<i>``."""
    width = len(str(len(names) - 1))
    for candidate in (
        list(names),
        [f"e{i:0{width}d}_{n}" for i, n in enumerate(names)],
        [f"xlora_expert_{i:0{width}d}" for i in range(len(names))],
    ):
        if _mistralrs_names_ok(candidate):
            return candidate
    raise UnsupportedFormatError(f"Cannot name experts {list(names)} safely for mistral.rs.")  # pragma: no cover


def export_mistralrs(
    model: XLoraModel,
    save_directory: str | os.PathLike[str],
    *,
    base_model_id: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a bundled, mistral.rs-ready folder in the original ``xlora`` layout.

    A ``save_directory`` that already holds files is refused unless ``overwrite=True`` (it is then replaced whole).

    Contents: ``xlora_config.json`` (``base_model_id`` and ``enable_relu_and_dropout`` explicit),
    ``xlora_classifier.safetensors`` (keys ``inner.N.*`` / ``last.*``), the experts in ``<name>/`` and
    ``ordering.json`` (expert order, each adapted layer's scaling index, base model id). Expert names are
    changed when one occurs in another (mistral.rs matches files by name); ``ordering.json`` lists the
    names used.
    """
    config = model.xlora_config
    if config.top_k_lora is not None or config.enable_softmax_topk:
        raise UnsupportedFormatError(
            "mistral.rs does not support `top_k_lora` / `enable_softmax_topk`; set them to None/False to export."
        )
    base_model_id = base_model_id or (config.base_model.repo_id if config.base_model else None)
    if not base_model_id:
        raise InvalidConfigError(
            "The mixture names no base model; pass `base_model_id=` (the Hub id mistral.rs loads)."
        )
    if config.xlora_depth > 1 and config.xlora_size != config.hidden_size:
        logger.warning(
            "Some mistral.rs releases build the last classifier layer with hidden_size inputs; this classifier has "
            "xlora_size=%d != hidden_size=%d. Check your mistral.rs version loads it.",
            config.xlora_size,
            config.hidden_size,
        )
    new_names = dict(zip(model.expert_names, mistralrs_expert_names(model.expert_names)))
    if any(k != v for k, v in new_names.items()):
        logger.warning("Experts renamed for mistral.rs (a name occurred in another): %s", new_names)

    def write(tmp: Path, final: Path) -> None:
        order = [new_names[n] for n in model.expert_names]
        _write_experts(model, tmp, new_names)
        xlora_config = {
            "hidden_size": config.hidden_size,
            "base_model_id": base_model_id,
            "adapters": {name: name for name in order},
            "layerwise_scalings": config.layerwise_scalings,
            "enable_relu_and_dropout": True,
            "use_bias": True,
            "xlora_depth": config.xlora_depth,
            "xlora_size": config.xlora_size,
            "xlora_dropout_p": config.xlora_dropout_p,
            "enable_softmax": config.enable_softmax,
            "softmax_temperature": config.softmax_temperature,
            "scaling_pass_value": config.resolved_scaling_pass_value(),
            "use_trainable_adapters": False,
            "global_scaling_weight": config.global_scaling_weight,
            "top_k_lora": None,
            "enable_softmax_topk": False,
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(xlora_config, indent=2) + "\n", encoding="utf-8")
        linears = [m for m in model.classifier.layers if isinstance(m, nn.Linear)]
        state: dict[str, torch.Tensor] = {}
        for i, linear in enumerate(linears):
            prefix = "last" if i == len(linears) - 1 else f"inner.{i}"
            state[f"{prefix}.weight"] = linear.weight.detach().to("cpu").contiguous()
            state[f"{prefix}.bias"] = linear.bias.detach().to("cpu").contiguous()
        save_file(state, str(tmp / CLASSIFIER_WEIGHTS_NAME), metadata={"format": "pt"})
        ordering = {
            "order": order,
            "layers": {name: i for i, name in enumerate(model.layer_names)},
            "base_model_id": base_model_id,
        }
        (tmp / MISTRALRS_ORDERING_NAME).write_text(json.dumps(ordering, indent=2) + "\n", encoding="utf-8")

    return _export(model, save_directory, write, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------- CLI
def _parse_adapters(values: list[str] | None) -> dict[str, str] | None:
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
    return load_base_model(BaseModelRef(repo_id=value), token=token) if value else None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xlora_hub.convert {detect,import,export} ...``: see ``--help``."""
    parser = argparse.ArgumentParser(
        prog="python -m xlora_hub.convert", description="Convert X-LoRA checkpoints to and from xlora-hub mixtures."
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
    exp = sub.add_parser("export", help="export an xlora-hub mixture to peft's format or a mistral.rs folder")
    exp.add_argument("format", choices=["peft", "mistralrs"])
    exp.add_argument("mixture", help="xlora-hub mixture folder or Hub repo id")
    exp.add_argument("output")
    exp.add_argument("--base-model", help="base model repo id or folder (default: the one the mixture names)")
    exp.add_argument("--base-model-id", help="(mistralrs) the base model id written in the files")
    exp.add_argument("--revision")
    exp.add_argument("--token")
    args = parser.parse_args(argv)
    try:
        if args.command == "detect":
            folder, fmt = _source_folder(
                args.source, revision=args.revision, token=None, cache_dir=None, local_files_only=False
            )
            print(fmt)
        elif args.command == "import":
            model = import_mixture(
                args.source,
                base_model=_base(args.base_model, args.token),
                adapters=_parse_adapters(args.adapter),
                revision=args.revision,
                token=args.token,
            )
            print(model.save_pretrained(args.output, bundle_experts=args.bundle_experts))
        else:
            model = load_mixture(
                args.mixture, base_model=_base(args.base_model, args.token), revision=args.revision, token=args.token
            )
            if args.format == "peft":
                print(export_peft(model, args.output))
            else:
                print(export_mistralrs(model, args.output, base_model_id=args.base_model_id))
    except _user_errors() as err:  # the input is wrong: one line and exit 1, like the `xlora-hub` CLI
        from .cli import is_user_error, one_line

        if not is_user_error(err):
            raise
        token = getattr(args, "token", None)
        print(
            f"{parser.prog} {args.command}: error: {one_line(err, secrets=[token] if token else [])}", file=sys.stderr
        )
        return 1
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions the `xlora-hub` CLI reports as user errors (exit 1), shared so both commands agree."""
    from .cli import user_errors

    return user_errors()


__all__ = [
    "FORMATS",
    "MISTRALRS_ORDERING_NAME",
    "detect_format",
    "export_mistralrs",
    "export_peft",
    "import_mixture",
    "main",
    "mistralrs_expert_names",
    "save_peft_classifier",
]


if __name__ == "__main__":
    sys.exit(main())
