"""``download_mixture`` (``xlora-hub pull``): a mixture, its Hub experts and its base model fetched for offline use."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME, BaseModelRef
from ..errors import InvalidConfigError
from ..refs import is_local_argument, is_stored_hub_id
from .api import client_identity
from .experts import resolve_expert
from .fetch import fetch_mixture
from .format import check_classifier_file, read_mixture_config

__all__ = ["BASE_MODEL_PATTERNS", "DownloadResult", "download_mixture"]

BASE_MODEL_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
"""Files of a base model fetched by :func:`download_mixture`: configs, safetensors weights, tokenizer files (never pickles)."""


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
    if is_local_argument(repo_id_or_path):
        if local_dir is not None:
            raise InvalidConfigError(f"--local-dir applies to Hub mixtures; {repo_id_or_path!r} is already local.")
        source = fetch_mixture(repo_id_or_path, revision=revision)
        folder, config, commit, label = source.folder, source.config, None, str(source.folder)
    else:
        source = fetch_mixture(repo_id_or_path, revision=revision, with_weights=False, **hub)  # config checked first
        commit, label = source.commit, repo_id_or_path
        folder = Path(
            snapshot_download(
                repo_id_or_path, revision=commit or revision, local_dir=local_dir, **hub, **client_identity()
            )
        )
        config = read_mixture_config(folder / CONFIG_NAME, what=f"Mixture {label!r}")
        check_classifier_file(folder / CLASSIFIER_WEIGHTS_NAME, config, what=f"Mixture {label!r}")
    result = DownloadResult(mixture=label, folder=folder, commit=commit)
    for name, ref in config.experts.items():
        if ref.is_hub:
            expert = resolve_expert(name, ref, **hub)
            result.experts[name] = str(expert.pinned_ref())
        else:
            resolve_expert(name, ref, base_dir=folder)  # bundled: check its files are there
            result.experts[name] = f"bundled ({ref.path})"
    result.base_model = _download_base_model(config.base_model, include=include_base_model, **hub)
    return result


def _download_base_model(base: BaseModelRef | None, *, include: bool, **hub: object) -> str | None:
    """The base model fetched into the cache at its recorded revision (``name@commit``); a local folder is named."""
    from huggingface_hub import snapshot_download

    if base is None:
        return None
    if not is_stored_hub_id(base.repo_id):
        return f"{base.repo_id} (local folder, not downloaded)"
    if not include:
        return None
    path = snapshot_download(
        base.repo_id, revision=base.revision, allow_patterns=BASE_MODEL_PATTERNS, **hub, **client_identity()
    )
    return f"{base.repo_id}@{Path(path).name}"
