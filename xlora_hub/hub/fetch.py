"""Finding a mixture's files (a local folder, or a Hub snapshot in the cache) and the base model it names.

:func:`fetch_mixture` downloads only what a load needs (config first, checked before anything else; then the
classifier and bundled experts); :func:`resolve_base_model_ref` reads the base model the config names, a
relative path taken inside the mixture folder, so a self-contained folder loads from any working directory;
:func:`load_base_model` loads it with the class its config names. All Hub I/O goes through
``huggingface_hub``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..config import CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME, BaseModelRef, XLoraConfig
from ..errors import ExpertNotFoundError, IncompatibleExpertError, InvalidMixtureError
from ..paths import resolve_inside
from ..refs import has_path_syntax
from ..staging import recover_folder
from .api import clear_connection_errors, client_identity
from .experts import ADAPTER_WEIGHTS_NAME, PICKLE_WEIGHTS_NAME, safe_relative_path, snapshot_sha
from .format import EXPERT_FILES, read_mixture_config

__all__ = ["MixtureSource", "fetch_mixture", "load_base_model", "local_mixture_folder", "resolve_base_model_ref"]


@dataclass(frozen=True)
class MixtureSource:
    """A mixture found on disk: its folder (local or a cache snapshot), its checked config, and for a Hub
    mixture the repo id and the commit it resolved to."""

    folder: Path
    config: XLoraConfig
    repo_id: str | None = None
    commit: str | None = None

    @property
    def label(self) -> str:
        """How errors name the mixture: the folder, or ``repo@commit``."""
        if self.repo_id is None:
            return str(self.folder)
        return self.repo_id + (f"@{self.commit[:12]}" if self.commit else "")


def local_mixture_folder(repo_id_or_path: str | os.PathLike[str]) -> Path | None:
    """The local mixture folder named by the argument, ``None`` for a Hub repo id; an error for a missing folder."""
    text = os.fspath(repo_id_or_path)
    path = Path(text).expanduser()
    if path.is_dir() or (text.strip() and recover_folder(path) is not None):  # a save killed mid-swap: restored
        recover_folder(path)  # and the leftovers of earlier interrupted saves removed
        return path
    if path.exists():
        raise InvalidMixtureError(f"{text!r} is a file; give the mixture folder or a Hub repo id.")
    if has_path_syntax(repo_id_or_path):
        raise InvalidMixtureError(f"Mixture folder {text!r} does not exist.")
    return None


def _download(repo_id: str, filename: str, *, revision: str | None, what: str, **hub: Any) -> Path:
    """One file of a Hub mixture; a missing one is an error saying what the repo is instead."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        with clear_connection_errors(f"{what}, file {filename}", token=hub.get("token")):
            return Path(hf_hub_download(repo_id, filename, revision=revision, **hub, **client_identity()))
    except RemoteEntryNotFoundError:
        raise InvalidMixtureError(
            f"{what}: the repo has no {filename} at revision {revision or 'main'!r}. "
            + (
                "If it is a peft X-LoRA or original `xlora` checkpoint, import it with "
                "`xlora_hub.convert.import_mixture`."
                if filename == CONFIG_NAME
                else "It is not a complete xlora-hub mixture; push it again."
            )
        ) from None


def _local_source(folder: Path, *, revision: str | None, with_weights: bool) -> MixtureSource:
    """A local mixture folder with its config read and checked (and its classifier present, ``with_weights``)."""
    if revision is not None:
        raise InvalidMixtureError(f"`revision` applies to Hub repos only; {str(folder)!r} is a local folder.")
    config_path = resolve_inside(folder, CONFIG_NAME, what=f"Mixture {str(folder)!r}:")
    if not config_path.is_file():
        raise InvalidMixtureError(
            f"{str(folder)!r} has no {CONFIG_NAME}: it is not an xlora-hub mixture folder. For a peft X-LoRA or "
            "original `xlora` checkpoint use `xlora_hub.convert.import_mixture`."
        )
    config = read_mixture_config(config_path, what=str(folder))
    classifier = resolve_inside(folder, CLASSIFIER_WEIGHTS_NAME, what=f"Mixture {str(folder)!r}:")
    if with_weights and not classifier.is_file():
        raise InvalidMixtureError(f"{folder}: {CLASSIFIER_WEIGHTS_NAME} is missing; save the mixture again.")
    return MixtureSource(folder=folder, config=config)


def fetch_mixture(
    repo_id_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    with_weights: bool = True,
) -> MixtureSource:
    """Find a mixture folder (local, or a Hub snapshot in the cache) holding its config, and its classifier and
    bundled experts when ``with_weights``. Only those files are downloaded; the config is checked first."""
    folder = local_mixture_folder(repo_id_or_path)
    if folder is not None:
        return _local_source(folder, revision=revision, with_weights=with_weights)

    from huggingface_hub.utils import validate_repo_id

    repo_id = os.fspath(repo_id_or_path)
    validate_repo_id(repo_id)
    hub = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only, force_download=force_download)
    what = f"Mixture {repo_id!r}"
    config_path = _download(repo_id, CONFIG_NAME, revision=revision, what=what, **hub)
    commit = snapshot_sha(config_path)
    source = MixtureSource(
        folder=config_path.parent,
        config=read_mixture_config(config_path, what=f"{what} at {commit or revision or 'main'}"),
        repo_id=repo_id,
        commit=commit,
    )
    if not with_weights:
        return source
    at = commit or revision
    _download(repo_id, CLASSIFIER_WEIGHTS_NAME, revision=at, what=what, **hub)
    for name, ref in source.config.experts.items():
        if ref.path is None:
            continue
        subdir = safe_relative_path(ref.path, what=f"{what}: expert {name!r} path")
        if ref.subfolder:
            subdir = subdir / safe_relative_path(ref.subfolder, what=f"{what}: expert {name!r} subfolder")
        _download_bundled_expert(repo_id, name, str(subdir), revision=at, what=what, **hub)
    return source


def _download_bundled_expert(repo_id: str, name: str, subdir: str, *, revision: str | None, what: str, **hub: Any):
    """The adapter files of an expert bundled in a Hub mixture (safetensors only: a pickle is refused)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    for filename in EXPERT_FILES:
        try:
            with clear_connection_errors(f"{what}, bundled expert {name!r}", token=hub.get("token")):
                hf_hub_download(repo_id, f"{subdir}/{filename}", revision=revision, **hub, **client_identity())
        except RemoteEntryNotFoundError:
            if filename == ADAPTER_WEIGHTS_NAME:
                raise IncompatibleExpertError(
                    f"{what}: bundled expert {name!r} has no {subdir}/{ADAPTER_WEIGHTS_NAME}. xlora-hub loads "
                    f"safetensors only and never unpickles a downloaded {PICKLE_WEIGHTS_NAME}; re-save the adapter "
                    "with `save_pretrained(dir, safe_serialization=True)` and push the mixture again."
                ) from None
            raise ExpertNotFoundError(
                f"{what}: bundled expert {name!r} is missing ({subdir}/{filename} is not in the repo)."
            ) from None


def resolve_base_model_ref(source: MixtureSource) -> BaseModelRef:
    """The config's base model, with a relative path (``./base_model``) taken inside the mixture folder.

    A relative path is resolved against the mixture, not the working directory, so a self-contained
    folder loads from anywhere; it must stay inside the mixture and exist there. A bare name (``base_model``,
    ``gpt2``) is a folder of the mixture when it holds one, else a Hub repo id.
    """
    ref = source.config.base_model
    if ref is None:
        raise InvalidMixtureError(
            f"Mixture {source.label} names no base model; pass `base_model=` (the transformers model it was made on)."
        )
    text = ref.repo_id
    if os.path.isabs(os.path.expanduser(text)) or text.startswith("~"):
        return ref
    bare = PurePosixPath(text.replace("\\", "/"))
    explicit = has_path_syntax(text) or ".." in bare.parts
    rel = safe_relative_path(text, what=f"Mixture {source.label}: base model path") if explicit else bare
    folder = source.folder / rel
    if os.path.isdir(folder):  # False, never an error, for a name the OS cannot stat
        folder = resolve_inside(source.folder, rel, what=f"Mixture {source.label}: base model folder")
        return BaseModelRef(repo_id=str(folder.resolve()), revision=None)
    if not explicit:
        return ref  # a Hub repo id such as "gpt2" or "my-org/base"
    where = "this Hub mixture does not carry it" if source.repo_id else f"{folder} does not exist"
    raise InvalidMixtureError(
        f"Mixture {source.label} names its base model by the relative path {text!r}, but {where}; pass "
        "`base_model=` (the transformers model it was made on)."
    )


def _model_class(auto_config: Any) -> Any:
    """The transformers class named in the config's ``architectures`` (causal LM when unknown)."""
    import transformers

    for arch in getattr(auto_config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModelForCausalLM


def load_base_model(
    ref: BaseModelRef,
    *,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    torch_dtype: Any = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    quantization_config: Any = None,
) -> Any:
    """Load the base model a mixture names, at its recorded revision, with the class its config names.

    ``torch_dtype``, ``device_map``, ``max_memory``, ``offload_folder`` and ``quantization_config`` go to
    transformers' ``from_pretrained`` when set."""
    import transformers

    kwargs: dict[str, Any] = dict(
        revision=ref.revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
    )
    auto_config = transformers.AutoConfig.from_pretrained(ref.repo_id, **kwargs)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    placement = dict(
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
        quantization_config=quantization_config,
    )
    kwargs.update({k: v for k, v in placement.items() if v is not None})
    return _model_class(auto_config).from_pretrained(ref.repo_id, config=auto_config, **kwargs).eval()
