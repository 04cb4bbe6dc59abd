"""Mixtures on the Hub: fetch, load (``from_pretrained``), push (``push_to_hub``); format version 1.

The folder format lives in :mod:`.mixture_format` (checks), :mod:`.mixture_save` (writing) and
:mod:`.model_card`; :mod:`.summary` reads a mixture without weights. This module re-exports their
public names, so ``xlora_hub.hub`` stays the one import for Hub work.

A mixture is small on purpose: ``xlora_config.json`` (settings, base model, expert references, layer
names), ``xlora_classifier.safetensors`` (the gating classifier, with metadata a loader checks before
building anything) and a ``README.md`` model card. Experts stay in their own Hub repos, referenced
at a pinned commit; only experts that exist nowhere else (local folders, trained experts) are copied
into ``experts/<name>/``. All Hub I/O goes through ``huggingface_hub``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from .config import CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME, BaseModelRef, ExpertRef, XLoraConfig
from .errors import (
    ExpertNotFoundError,
    IncompatibleExpertError,
    InvalidConfigError,
    InvalidMixtureError,
)
from .experts import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PICKLE_WEIGHTS_NAME,
    ResolvedExpert,
    _snapshot_sha,
    resolve_expert,
    safe_relative_path,
)
from .finite import check_finite_tensors
from .jsonfile import read_json_object
from .mixture_format import (
    _BUNDLED_ATTR,
    CARD_TAGS,
    EXPERT_FILES,
    EXPERTS_DIR,
    LIBRARY_NAME,
    MODEL_CARD_NAME,
    _is_hub_id,
    check_classifier_file,
    classifier_metadata,
    expected_classifier_shapes,
    read_classifier_header,
    read_mixture_config,
    settings_dict,
)
from .mixture_save import _bundled_names, _plan_experts, _write_mixture, save_mixture, write_expert_files
from .model_card import _hub_url, make_model_card
from .paths import resolve_inside
from .staging import recover_folder
from .summary import ExpertSummary, MixtureSummary, inspect_mixture

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from .model import XLoraModel

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- Hub I/O helpers
def _hub_api(token: str | bool | None):
    from huggingface_hub import HfApi

    return HfApi(token=token)


def transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection-level errors (dropped or refused connections), which are not ``OSError``."""
    classes: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2, 1.x httpx
        try:
            classes.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


def hub_endpoint() -> str:
    """The Hub URL requests go to (``HF_ENDPOINT``, read by ``huggingface_hub`` at import)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def hub_connection_error(
    err: BaseException, *, what: str | None = None, token: str | bool | None = None, download: bool = True
) -> ConnectionError:
    """A transport error as a ``ConnectionError`` that names the endpoint, says what failed and how to fix it.

    The HTTP client's text is redacted (:func:`xlora_hub.redact.redact`): it can hold the token, for example as
    the repr of a header it refused.
    """
    from .redact import redact

    endpoint = hub_endpoint()
    detail = redact(" ".join(f"{type(err).__name__}: {err}".split()), [token])
    prefix = f"{what}: " if what else ""
    names = {cls.__name__ for cls in type(err).__mro__}
    if "LocalProtocolError" in names:
        text = (
            f"{prefix}the request to the Hub at {endpoint} was refused by the HTTP client ({detail}). A token with "
            "spaces or line breaks (for example read from a file with Windows line endings) cannot be sent; check "
            "the token."
        )
    elif names & {"ConnectError", "ConnectTimeout", "ProxyError"}:
        text = (
            f"{prefix}the Hub at {endpoint} could not be reached ({detail}). Check the network connection and "
            "HF_ENDPOINT (unset it for huggingface.co)"
            + (
                "; to use files already in the cache, pass `local_files_only=True` (`--offline` for the CLI "
                "commands that take it)."
                if download
                else "."
            )
        )
    else:
        text = (
            f"{prefix}the connection to the Hub at {endpoint} failed"
            + (" during the download" if download else "")
            + f" ({detail}). "
            + (
                "Nothing incomplete was kept in the cache; try again, or pass `local_files_only=True` to use cached "
                "files."
                if download
                else "Try again; check the network connection and HF_ENDPOINT."
            )
        )
    return ConnectionError(text)


@contextlib.contextmanager
def clear_connection_errors(what: str, *, token: str | bool | None = None, download: bool = True) -> Iterator[None]:
    """Turn a lost or refused connection into a ``ConnectionError`` that names what was being fetched (or
    pushed), the endpoint and the fix, with the token redacted. The client's exception is not chained: its
    text (redacted here) can hold the token."""
    try:
        yield
    except transport_errors() as err:
        raise hub_connection_error(err, what=what, token=token, download=download) from None


# ---------------------------------------------------------------------------------------------- fetch
@dataclass(frozen=True)
class _MixtureSource:
    folder: Path
    config: XLoraConfig
    repo_id: str | None = None
    commit: str | None = None

    @property
    def label(self) -> str:
        if self.repo_id is None:
            return str(self.folder)
        return self.repo_id + (f"@{self.commit[:12]}" if self.commit else "")


def _local_folder(repo_id_or_path: str | os.PathLike[str]) -> Path | None:
    """The local mixture folder named by the argument, ``None`` for a Hub repo id; an error for a missing folder."""
    text = os.fspath(repo_id_or_path)
    path = Path(text).expanduser()
    if path.is_dir() or (text.strip() and recover_folder(path) is not None):  # a save killed mid-swap: restored
        recover_folder(path)  # and the leftovers of earlier interrupted saves removed
        return path
    if path.exists():
        raise InvalidMixtureError(f"{text!r} is a file; give the mixture folder or a Hub repo id.")
    if (
        isinstance(repo_id_or_path, os.PathLike)
        or text.startswith(("./", "../", "/", "~", ".\\"))
        or os.path.isabs(text)
    ):
        raise InvalidMixtureError(f"Mixture folder {text!r} does not exist.")
    return None


def _download(repo_id: str, filename: str, *, revision: str | None, what: str, **hub_kwargs: Any) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        with clear_connection_errors(f"{what}, file {filename}", token=hub_kwargs.get("token")):
            return Path(hf_hub_download(repo_id, filename, revision=revision, **hub_kwargs))
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


def fetch_mixture(
    repo_id_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    with_weights: bool = True,
) -> _MixtureSource:
    """Find a mixture folder (local, or a Hub snapshot in the cache) holding its config, and its classifier and
    bundled experts when ``with_weights``. Only those files are downloaded; the config is checked first."""
    folder = _local_folder(repo_id_or_path)
    if folder is not None:
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
        return _MixtureSource(folder=folder, config=config)

    from huggingface_hub.utils import validate_repo_id

    repo_id = os.fspath(repo_id_or_path)
    validate_repo_id(repo_id)
    hub_kwargs = dict(
        token=token, cache_dir=cache_dir, local_files_only=local_files_only, force_download=force_download
    )
    what = f"Mixture {repo_id!r}"
    config_path = _download(repo_id, CONFIG_NAME, revision=revision, what=what, **hub_kwargs)
    commit = _snapshot_sha(str(config_path))
    source = _MixtureSource(
        folder=config_path.parent,
        config=read_mixture_config(config_path, what=f"{what} at {commit or revision or 'main'}"),
        repo_id=repo_id,
        commit=commit,
    )
    if not with_weights:
        return source
    at = commit or revision
    _download(repo_id, CLASSIFIER_WEIGHTS_NAME, revision=at, what=what, **hub_kwargs)
    for name, ref in source.config.experts.items():
        if ref.path is None:
            continue
        subdir = safe_relative_path(ref.path, what=f"{what}: expert {name!r} path")
        if ref.subfolder:
            subdir = subdir / safe_relative_path(ref.subfolder, what=f"{what}: expert {name!r} subfolder")
        _download_bundled_expert(repo_id, name, str(subdir), revision=at, what=what, **hub_kwargs)
    return source


def _download_bundled_expert(repo_id: str, name: str, subdir: str, *, revision: str | None, what: str, **kw: Any):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    for filename in EXPERT_FILES:
        try:
            with clear_connection_errors(f"{what}, bundled expert {name!r}", token=kw.get("token")):
                hf_hub_download(repo_id, f"{subdir}/{filename}", revision=revision, **kw)
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


# ---------------------------------------------------------------------------------------------- load
def _model_class(auto_config: Any):
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
    torch_dtype: torch.dtype | None = None,
    **placement: Any,
):
    """Load the base model a mixture names, at its recorded revision, with the class its config names.

    ``placement``: ``device_map``, ``max_memory``, ``offload_folder``, ``quantization_config``, passed to
    transformers' ``from_pretrained`` when set."""
    import transformers

    kwargs: dict[str, Any] = dict(
        revision=ref.revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
    )
    auto_config = transformers.AutoConfig.from_pretrained(ref.repo_id, **kwargs)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    kwargs.update({k: v for k, v in placement.items() if v is not None})
    return _model_class(auto_config).from_pretrained(ref.repo_id, config=auto_config, **kwargs).eval()


def _warn_on_base_mismatch(model: XLoraModel) -> None:
    from .experts import read_adapter_config

    base = model.xlora_config.base_model
    if base is None or not _is_hub_id(base.repo_id):
        return
    for expert in model.experts:
        trained_on = read_adapter_config(expert).get("base_model_name_or_path")
        if trained_on and _is_hub_id(trained_on) and trained_on != base.repo_id:
            logger.warning(
                "Expert %r was trained on %r but the mixture's base model is %r; its shapes fit, check it is intended.",
                expert.name,
                trained_on,
                base.repo_id,
            )


_HUB_ID_SHAPE = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _resolve_base_model_ref(source: _MixtureSource) -> BaseModelRef:
    """The config's base model, with a relative path (``./base_model``) taken inside the mixture folder.

    A relative path is resolved against the mixture, not the working directory, so a self-contained
    folder loads from anywhere; it must stay inside the mixture and exist there.
    """
    ref = source.config.base_model
    assert ref is not None
    text = ref.repo_id
    if os.path.isabs(os.path.expanduser(text)):
        return ref
    explicit = text.startswith(("./", "../", ".\\")) or ".." in PurePosixPath(text.replace("\\", "/")).parts
    if explicit:
        rel = safe_relative_path(text, what=f"Mixture {source.label}: base model path")
    elif _HUB_ID_SHAPE.match(text):
        rel = PurePosixPath(text)
    else:
        return ref
    folder = source.folder / rel
    if folder.is_dir():
        folder = resolve_inside(source.folder, rel, what=f"Mixture {source.label}: base model folder")
        return BaseModelRef(repo_id=str(folder.resolve()), revision=None)
    if not explicit:
        return ref  # a Hub repo id such as "gpt2" or "my-org/base"
    where = "this Hub mixture does not carry it" if source.repo_id else f"{folder} does not exist"
    raise InvalidMixtureError(
        f"Mixture {source.label} names its base model by the relative path {text!r}, but {where}; pass "
        "`base_model=` (the transformers model it was made on)."
    )


def load_mixture(
    repo_id_or_path: str | os.PathLike[str],
    *,
    base_model: torch.nn.Module | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    quantization_config: Any = None,
) -> XLoraModel:
    """Load a saved mixture (folder or Hub repo) with its experts and, unless given, its base model.

    Checked before anything is built: the config (format version, types, bounds, paths inside the mixture), the
    classifier's shapes against the config and its values (finite); then, while building, each expert against the base model and
    the layer names against the wrapped model.

    ``device_map``, ``max_memory``, ``offload_folder`` and ``quantization_config`` go to transformers when it
    loads the base model (and the first three to peft, which places the experts with it).
    """
    from .model import XLoraModel

    source = fetch_mixture(
        repo_id_or_path,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
    )
    classifier_path = resolve_inside(source.folder, CLASSIFIER_WEIGHTS_NAME, what=f"Mixture {source.label}:")
    check_classifier_file(classifier_path, source.config, what=f"Mixture {source.label}")
    state = load_file(str(classifier_path))  # small (bounded by the config); checked before anything is built
    check_finite_tensors(state.items(), what=f"Mixture {source.label}: {CLASSIFIER_WEIGHTS_NAME}")
    if base_model is None:
        if source.config.base_model is None:
            raise InvalidMixtureError(
                f"Mixture {source.label} names no base model; pass `base_model=` (the transformers model it was made on)."
            )
        base_ref = _resolve_base_model_ref(source)
        with clear_connection_errors(f"Mixture {source.label}: base model {base_ref.repo_id!r}", token=token):
            base_model = load_base_model(
                base_ref,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                torch_dtype=torch_dtype,
                device_map=device_map,
                max_memory=max_memory,
                offload_folder=offload_folder,
                quantization_config=quantization_config,
            )
    with clear_connection_errors(f"Mixture {source.label}: experts {source.config.expert_names}", token=token):
        model = XLoraModel.from_experts(
            base_model,
            source.config,
            device=device,
            torch_dtype=torch_dtype,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
            base_dir=source.folder,
            max_memory=max_memory,
            offload_folder=offload_folder,
        )
    model.classifier.load_state_dict(state, strict=True)
    setattr(model, _BUNDLED_ATTR, frozenset(name for name, ref in source.config.experts.items() if not ref.is_hub))
    _warn_on_base_mismatch(model)
    return model.eval()


# ---------------------------------------------------------------------------------------------- push
def _pin(expert: ResolvedExpert, api: Any) -> ExpertRef:
    """The expert's Hub ref pinned to a commit sha: the one it was loaded at, or the one its revision names now."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    ref = expert.ref
    if ref.is_pinned:
        return ref
    sha = expert.commit_sha
    if not sha:
        try:
            sha = api.model_info(ref.repo_id, revision=ref.revision).sha
        except RepositoryNotFoundError as err:
            raise ExpertNotFoundError(
                f"Expert {expert.name!r}: Hub repo {ref.repo_id!r} was not found (or the token cannot read it); "
                "cannot pin it before pushing."
            ) from err
        except RevisionNotFoundError as err:
            raise ExpertNotFoundError(
                f"Expert {expert.name!r}: revision {ref.revision!r} does not exist in {ref.repo_id!r}."
            ) from err
    return ExpertRef(repo_id=ref.repo_id, revision=sha, subfolder=ref.subfolder)


def _pin_base_model(ref: BaseModelRef | None, api: Any) -> BaseModelRef | None:
    """The base model pinned to the commit its revision names now (Hub ids only; a local folder stays as it is)."""
    from huggingface_hub.errors import HfHubHTTPError

    if ref is None or not _is_hub_id(ref.repo_id) or (ref.revision and re.fullmatch(r"[0-9a-f]{40}", ref.revision)):
        return ref
    try:
        sha = api.model_info(ref.repo_id, revision=ref.revision).sha
    except (HfHubHTTPError, OSError) as err:  # the base may be a private model the token cannot read
        from .redact import redact

        why = redact(" ".join(str(err).split()), [getattr(api, "token", None)])
        logger.warning("Could not pin base model %r to a commit (%s); it stays unpinned.", ref.repo_id, why)
        return ref
    return BaseModelRef(repo_id=ref.repo_id, revision=sha, quantization=ref.quantization) if sha else ref


def expert_repo_id(repo_id: str, name: str) -> str:
    """Where ``push_local_experts=True`` pushes a local expert: ``<mixture repo>-<expert name>``."""
    return f"{repo_id}-{name.replace('_', '-')}"


def _push_expert(api: Any, expert: ResolvedExpert, repo_id: str, *, mixture: str, private: bool | None) -> ExpertRef:
    """Push a local expert's adapter files (and a small card) to its own repo; return the pinned ref."""
    from huggingface_hub import ModelCard, ModelCardData

    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xlora-expert-") as tmp:
        folder = Path(tmp)
        for filename in EXPERT_FILES:
            shutil.copyfile(expert.local_dir / filename, folder / filename)
        _drop_local_base_paths(folder)
        adapter = read_json_object(folder / ADAPTER_CONFIG_NAME)
        base = adapter.get("base_model_name_or_path")
        data = ModelCardData(
            base_model=base if _is_hub_id(base) else None, library_name="peft", tags=["lora", "x-lora-expert"]
        )
        body = (
            f"\n# {repo_id}\n\nLoRA expert `{expert.name}` of the X-LoRA mixture [{mixture}]({_hub_url(mixture, None, None)}), "
            "pushed by xlora-hub. A plain peft LoRA adapter.\n"
        )
        ModelCard(f"---\n{data.to_yaml()}\n---\n{body}").save(str(folder / MODEL_CARD_NAME))
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=f"Upload LoRA expert {expert.name!r} (xlora-hub)"
        )
    sha = getattr(info, "oid", None)
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{40}", sha)):
        sha = api.model_info(repo_id).sha
    return ExpertRef(repo_id=repo_id, revision=sha)


def push_mixture(
    model: XLoraModel,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    branch: str | None = None,
    create_pr: bool = False,
    bundle_experts: bool = False,
    push_local_experts: bool = False,
    revision: str | None = None,
    base_model: str | None = None,
) -> CommitInfo:
    """Push the mixture to ``repo_id`` in one commit, every Hub expert (and the base model) pinned to a commit first.

    Experts that are only local folders are bundled (``bundle_experts=True``), pushed to their own repos
    ``<repo_id>-<name>`` (``push_local_experts=True``, with the same ``private``), or refused before anything
    is pushed. Trained experts are always bundled. ``revision`` is an alias of ``branch``.

    ``base_model`` is the Hub repo id to record as the base model (for a mixture made on a local copy of it).
    A local base model folder is never written into the pushed files: without ``base_model`` the pushed
    config records none (with a warning), and its users pass ``base_model=`` when loading. A lost or refused
    connection is a ``ConnectionError`` naming the endpoint.
    """
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    if branch is not None and revision is not None and branch != revision:
        raise ValueError(f"`branch={branch!r}` and `revision={revision!r}` disagree; give one of them.")
    branch = branch or revision
    trained = model.xlora_config.use_trainable_adapters
    already_bundled = _bundled_names(model)
    local = [
        e
        for e in model.experts
        if not e.ref.is_hub and not trained and (push_local_experts or e.name not in already_bundled)
    ]
    if local and not (bundle_experts or push_local_experts):
        names = ", ".join(f"{e.name!r} ({e.local_dir})" for e in local)
        raise InvalidMixtureError(
            f"Expert(s) {names} exist only as local folders, so the pushed mixture could not reference them. Pass "
            "`bundle_experts=True` to copy them into the mixture repo, or `push_local_experts=True` to push each "
            f"to its own repo ({expert_repo_id(repo_id, local[0].name)!r}, ...). Nothing was pushed."
        )
    if base_model is not None:
        validate_repo_id(base_model)
    with clear_connection_errors(f"Pushing the mixture to {repo_id!r}", token=token, download=False):
        return _push(
            model,
            repo_id,
            local,
            token=token,
            private=private,
            commit_message=commit_message,
            branch=branch,
            create_pr=create_pr,
            bundle_experts=bundle_experts,
            push_local_experts=push_local_experts,
            base_model=base_model,
        )


def _push(model: XLoraModel, repo_id: str, local: list[ResolvedExpert], *, token: str | bool | None, **options: Any):
    """The Hub side of :func:`push_mixture` (its arguments checked): pin, push local experts, upload the folder."""
    private, branch, bundle_experts = options["private"], options["branch"], options["bundle_experts"]
    trained = model.xlora_config.use_trainable_adapters
    api = _hub_api(token)
    overrides: dict[str, ExpertRef] = {}
    if not trained and not bundle_experts:
        for expert in model.experts:
            if expert.ref.is_hub:
                overrides[expert.name] = _pin(expert, api)
        if options["push_local_experts"]:
            for expert in local:
                repo = expert_repo_id(repo_id, expert.name)
                overrides[expert.name] = _push_expert(api, expert, repo, mixture=repo_id, private=private)
    plans = _plan_experts(model, bundle_experts=bundle_experts, overrides=overrides)
    with tempfile.TemporaryDirectory(prefix="xlora-mixture-") as tmp:
        base = _pushed_base_model(model, repo_id, options["base_model"], api)
        config = _write_mixture(model, Path(tmp), plans, repo_id=repo_id, base_model=base)
        if base is None and model.xlora_config.base_model is not None:
            config = config.replace(base_model=None)
            config.save(Path(tmp) / CONFIG_NAME)
            make_model_card(config, repo_id=repo_id).save(str(Path(tmp) / MODEL_CARD_NAME))
        _drop_local_base_paths(Path(tmp) / EXPERTS_DIR)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch is not None:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=options["commit_message"]
            or f"Upload X-LoRA mixture of {config.n_experts} experts (xlora-hub)",
            revision=branch,
            create_pr=options["create_pr"],
            delete_patterns=[f"{EXPERTS_DIR}/**"],
        )


def _pushed_base_model(model: XLoraModel, repo_id: str, given: str | None, api: Any) -> BaseModelRef | None:
    """The base model the pushed config records: ``given`` (a Hub id) or the model's own, pinned; ``None``
    for a local folder, whose path means nothing on another machine (and must not be published)."""
    if given is not None:
        return _pin_base_model(BaseModelRef(repo_id=given), api)
    base = _pin_base_model(model.xlora_config.base_model, api)
    if base is not None and _is_local_ref(base.repo_id):
        logger.warning(
            "The base model of %r is the local folder %r: the pushed mixture records no base model (a local path "
            "is never published), so its users must pass `base_model=` when loading it. To record it, push the "
            "base model to the Hub and pass its repo id: `push_to_hub(repo_id, base_model='owner/name')` "
            "(`xlora-hub push ... --base-model owner/name`).",
            repo_id,
            base.repo_id,
        )
        return None
    return base


def _drop_local_base_paths(folder: Path) -> None:
    """Clear a local ``base_model_name_or_path`` in the peft adapter configs under ``folder`` before they are
    pushed: peft records the folder the expert was trained on, a path on this machine."""
    for path in sorted(folder.rglob(ADAPTER_CONFIG_NAME)) if folder.is_dir() else []:
        data = read_json_object(path)
        value = data.get("base_model_name_or_path")
        if isinstance(value, str) and value and not _is_hub_id(value):
            data["base_model_name_or_path"] = None
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- download
BASE_MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
"""Files of a base model fetched by :func:`download_mixture`: configs, safetensors weights, tokenizer files (never pickles)."""


def _is_local_ref(value: str) -> bool:
    return not _is_hub_id(value)


@dataclass
class DownloadResult:
    """What :func:`download_mixture` put in the cache (or the local folder), each with the commit it resolved to."""

    mixture: str
    folder: Path
    commit: str | None
    experts: dict[str, str] = field(default_factory=dict)
    base_model: str | None = None


def download_mixture(
    repo_id_or_path: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    include_base_model: bool = True,
) -> DownloadResult:
    """Download a mixture, each Hub expert at its pinned revision and the base model, so it loads offline.

    The mixture's files go to the cache (or ``local_dir``); experts and the base model go to the cache.
    A local mixture folder only has its Hub experts and base model fetched.
    """
    from huggingface_hub import snapshot_download

    hub = dict(token=token, cache_dir=cache_dir)
    if _is_local_ref(repo_id_or_path):
        if local_dir is not None:
            raise InvalidConfigError(f"--local-dir applies to Hub mixtures; {repo_id_or_path!r} is already local.")
        source = fetch_mixture(repo_id_or_path, revision=revision)
        folder, config, commit, label = source.folder, source.config, None, str(source.folder)
    else:
        source = fetch_mixture(repo_id_or_path, revision=revision, with_weights=False, **hub)  # config checked first
        commit, label = source.commit, repo_id_or_path
        folder = Path(snapshot_download(repo_id_or_path, revision=commit or revision, local_dir=local_dir, **hub))
        config = read_mixture_config(folder / "xlora_config.json", what=f"Mixture {label!r}")
        check_classifier_file(folder / CLASSIFIER_WEIGHTS_NAME, config, what=f"Mixture {label!r}")
    result = DownloadResult(mixture=label, folder=folder, commit=commit)
    for name, ref in config.experts.items():
        if ref.is_hub:
            expert = resolve_expert(name, ref, **hub)
            result.experts[name] = str(expert.pinned_ref())
        else:
            resolve_expert(name, ref, base_dir=folder)  # bundled: check its files are there
            result.experts[name] = f"bundled ({ref.path})"
    base = config.base_model
    if include_base_model and base is not None and not _is_local_ref(base.repo_id):
        path = snapshot_download(base.repo_id, revision=base.revision, allow_patterns=BASE_MODEL_PATTERNS, **hub)
        result.base_model = f"{base.repo_id}@{Path(path).name}"
    elif base is not None:
        result.base_model = f"{base.repo_id} (local folder, not downloaded)" if _is_local_ref(base.repo_id) else None
    return result


__all__ = [
    "CARD_TAGS",
    "EXPERT_FILES",
    "EXPERTS_DIR",
    "LIBRARY_NAME",
    "MODEL_CARD_NAME",
    "ExpertSummary",
    "MixtureSummary",
    "check_classifier_file",
    "classifier_metadata",
    "clear_connection_errors",
    "download_mixture",
    "DownloadResult",
    "expected_classifier_shapes",
    "expert_repo_id",
    "fetch_mixture",
    "inspect_mixture",
    "load_base_model",
    "load_mixture",
    "make_model_card",
    "push_mixture",
    "read_classifier_header",
    "read_mixture_config",
    "save_mixture",
    "settings_dict",
    "transport_errors",
    "write_expert_files",
]
