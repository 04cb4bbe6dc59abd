"""Resolving expert references to local adapter folders, and checking them before anything is built.

A Hub expert is downloaded from its own repo with ``huggingface_hub`` (only
``adapter_config.json`` and ``adapter_model.safetensors``, at the pinned revision). The commit it
resolved to is recorded so a mixture can be pinned when pushed. Every check that can fail
(format, DoRA, target modules, shapes) runs on the files' headers before the base model is
touched, so a bad expert never leaves a half-built model behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from safetensors import safe_open
from torch import nn

from .config import ExpertRef
from .errors import ExpertNotFoundError, IncompatibleExpertError, InvalidMixtureError

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
        if base_dir is not None and not os.path.isabs(os.path.expanduser(ref.path)):
            rel = safe_relative_path(ref.path, what=f"Expert {name!r} path")
            folder = Path(base_dir) / rel
        else:
            folder = Path(os.path.expanduser(ref.path))
        if ref.subfolder:
            folder = folder / safe_relative_path(ref.subfolder, what=f"Expert {name!r} subfolder")
        if not folder.is_dir():
            raise ExpertNotFoundError(
                f"Expert {name!r}: local folder {str(folder)!r} does not exist. Check the path, or give a Hub repo id "
                "('owner/name')."
            )
        _check_files(name, folder)
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
    """The expert's ``adapter_config.json``, checked to be a plain LoRA adapter."""
    path = expert.local_dir / ADAPTER_CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise IncompatibleExpertError(f"Expert {expert.name!r}: cannot read {path} ({err}).") from None
    if not isinstance(config, dict):
        raise IncompatibleExpertError(f"Expert {expert.name!r}: {path} is not a JSON object.")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise IncompatibleExpertError(
            f"Expert {expert.name!r} is a {peft_type} adapter; X-LoRA mixes LoRA adapters only."
        )
    if config.get("use_dora"):
        raise IncompatibleExpertError(
            f"Expert {expert.name!r} is a DoRA adapter (use_dora=true in {ADAPTER_CONFIG_NAME}); X-LoRA mixes plain "
            "LoRA experts only. Retrain it with `use_dora=False`."
        )
    if config.get("lora_bias"):
        raise IncompatibleExpertError(
            f"Expert {expert.name!r} uses lora_bias=true; X-LoRA mixes LoRA experts without a bias on B."
        )
    return config


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


def check_expert_matches_model(expert: ResolvedExpert, model: nn.Module) -> None:
    """Check the expert's tensors against the base model's modules: names exist and sizes agree."""
    modules = dict(model.named_modules())
    for key, shape in adapter_tensor_shapes(expert).items():
        stem = key
        for prefix in ("base_model.model.",):
            if stem.startswith(prefix):
                stem = stem[len(prefix) :]
        split = _split_lora_key(stem)
        if split is None:
            continue
        module_name, axis = split
        module = modules.get(module_name)
        if module is None:
            # peft strips/adds the top module prefix for some architectures; accept a unique suffix match
            matches = [m for n, m in modules.items() if n.endswith("." + module_name) or module_name.endswith("." + n)]
            module = matches[0] if len(matches) == 1 else None
        if module is None:
            raise IncompatibleExpertError(
                f"Expert {expert.name!r} targets module {module_name!r}, which this base model "
                f"({type(model).__name__}) does not have: it was trained on another architecture."
            )
        io = _module_io(module)
        if io is None:
            from .quantization import supported_layers_text

            cls = type(module)
            raise IncompatibleExpertError(
                f"Expert {expert.name!r} targets {module_name!r}, a {cls.__module__}.{cls.__qualname__}, which "
                f"X-LoRA cannot mix. Supported: {supported_layers_text()}. A base quantized another way: load it "
                "with one of those quantizations, or unquantized."
            )
        kind, fan_in, fan_out = io
        expected = {"A": fan_in, "B": fan_out, "eA": fan_in, "eB": fan_out}[axis]
        actual = shape[1] if axis in ("A", "eA") else shape[0]
        if expected != actual:
            raise IncompatibleExpertError(
                f"Expert {expert.name!r} does not fit this base model: {key} has shape {shape} but module "
                f"{module_name!r} has {'input' if axis in ('A', 'eA') else 'output'} size {expected}. "
                "It was trained on a model with another architecture or hidden size."
            )
