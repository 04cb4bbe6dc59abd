"""Mixture folders and Hub repos: save, load, push and inspect (format version 1, see ``docs/format.md``).

A mixture is small on purpose: ``xlora_config.json`` (settings, base model, expert references, layer
names), ``xlora_classifier.safetensors`` (the gating classifier, with metadata a loader checks before
building anything) and a ``README.md`` model card. Experts stay in their own Hub repos, referenced
at a pinned commit; only experts that exist nowhere else (local folders, trained experts) are copied
into ``experts/<name>/``. All Hub I/O goes through ``huggingface_hub``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME, FORMAT_VERSION, BaseModelRef, ExpertRef, XLoraConfig
from .errors import (
    ExpertNotFoundError,
    IncompatibleExpertError,
    InvalidConfigError,
    InvalidMixtureError,
    UnsupportedFormatError,
)
from .experts import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PICKLE_WEIGHTS_NAME,
    ResolvedExpert,
    _snapshot_sha,
    safe_relative_path,
)

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from .model import XLoraModel

logger = logging.getLogger(__name__)

MODEL_CARD_NAME = "README.md"
EXPERTS_DIR = "experts"
LIBRARY_NAME = "xlora-hub"
CARD_TAGS = ("x-lora", "lora", "mixture-of-experts")
EXPERT_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)

# Settings shown in the card and the summary (everything in XLoraConfig but the structural fields).
_STRUCTURAL = {"experts", "base_model", "hidden_size", "layer_names"}
_BUNDLED_ATTR = "_xlora_hub_bundled_experts"
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


# ---------------------------------------------------------------------------------------------- helpers
def _is_hub_id(value: str | None) -> bool:
    """True for a string that names a Hub repo rather than a local folder."""
    return bool(value) and bool(_HUB_ID_RE.match(value)) and not os.path.exists(os.path.expanduser(value))


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


@contextlib.contextmanager
def clear_connection_errors(what: str) -> Iterator[None]:
    """Turn a lost connection during a download into a ``ConnectionError`` that names what was being fetched."""
    try:
        yield
    except transport_errors() as err:
        raise ConnectionError(
            f"{what}: the connection to the Hub failed during the download ({type(err).__name__}: {err}). Nothing "
            "incomplete was kept in the cache; try again, or pass `local_files_only=True` to use cached files."
        ) from err


def settings_dict(config: XLoraConfig) -> dict[str, Any]:
    """The routing/classifier settings of a config (no experts, base model or layer names)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _STRUCTURAL}


def expected_classifier_shapes(config: XLoraConfig) -> dict[str, list[int]]:
    """Tensor name -> shape of the classifier a config describes, built on the meta device (no memory, no weights)."""
    from .classifier import XLoraClassifier

    if config.hidden_size is None or config.layer_names is None:
        raise InvalidMixtureError(
            "The mixture config has no `hidden_size` or `layer_names`; it was not written by `save_pretrained`. "
            "Rebuild the mixture with `XLoraModel.from_experts` and save it again."
        )
    classifier = XLoraClassifier(
        config,
        hidden_size=config.hidden_size,
        n_layers=len(config.layer_names),
        n_experts=config.n_experts,
        device="meta",
    )
    return classifier.shapes()


def classifier_metadata(config: XLoraConfig) -> dict[str, str]:
    """safetensors metadata (strings only) that lets a loader check the classifier before building a model."""
    return {
        "format": "pt",
        "xlora_format_version": str(FORMAT_VERSION),
        "n_layers": str(len(config.layer_names or [])),
        "n_experts": str(config.n_experts),
        "hidden_size": str(config.hidden_size),
        "xlora_depth": str(config.xlora_depth),
        "xlora_size": str(config.xlora_size),
        "layerwise_scalings": json.dumps(config.layerwise_scalings),
        "expert_names": json.dumps(config.expert_names),
    }


def read_classifier_header(path: Path, *, what: str) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Shapes and metadata of a safetensors file, from its header only; a clear error when it is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
            metadata = dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise InvalidMixtureError(
            f"{what}: {path.name} is not a readable safetensors file ({err}). It may be truncated or corrupt: "
            "download it again with `force_download=True`, or save the mixture again."
        ) from None
    return shapes, metadata


def check_classifier_file(path: Path, config: XLoraConfig, *, what: str) -> None:
    """Compare the classifier file's header (shapes and metadata) with the config before anything is built."""
    shapes, metadata = read_classifier_header(path, what=what)
    expected = expected_classifier_shapes(config)
    facts = {
        "n_layers": len(config.layer_names or []),
        "n_experts": config.n_experts,
        "hidden_size": config.hidden_size,
    }
    for key, value in facts.items():
        if key in metadata and metadata[key] != str(value):
            raise InvalidMixtureError(
                f"{what}: the classifier was saved for {key}={metadata[key]} but {CONFIG_NAME} says {value}; "
                "the two files come from different mixtures. Save the mixture again."
            )
    if shapes != expected:
        missing = sorted(set(expected) - set(shapes))
        extra = sorted(set(shapes) - set(expected))
        wrong = {k: (shapes[k], expected[k]) for k in expected if k in shapes and shapes[k] != expected[k]}
        detail = "; ".join(
            part
            for part in (
                f"missing {missing}" if missing else "",
                f"unexpected {extra}" if extra else "",
                ", ".join(f"{k} has shape {got}, expected {exp}" for k, (got, exp) in wrong.items()),
            )
            if part
        )
        raise InvalidMixtureError(
            f"{what}: {CLASSIFIER_WEIGHTS_NAME} does not match {CONFIG_NAME} ({detail}). The config describes "
            f"{config.n_experts} experts, {len(config.layer_names or [])} layers, hidden size {config.hidden_size}, "
            f"xlora_depth={config.xlora_depth}, layerwise_scalings={config.layerwise_scalings}."
        )


def read_mixture_config(path: Path, *, what: str) -> XLoraConfig:
    """Read and validate ``xlora_config.json``; every path inside it must stay inside the mixture."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidConfigError(f"{what}: {CONFIG_NAME} is not valid JSON ({err}).") from None
    if isinstance(data, dict) and "format_version" not in data and ("adapters" in data or "base_model_id" in data):
        raise UnsupportedFormatError(
            f"{what}: {CONFIG_NAME} is in the original `xlora` package / mistral.rs format, not xlora-hub's. "
            "Import it with `xlora_hub.convert.import_mixture(...)`."
        )
    config = XLoraConfig.from_dict(data, source=f"{what}: {CONFIG_NAME}")
    if config.hidden_size is None or config.layer_names is None:
        raise InvalidConfigError(
            f"{what}: {CONFIG_NAME} is missing `hidden_size` or `layer_names`, which `save_pretrained` always writes."
        )
    for name, ref in config.experts.items():
        if ref.path is not None:
            safe_relative_path(ref.path, what=f"{what}: expert {name!r} path")
        if ref.subfolder is not None:
            safe_relative_path(ref.subfolder, what=f"{what}: expert {name!r} subfolder")
    return config


# ---------------------------------------------------------------------------------------------- save
@dataclass(frozen=True)
class _ExpertPlan:
    """How one expert is written: as a reference, copied from a folder, or exported from the live (trained) model."""

    name: str
    ref: ExpertRef
    copy_from: Path | None = None
    export_trained: bool = False

    @property
    def bundled(self) -> bool:
        return self.copy_from is not None or self.export_trained


def _bundled_names(model: XLoraModel) -> frozenset[str]:
    return frozenset(getattr(model, _BUNDLED_ATTR, frozenset()))


def _plan_experts(
    model: XLoraModel, *, bundle_experts: bool, overrides: dict[str, ExpertRef] | None = None
) -> list[_ExpertPlan]:
    trained = model.xlora_config.use_trainable_adapters
    overrides = overrides or {}
    plans = []
    for expert in model.experts:
        bundled_ref = ExpertRef(path=f"{EXPERTS_DIR}/{expert.name}")
        if trained:
            plans.append(_ExpertPlan(expert.name, bundled_ref, export_trained=True))
        elif expert.name in overrides:
            plans.append(_ExpertPlan(expert.name, overrides[expert.name]))
        elif bundle_experts or not expert.ref.is_hub:
            plans.append(_ExpertPlan(expert.name, bundled_ref, copy_from=expert.local_dir))
        else:
            plans.append(_ExpertPlan(expert.name, expert.ref))
    return plans


def write_expert_files(model: XLoraModel, expert: ResolvedExpert, dest: Path, *, from_model: bool) -> None:
    """Write one expert as a peft adapter folder (config + safetensors) into ``dest``.

    ``from_model`` exports the live weights (trained experts); otherwise the expert's files are copied.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if not from_model:
        for filename in EXPERT_FILES:
            source = expert.local_dir / filename
            if not source.is_file():
                raise ExpertNotFoundError(
                    f"Expert {expert.name!r}: {source} is missing; cannot copy it into the mixture."
                )
            shutil.copyfile(source, dest / filename)
        return
    # peft's own key layout for one adapter: "<module>.lora_A.<name>.weight" is saved as "<module>.lora_A.weight".
    peft_model = model.peft_model
    pattern = re.compile(rf"\.(lora_[A-Za-z_]+)\.{re.escape(expert.name)}(?=\.|$)")
    state = {}
    for key, value in peft_model.state_dict().items():
        renamed, found = pattern.subn(r".\1", key)
        if found:
            state[renamed] = value.detach().to("cpu").contiguous()
    if not state:
        raise IncompatibleExpertError(f"Expert {expert.name!r}: no LoRA weights found in the model to save.")
    save_file(state, str(dest / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    peft_config = copy.deepcopy(peft_model.peft_config[expert.name])
    peft_config.inference_mode = True
    peft_config.save_pretrained(str(dest))


def _write_mixture(
    model: XLoraModel,
    folder: Path,
    plans: list[_ExpertPlan],
    *,
    repo_id: str | None = None,
    base_model: BaseModelRef | None = None,
) -> XLoraConfig:
    """Write the three files (and bundled experts) of a mixture into an empty ``folder``."""
    by_name = {expert.name: expert for expert in model.experts}
    for plan in plans:
        if plan.bundled:
            write_expert_files(
                model, by_name[plan.name], folder / EXPERTS_DIR / plan.name, from_model=plan.export_trained
            )
    config = model.xlora_config.replace(experts={plan.name: plan.ref for plan in plans})
    if base_model is not None:
        config = config.replace(base_model=base_model)
    state = {key: value.detach().to("cpu").contiguous() for key, value in model.classifier.state_dict().items()}
    save_file(state, str(folder / CLASSIFIER_WEIGHTS_NAME), metadata=classifier_metadata(config))
    config.save(folder / CONFIG_NAME)
    make_model_card(config, repo_id=repo_id).save(str(folder / MODEL_CARD_NAME))
    return config


def _install(source: Path, target: Path) -> None:
    """Move a written mixture into ``target``; each file and expert folder is replaced atomically."""
    if not target.exists():
        os.replace(source, target)
        return
    experts = source / EXPERTS_DIR
    if experts.is_dir():
        (target / EXPERTS_DIR).mkdir(exist_ok=True)
        for folder in sorted(experts.iterdir()):
            final = target / EXPERTS_DIR / folder.name
            trash = None
            if final.exists():
                trash = source / f".old-{folder.name}"
                os.replace(final, trash)
            os.replace(folder, final)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
    for name in (CLASSIFIER_WEIGHTS_NAME, MODEL_CARD_NAME, CONFIG_NAME):  # config last: it names the rest
        os.replace(source / name, target / name)


def save_mixture(model: XLoraModel, save_directory: str | os.PathLike[str], *, bundle_experts: bool = False) -> Path:
    """Write a mixture folder: config, classifier, model card, and the experts that live nowhere else.

    Hub experts stay references (``bundle_experts=True`` copies them too, for a self-contained folder).
    Local-folder experts are always copied into ``experts/<name>/`` and referenced relatively, and trained
    experts (``use_trainable_adapters``) are exported from the model, so a saved mixture never points at
    an absolute path. Everything is written to a temporary folder first, then moved in place.
    """
    target = Path(save_directory).expanduser()
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{str(target)!r} is a file; `save_pretrained` needs a folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    plans = _plan_experts(model, bundle_experts=bundle_experts)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_mixture(model, tmp, plans)
        _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------- model card
def _hub_url(repo_id: str, revision: str | None, subfolder: str | None) -> str:
    from huggingface_hub import constants

    url = f"{constants.ENDPOINT.rstrip('/')}/{repo_id}/tree/{revision or 'main'}"
    return url + (f"/{subfolder}" if subfolder else "")


def _expert_row(index: int, name: str, ref: ExpertRef) -> str:
    if ref.is_hub:
        source = f"[{ref.repo_id}]({_hub_url(ref.repo_id, ref.revision, ref.subfolder)})"
        revision = f"`{ref.revision[:12] if ref.is_pinned else ref.revision}`" if ref.revision else "latest (unpinned)"
    else:
        source = f"bundled: [`{ref.path}`]({ref.path})"
        revision = "this repo"
    return f"| {index} | `{name}` | {source} | {revision} | {ref.subfolder or ''} |"


def make_model_card(config: XLoraConfig, *, repo_id: str | None = None):
    """A ``huggingface_hub.ModelCard`` for a mixture: metadata, expert table, settings and a usage snippet."""
    from huggingface_hub import ModelCard, ModelCardData

    base = config.base_model
    data = ModelCardData(
        base_model=base.repo_id if base is not None and _is_hub_id(base.repo_id) else None,
        library_name=LIBRARY_NAME,
        tags=list(CARD_TAGS),
    )
    shapes = expected_classifier_shapes(config)
    n_params = sum(int(torch.Size(shape).numel()) for shape in shapes.values())
    base_text = (f"`{base.repo_id}`" + (f" at `{base.revision}`" if base.revision else "")) if base else "a base model"
    title = repo_id or "X-LoRA mixture"
    rows = "\n".join(_expert_row(i, name, ref) for i, (name, ref) in enumerate(config.experts.items()))
    settings = "\n".join(f"| `{key}` | `{json.dumps(value)}` |" for key, value in settings_dict(config).items())
    load_id = repo_id or "path/to/this/folder"
    n_hub = sum(ref.is_hub for ref in config.experts.values())
    where = (
        f"*references* to {n_hub} expert repos, each pinned to a commit so the mixture never changes under its users"
        if n_hub
        else "no reference to other repos"
    )
    if n_hub < config.n_experts:
        where += f"; {config.n_experts - n_hub} expert(s) are bundled in `{EXPERTS_DIR}/`"
    body = f"""
# {title}

An [X-LoRA](https://arxiv.org/abs/2402.07148) mixture of {config.n_experts} LoRA experts over {base_text}, made with
xlora-hub. This repo holds the gating classifier ({n_params:,d} parameters, {len(config.layer_names or [])} X-LoRA
layers, hidden size {config.hidden_size}) and {where}.

## Experts

| # | Expert | Source | Revision | Subfolder |
|---|---|---|---|---|
{rows}

## X-LoRA settings

| Setting | Value |
|---|---|
{settings}

## Usage

```python
from xlora_hub import XLoraModel

# Downloads the classifier, each expert at its pinned revision, and the base model.
model = XLoraModel.from_pretrained("{load_id}")
```

`xlora_hub.inspect_mixture("{load_id}")` shows the experts and settings without downloading any weights.
Files: `{CONFIG_NAME}` (xlora-hub format version {FORMAT_VERSION}), `{CLASSIFIER_WEIGHTS_NAME}`.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


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
    if path.is_dir():
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
        with clear_connection_errors(f"{what}, file {filename}"):
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
        if not (folder / CONFIG_NAME).is_file():
            raise InvalidMixtureError(
                f"{str(folder)!r} has no {CONFIG_NAME}: it is not an xlora-hub mixture folder. For a peft X-LoRA or "
                "original `xlora` checkpoint use `xlora_hub.convert.import_mixture`."
            )
        config = read_mixture_config(folder / CONFIG_NAME, what=str(folder))
        if with_weights and not (folder / CLASSIFIER_WEIGHTS_NAME).is_file():
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
            with clear_connection_errors(f"{what}, bundled expert {name!r}"):
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
):
    """Load the base model a mixture names, at its recorded revision, with the class its config names."""
    import transformers

    kwargs: dict[str, Any] = dict(
        revision=ref.revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
    )
    auto_config = transformers.AutoConfig.from_pretrained(ref.repo_id, **kwargs)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
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
) -> XLoraModel:
    """Load a saved mixture (folder or Hub repo) with its experts and, unless given, its base model.

    Checked before anything is built: the config (format version, types, paths inside the mixture), the
    classifier's shapes against the config; then, while building, each expert against the base model and
    the layer names against the wrapped model.
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
    classifier_path = source.folder / CLASSIFIER_WEIGHTS_NAME
    check_classifier_file(classifier_path, source.config, what=f"Mixture {source.label}")
    if base_model is None:
        if source.config.base_model is None:
            raise InvalidMixtureError(
                f"Mixture {source.label} names no base model; pass `base_model=` (the transformers model it was made on)."
            )
        with clear_connection_errors(f"Mixture {source.label}: base model {source.config.base_model.repo_id!r}"):
            base_model = load_base_model(
                source.config.base_model,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                torch_dtype=torch_dtype,
            )
    with clear_connection_errors(f"Mixture {source.label}: experts {source.config.expert_names}"):
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
        )
    state = load_file(str(classifier_path))
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
        logger.warning("Could not pin base model %r to a commit (%s); it stays unpinned.", ref.repo_id, err)
        return ref
    return BaseModelRef(repo_id=ref.repo_id, revision=sha) if sha else ref


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
        adapter = json.loads((folder / ADAPTER_CONFIG_NAME).read_text(encoding="utf-8"))
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
) -> CommitInfo:
    """Push the mixture to ``repo_id`` in one commit, every Hub expert (and the base model) pinned to a commit first.

    Experts that are only local folders are bundled (``bundle_experts=True``), pushed to their own repos
    ``<repo_id>-<name>`` (``push_local_experts=True``, with the same ``private``), or refused before anything
    is pushed. Trained experts are always bundled. ``revision`` is an alias of ``branch``.
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
    api = _hub_api(token)
    overrides: dict[str, ExpertRef] = {}
    if not trained and not bundle_experts:
        for expert in model.experts:
            if expert.ref.is_hub:
                overrides[expert.name] = _pin(expert, api)
        if push_local_experts:
            for expert in local:
                repo = expert_repo_id(repo_id, expert.name)
                overrides[expert.name] = _push_expert(api, expert, repo, mixture=repo_id, private=private)
    plans = _plan_experts(model, bundle_experts=bundle_experts, overrides=overrides)
    with tempfile.TemporaryDirectory(prefix="xlora-mixture-") as tmp:
        base = _pin_base_model(model.xlora_config.base_model, api)
        config = _write_mixture(model, Path(tmp), plans, repo_id=repo_id, base_model=base)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch is not None:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message or f"Upload X-LoRA mixture of {config.n_experts} experts (xlora-hub)",
            revision=branch,
            create_pr=create_pr,
            delete_patterns=[f"{EXPERTS_DIR}/**"],
        )


# ---------------------------------------------------------------------------------------------- inspect
@dataclass(frozen=True)
class ExpertSummary:
    """One expert of a mixture, as its config names it (``kind``: ``hub`` or ``bundled``)."""

    name: str
    kind: str
    repo_id: str | None
    revision: str | None
    subfolder: str | None
    path: str | None
    pinned: bool
    size_bytes: int | None = None


@dataclass(frozen=True)
class MixtureSummary:
    """What a mixture is made of, read from its config (and file sizes), with no weights loaded."""

    source: str
    commit: str | None
    format_version: int
    base_model: BaseModelRef | None
    hidden_size: int | None
    n_layers: int
    n_experts: int
    experts: list[ExpertSummary]
    settings: dict[str, Any]
    classifier_parameters: int
    classifier_size_bytes: int | None = None

    def __str__(self) -> str:
        base = self.base_model
        lines = [
            f"X-LoRA mixture {self.source}" + (f" @ {self.commit}" if self.commit else ""),
            f"  format version {self.format_version}; base model "
            + (f"{base.repo_id}" + (f" @ {base.revision}" if base.revision else "") if base else "(not recorded)"),
            f"  {self.n_experts} experts, {self.n_layers} X-LoRA layers, hidden size {self.hidden_size}, "
            f"classifier {self.classifier_parameters:,d} parameters"
            + (f" ({_size(self.classifier_size_bytes)})" if self.classifier_size_bytes is not None else ""),
            "  experts:",
        ]
        for i, e in enumerate(self.experts):
            where = e.path if e.kind == "bundled" else f"{e.repo_id}@{e.revision or 'main'}"
            where += f":{e.subfolder}" if e.subfolder else ""
            pin = "" if e.kind == "bundled" or e.pinned else " (unpinned)"
            size = f" {_size(e.size_bytes)}" if e.size_bytes is not None else ""
            lines.append(f"    {i}. {e.name}: {e.kind} {where}{pin}{size}")
        lines.append("  settings: " + ", ".join(f"{k}={v!r}" for k, v in self.settings.items()))
        return "\n".join(lines)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _remote_sizes(api: Any, repo_id: str, paths: list[str], revision: str | None) -> dict[str, int]:
    from huggingface_hub.errors import HfHubHTTPError

    try:
        infos = api.get_paths_info(repo_id, paths, revision=revision)
    except (HfHubHTTPError, OSError) as err:
        logger.info("Could not read file sizes of %s: %s", repo_id, err)
        return {}
    return {info.path: info.size for info in infos if getattr(info, "size", None) is not None}


def inspect_mixture(
    repo_id_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> MixtureSummary:
    """Summarise a mixture (experts, revisions, sizes, settings) from its config alone: no weights are downloaded.

    Sizes come from the folder, or from the Hub's file metadata (``None`` offline or when unavailable).
    """
    source = fetch_mixture(
        repo_id_or_path,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        with_weights=False,
    )
    config = source.config
    api = _hub_api(token) if not local_files_only else None

    def bundled_path(ref: ExpertRef) -> str:
        rel = str(safe_relative_path(ref.path or "", what="expert path"))
        return f"{rel}/{ref.subfolder}" if ref.subfolder else rel

    classifier_size: int | None = None
    bundled_sizes: dict[str, int] = {}
    if source.repo_id is None:
        file = source.folder / CLASSIFIER_WEIGHTS_NAME
        classifier_size = file.stat().st_size if file.is_file() else None
        for ref in config.experts.values():
            if not ref.is_hub:
                weights = source.folder / bundled_path(ref) / ADAPTER_WEIGHTS_NAME
                if weights.is_file():
                    bundled_sizes[bundled_path(ref)] = weights.stat().st_size
    elif api is not None:
        wanted = [CLASSIFIER_WEIGHTS_NAME] + [
            f"{bundled_path(ref)}/{ADAPTER_WEIGHTS_NAME}" for ref in config.experts.values() if not ref.is_hub
        ]
        sizes = _remote_sizes(api, source.repo_id, wanted, source.commit or revision)
        classifier_size = sizes.get(CLASSIFIER_WEIGHTS_NAME)
        bundled_sizes = {
            path.rsplit("/", 1)[0]: size for path, size in sizes.items() if path != CLASSIFIER_WEIGHTS_NAME
        }

    experts = []
    for name, ref in config.experts.items():
        if ref.is_hub:
            size = None
            if api is not None:
                path = f"{ref.subfolder}/{ADAPTER_WEIGHTS_NAME}" if ref.subfolder else ADAPTER_WEIGHTS_NAME
                size = _remote_sizes(api, ref.repo_id, [path], ref.revision).get(path)
            experts.append(
                ExpertSummary(name, "hub", ref.repo_id, ref.revision, ref.subfolder, None, ref.is_pinned, size)
            )
        else:
            rel = bundled_path(ref)
            experts.append(
                ExpertSummary(name, "bundled", None, None, ref.subfolder, ref.path, True, bundled_sizes.get(rel))
            )
    shapes = expected_classifier_shapes(config)
    return MixtureSummary(
        source=source.repo_id or str(source.folder),
        commit=source.commit,
        format_version=json.loads((source.folder / CONFIG_NAME).read_text(encoding="utf-8"))["format_version"],
        base_model=config.base_model,
        hidden_size=config.hidden_size,
        n_layers=len(config.layer_names or []),
        n_experts=config.n_experts,
        experts=experts,
        settings=settings_dict(config),
        classifier_parameters=sum(int(torch.Size(s).numel()) for s in shapes.values()),
        classifier_size_bytes=classifier_size,
    )


__all__ = [
    "EXPERTS_DIR",
    "ExpertSummary",
    "MixtureSummary",
    "expected_classifier_shapes",
    "expert_repo_id",
    "fetch_mixture",
    "inspect_mixture",
    "load_base_model",
    "load_mixture",
    "make_model_card",
    "push_mixture",
    "save_mixture",
]
