"""Resolving expert references to local adapter folders, and checking them before anything is built.

A Hub expert is downloaded from its own repo with ``huggingface_hub`` (only
``adapter_config.json`` and ``adapter_model.safetensors``, at the pinned revision). The commit it
resolved to is recorded so a mixture can be pinned when pushed. Every check that can fail
(format, DoRA, target modules, shapes) runs on the files' headers before the base model is
touched, so a bad expert never leaves a half-built model behind.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .config import ExpertRef
from .errors import ExpertNotFoundError, IncompatibleExpertError, InvalidConfigError, InvalidMixtureError, short_repr
from .jsonfile import read_json_object
from .paths import resolve_inside

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


@dataclass(frozen=True)
class ResolvedExpert:
    """An expert ready to load: its name, the ref it came from, and a local folder holding its files."""

    name: str
    ref: ExpertRef
    local_dir: Path
    commit_sha: str | None = None

    def pinned_ref(self) -> ExpertRef:
        """The ref pinned to the commit it resolved to (Hub experts only)."""
        if self.ref.is_hub and self.commit_sha and not self.ref.is_pinned:
            return ExpertRef(repo_id=self.ref.repo_id, revision=self.commit_sha, subfolder=self.ref.subfolder)
        return self.ref


def safe_relative_path(value: str, *, what: str) -> PurePosixPath:
    """A relative POSIX path that stays inside its root (no absolute path, no ``..``)."""
    path = PurePosixPath(value.replace("\\", "/"))
    if (
        path.is_absolute()
        or value.startswith(("/", "\\"))
        or ".." in path.parts
        or (path.parts and ":" in path.parts[0])
    ):
        raise InvalidMixtureError(
            f"{what} {value!r} escapes the mixture: only relative paths inside it are allowed (no '..', no absolute path)."
        )
    return path


def _inside(base_dir: str | os.PathLike[str], rel: PurePosixPath, *, name: str, where: str) -> Path:
    """``base_dir / rel``, refused when a symbolic link takes it out of the mixture (:mod:`.paths`)."""
    return resolve_inside(base_dir, rel, what=f"Expert {name!r}: bundled {where}")


def cached_commit_sha(repo_id: str, *, cache_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The commit a Hub model was loaded at, read from the local cache (no network); None for local folders."""
    if os.path.isdir(repo_id):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except Exception:  # not a valid repo id, unreadable cache: nothing to pin
        return None
    return _snapshot_sha(path) if isinstance(path, str) else None


def _snapshot_sha(path: str) -> str | None:
    parts = Path(path).parts
    if "snapshots" in parts:
        index = parts.index("snapshots")
        if index + 1 < len(parts):
            return parts[index + 1]
    return None


def resolve_expert(
    name: str,
    ref: ExpertRef,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
) -> ResolvedExpert:
    """Find (and for Hub refs, download) the adapter files of one expert.

    ``base_dir`` is the mixture folder that relative ``path`` refs are resolved against.
    """
    if not ref.is_hub:
        assert ref.path is not None
        inside_mixture = base_dir is not None and not os.path.isabs(os.path.expanduser(ref.path))
        if inside_mixture:
            rel = safe_relative_path(ref.path, what=f"Expert {name!r} path")
        else:
            rel = PurePosixPath()
            base_dir = Path(os.path.expanduser(ref.path))  # a folder the user named: links inside it stay inside
        if ref.subfolder:
            rel = rel / safe_relative_path(ref.subfolder, what=f"Expert {name!r} subfolder")
        folder = _inside(base_dir, rel, name=name, where="folder") if inside_mixture else Path(base_dir) / rel
        if not folder.is_dir():
            raise ExpertNotFoundError(
                f"Expert {name!r}: local folder {str(folder)!r} does not exist. Check the path, or give a Hub repo id "
                "('owner/name')."
            )
        _check_files(name, folder)
        if inside_mixture:  # a bundled expert's files must not lead out of the mixture either
            for filename in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
                _inside(base_dir, rel / filename, name=name, where="file")
        return ResolvedExpert(name=name, ref=ref, local_dir=folder.resolve())

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    subfolder = str(safe_relative_path(ref.subfolder, what=f"Expert {name!r} subfolder")) if ref.subfolder else None
    kwargs: dict[str, Any] = dict(
        repo_id=ref.repo_id,
        subfolder=subfolder,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    where = f"{ref.repo_id}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    try:
        config_path = hf_hub_download(filename=ADAPTER_CONFIG_NAME, revision=ref.revision, **kwargs)
        sha = _snapshot_sha(config_path)
        try:
            weights_path = hf_hub_download(filename=ADAPTER_WEIGHTS_NAME, revision=sha or ref.revision, **kwargs)
        except RemoteEntryNotFoundError:  # not LocalEntryNotFoundError, also an EntryNotFoundError
            raise IncompatibleExpertError(
                f"Expert {name!r} ({where}) has no {ADAPTER_WEIGHTS_NAME}. xlora-hub loads safetensors only and never "
                f"unpickles a downloaded {PICKLE_WEIGHTS_NAME}; convert the adapter with peft "
                "(`model.save_pretrained(dir, safe_serialization=True)`) and push it again."
            ) from None
    except RepositoryNotFoundError as err:
        raise ExpertNotFoundError(
            f"Expert {name!r}: Hub repo {ref.repo_id!r} was not found, or it is private and the token cannot read it. "
            f"Check the repo id and pass `token=`. ({err.__class__.__name__})"
        ) from err
    except RevisionNotFoundError as err:
        raise ExpertNotFoundError(
            f"Expert {name!r}: revision {ref.revision!r} does not exist in Hub repo {ref.repo_id!r}."
        ) from err
    except RemoteEntryNotFoundError as err:
        raise ExpertNotFoundError(
            f"Expert {name!r}: {where} has no {ADAPTER_CONFIG_NAME} at revision {ref.revision or 'main'!r}; "
            "is it a peft LoRA adapter repo? Use `:subfolder` if the adapter is in a folder."
        ) from err
    except LocalEntryNotFoundError as err:
        raise ExpertNotFoundError(
            f"Expert {name!r} ({where}) is not in the local cache and the Hub cannot be reached "
            "(offline mode or no connection). Run `xlora-hub pull` while online first."
        ) from err
    folder = Path(weights_path).parent
    if Path(config_path).parent != folder:  # pragma: no cover - both live in one snapshot folder
        raise InvalidMixtureError(f"Expert {name!r}: adapter files of {where} were resolved to different commits.")
    return ResolvedExpert(name=name, ref=ref, local_dir=folder, commit_sha=sha)


def _check_files(name: str, folder: Path) -> None:
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        raise ExpertNotFoundError(
            f"Expert {name!r}: {str(folder)!r} has no {ADAPTER_CONFIG_NAME}; it is not a peft adapter folder."
        )
    if not (folder / ADAPTER_WEIGHTS_NAME).is_file():
        if (folder / PICKLE_WEIGHTS_NAME).is_file():
            raise IncompatibleExpertError(
                f"Expert {name!r}: {str(folder)!r} only has a pickle {PICKLE_WEIGHTS_NAME}; xlora-hub loads "
                "safetensors only. Re-save the adapter with `save_pretrained(dir, safe_serialization=True)`."
            )
        raise ExpertNotFoundError(f"Expert {name!r}: {str(folder)!r} has no {ADAPTER_WEIGHTS_NAME}.")


def read_adapter_config(expert: ResolvedExpert) -> dict[str, Any]:
    """The expert's ``adapter_config.json``, checked to be a plain LoRA adapter with sane values.

    Read with the one bounded JSON reader, then every value peft would use is checked here, so a bad value is
    an error naming the expert and the field rather than a bare ``KeyError``/``TypeError`` from peft.
    """
    path = expert.local_dir / ADAPTER_CONFIG_NAME
    fix = "Re-save the adapter with peft (`model.save_pretrained(dir)`)."
    try:
        config = read_json_object(path, what=f"Expert {expert.name!r}: {ADAPTER_CONFIG_NAME}", fix=fix)
    except InvalidConfigError as err:
        raise IncompatibleExpertError(str(err)) from None
    _check_peft_type(expert.name, config)
    if config.get("use_dora"):
        raise IncompatibleExpertError(
            f"Expert {expert.name!r} is a DoRA adapter (use_dora=true in {ADAPTER_CONFIG_NAME}); X-LoRA mixes plain "
            "LoRA experts only. Retrain it with `use_dora=False`."
        )
    if config.get("lora_bias"):
        raise IncompatibleExpertError(
            f"Expert {expert.name!r} uses lora_bias=true; X-LoRA mixes LoRA experts without a bias on B."
        )
    _check_lora_values(expert.name, config)
    return config


def _check_peft_type(name: str, config: dict[str, Any]) -> None:
    """peft reads ``peft_type`` as an exact key of its registry: missing or ``"lora"`` fails inside peft."""
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise IncompatibleExpertError(
            f'Expert {name!r}: {ADAPTER_CONFIG_NAME} has no `peft_type`; a peft LoRA adapter has "peft_type": "LORA". '
            "Add it, or re-save the adapter with peft."
        )
    if not isinstance(peft_type, str):
        raise IncompatibleExpertError(
            f"Expert {name!r}: `peft_type` in {ADAPTER_CONFIG_NAME} must be a string, got {short_repr(peft_type)}."
        )
    if peft_type.upper() != "LORA":
        raise IncompatibleExpertError(
            f"Expert {name!r} is a {short_repr(peft_type, limit=40)} adapter; X-LoRA mixes LoRA adapters only."
        )
    if peft_type != "LORA":
        raise IncompatibleExpertError(
            f'Expert {name!r}: `peft_type` is {peft_type!r} in {ADAPTER_CONFIG_NAME}; peft only reads "LORA" '
            '(upper case). Write "peft_type": "LORA".'
        )


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_lora_values(name: str, config: dict[str, Any]) -> None:
    """``r``, ``lora_alpha``, their patterns, ``target_modules`` and ``modules_to_save``, as peft will use them."""
    where = f"in {ADAPTER_CONFIG_NAME}"
    r = config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise IncompatibleExpertError(
            f"Expert {name!r}: `r` {where} must be a positive integer (the LoRA rank), got {short_repr(r)}. "
            "Set it to the rank the adapter was trained with (the first dimension of its lora_A tensors)."
        )
    alpha = config.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise IncompatibleExpertError(
            f"Expert {name!r}: `lora_alpha` {where} must be a finite number, got {short_repr(alpha)}."
        )
    for field_name, check, kind in (
        ("rank_pattern", lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= 1, "positive integers"),
        ("alpha_pattern", _is_number, "finite numbers"),
    ):
        pattern = config.get(field_name)
        if pattern in (None, {}):
            continue
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and check(v) for k, v in pattern.items()):
            raise IncompatibleExpertError(
                f"Expert {name!r}: `{field_name}` {where} must map module names to {kind}, got {short_repr(pattern)}."
            )
    targets = config.get("target_modules")
    if targets is None or targets == [] or targets == "":
        raise IncompatibleExpertError(
            f"Expert {name!r}: {ADAPTER_CONFIG_NAME} has no `target_modules`, so it adapts no layer. X-LoRA mixes "
            "LoRA adapters of modules (target_modules); re-save the adapter with peft."
        )
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            raise IncompatibleExpertError(
                f"Expert {name!r}: `target_modules` {short_repr(targets)} {where} is not a valid regex ({err})."
            ) from None
    elif not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise IncompatibleExpertError(
            f"Expert {name!r}: `target_modules` {where} must be a list of module names or a regex, "
            f"got {short_repr(targets)}."
        )
    if config.get("modules_to_save"):
        raise IncompatibleExpertError(
            f"Expert {name!r} has modules_to_save {short_repr(config['modules_to_save'])} {where}: whole modules "
            "trained with the adapter, which X-LoRA cannot mix (it mixes LoRA factors only). Retrain the expert "
            "without modules_to_save, or remove that field if those modules were not trained."
        )


def adapter_tensor_shapes(expert: ResolvedExpert) -> dict[str, list[int]]:
    """Tensor name -> shape from the safetensors header (no tensor is read)."""
    path = expert.local_dir / ADAPTER_WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: {path} is not a readable safetensors file ({err}). Download it again "
            "(`force_download=True`)."
        ) from None


def _module_io(module: nn.Module) -> tuple[str, int, int] | None:
    """(kind, in, out) of a module a LoRA expert can target, as the expert's A/B shapes see it."""
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return "embedding", module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Conv2d):
        return "conv2d", module.in_channels, module.out_channels
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:  # GPT-2 style: weight is [in, out]
        return "linear", weight.shape[0], weight.shape[1]
    return None


_LORA_MARKERS = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_embedding_A", "eA"),
    (".lora_embedding_B", "eB"),
)


def _split_lora_key(stem: str) -> tuple[str, str] | None:
    """``model.layers.0.q_proj.lora_A.weight`` -> (``model.layers.0.q_proj``, ``"A"``); None for other tensors."""
    for marker, axis in _LORA_MARKERS:
        if stem.endswith(marker):
            return stem[: -len(marker)], axis
    return None


_BASE_COPY = ".base_layer.weight"
"""peft's ``save_embedding_layers`` copy of a targeted embedding / lm_head weight: accepted when its shape fits."""


def _lora_modules(
    expert: ResolvedExpert, shapes: dict[str, list[int]], modules_of_model: dict[str, nn.Module]
) -> dict[str, dict[str, list[int]]]:
    """Module name (as the expert names it, peft's prefix stripped) -> {axis: shape} of its LoRA tensors.

    Any tensor that is not a LoRA factor (or peft's copy of a targeted layer's weight, of that layer's
    shape) is refused: peft would load it as something else or drop it.
    """
    modules: dict[str, dict[str, list[int]]] = {}
    others = []
    for key, shape in shapes.items():
        stem = key[len("base_model.model.") :] if key.startswith("base_model.model.") else key
        split = _split_lora_key(stem)
        if split is None:
            if stem.endswith(_BASE_COPY) and _is_base_copy(stem[: -len(_BASE_COPY)], shape, modules_of_model):
                continue
            others.append(key)
            continue
        module_name, axis = split
        modules.setdefault(module_name, {})[axis] = shape
    if others:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: {ADAPTER_WEIGHTS_NAME} holds tensors that are not LoRA factors "
            f"({short_repr(sorted(others)[:5])}{' ...' if len(others) > 5 else ''}); X-LoRA loads lora_A/lora_B "
            "only (no modules_to_save, no bias). Re-save the adapter without them."
        )
    return modules


def _is_base_copy(module_name: str, shape: list[int], modules: dict[str, nn.Module]) -> bool:
    """Whether a ``base_layer.weight`` tensor is a same-shape copy of a base model module's weight."""
    resolved = _resolve_module_name(module_name, modules)
    weight = getattr(modules[resolved], "weight", None) if resolved is not None else None
    return isinstance(weight, torch.Tensor) and list(weight.shape) == list(shape)


def _peft_lora_config(expert: ResolvedExpert, adapter: dict[str, Any]) -> Any:
    """peft's own LoraConfig of the expert, so target matching is exactly peft's."""
    from peft import PeftConfig

    try:
        return PeftConfig.from_peft_type(**adapter)
    except Exception as err:  # peft's config classes raise ValueError/TypeError for bad combinations
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: peft cannot read its {ADAPTER_CONFIG_NAME} ({short_repr(str(err), limit=300)})."
        ) from None


def _expected_rank(adapter: dict[str, Any], module_name: str) -> int:
    """The rank peft gives ``module_name``: its ``rank_pattern`` entry, else ``r`` (peft's own lookup)."""
    from peft.utils.other import get_pattern_key

    pattern = adapter.get("rank_pattern") or {}
    key = get_pattern_key(list(pattern), module_name)
    return int(pattern.get(key, adapter.get("r", 8)))


def _resolve_module_name(module_name: str, modules: dict[str, nn.Module]) -> str | None:
    """The base model's name for a module the expert names (peft strips/adds the top prefix for some models)."""
    if module_name in modules:
        return module_name
    matches = [n for n in modules if n.endswith("." + module_name) or module_name.endswith("." + n)]
    return matches[0] if len(matches) == 1 else None


def check_expert_matches_model(expert: ResolvedExpert, model: nn.Module) -> None:
    """Check the expert against its own tensors and the base model, from the file header, before peft sees it.

    The tensors must be LoRA factors of modules the base model has, each with both A and B, of the rank
    ``r`` (or ``rank_pattern``) says and the sizes of the module; the modules ``target_modules`` selects
    (peft's own matching) must be exactly the modules with tensors, and adaptable by LoRA.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    adapter = read_adapter_config(expert)
    shapes = adapter_tensor_shapes(expert)
    if not shapes:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: {ADAPTER_WEIGHTS_NAME} holds no tensors, so the expert would do nothing. "
            "Re-save the trained adapter with peft."
        )
    modules = dict(model.named_modules())
    by_module: dict[str, dict[str, list[int]]] = {}
    for module_name, factors in _lora_modules(expert, shapes, modules).items():
        resolved = _resolve_module_name(module_name, modules)
        if resolved is None:
            raise IncompatibleExpertError(
                f"Expert {expert.name!r} targets module {module_name!r}, which this base model "
                f"({type(model).__name__}) does not have: it was trained on another architecture."
            )
        _check_factors(expert, adapter, module_name, modules[resolved], factors)
        by_module[resolved] = factors

    peft_config = _peft_lora_config(expert, adapter)
    targeted = []
    for module_name in modules:
        # peft's own matcher; an excluded module comes back as a falsy marker
        if module_name and check_target_module_exists(peft_config, module_name):
            targeted.append(module_name)
    targets = short_repr(adapter.get("target_modules"))
    if not targeted:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: `target_modules` {targets} in {ADAPTER_CONFIG_NAME} matches no module of this "
            f"base model ({type(model).__name__}). Fix target_modules to name the modules its tensors adapt."
        )
    cannot = [n for n in targeted if _module_io(modules[n]) is None]
    if cannot:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: `target_modules` {targets} selects {cannot[0]!r} "
            f"({type(modules[cannot[0]]).__name__}) and {len(cannot) - 1} more module(s) LoRA cannot adapt; a regex "
            "that matches too much? Narrow target_modules to the modules its tensors adapt."
        )
    untrained = [n for n in targeted if n not in by_module]
    if untrained:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: `target_modules` {targets} selects {len(untrained)} module(s) with no tensors "
            f"in {ADAPTER_WEIGHTS_NAME} ({short_repr(untrained[:3])}...); peft would give them untrained factors. "
            "Fix target_modules, or re-save the complete adapter."
        )
    outside = sorted(set(by_module) - set(targeted))
    if outside:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: {ADAPTER_WEIGHTS_NAME} holds tensors for module(s) outside `target_modules` "
            f"{targets}: {short_repr(outside[:5])}; peft would drop them without a word. Add them to target_modules "
            "or re-save the adapter."
        )


def _check_factors(
    expert: ResolvedExpert, adapter: dict[str, Any], module_name: str, module: nn.Module, factors: dict[str, list[int]]
) -> None:
    """One module's factors: both A and B, the configured rank, and the module's input/output sizes."""
    io = _module_io(module)
    if io is None:
        from .quantization import supported_layers_text

        cls = type(module)
        raise IncompatibleExpertError(
            f"Expert {expert.name!r} targets {module_name!r}, a {cls.__module__}.{cls.__qualname__}, which "
            f"X-LoRA cannot mix. Supported: {supported_layers_text()}. A base quantized another way: load it "
            "with one of those quantizations, or unquantized."
        )
    pair = ("eA", "eB") if "eA" in factors or "eB" in factors else ("A", "B")
    names = {"A": "lora_A", "B": "lora_B", "eA": "lora_embedding_A", "eB": "lora_embedding_B"}
    missing = [names[axis] for axis in pair if axis not in factors]
    if missing or len(factors) != 2:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: module {module_name!r} has {sorted(names[a] for a in factors)} but no "
            f"{missing or 'matching pair'} in {ADAPTER_WEIGHTS_NAME}; the file is incomplete (an expert with only "
            "lora_A does nothing). Re-save the trained adapter with peft."
        )
    a_shape, b_shape = factors[pair[0]], factors[pair[1]]
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: the factors of {module_name!r} have shapes {a_shape} and {b_shape}; LoRA "
            "factors are matrices."
        )
    rank = _expected_rank(adapter, module_name)
    if a_shape[0] != rank or b_shape[1] != rank:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: `r` (or `rank_pattern`) in {ADAPTER_CONFIG_NAME} gives {module_name!r} rank "
            f"{rank}, but its tensors have shapes {a_shape} ({names[pair[0]]}) and {b_shape} ({names[pair[1]]}). "
            f"Set `r` to the tensors' rank ({a_shape[0]}), or re-save the adapter with peft."
        )
    _, fan_in, fan_out = io
    for axis, shape, expected, actual, side in (
        (pair[0], a_shape, fan_in, a_shape[1], "input"),
        (pair[1], b_shape, fan_out, b_shape[0], "output"),
    ):
        if expected != actual:
            raise IncompatibleExpertError(
                f"Expert {expert.name!r} does not fit this base model: {module_name}.{names[axis]} has shape {shape} "
                f"but module {module_name!r} has {side} size {expected}. "
                "It was trained on a model with another architecture or hidden size."
            )
