"""Everything a load does before a model is built: :func:`open_mixture` returns the checked parts as one record.

``XLoraModel.from_pretrained`` calls :func:`open_mixture` once and builds itself from the record (the
``huggingface_hub.ModelHubMixin`` shape: the model layer calls the Hub layer, never the other way round).
Checked here, before anything is built: the config (format version, types, bounds, paths inside the mixture),
the classifier file's header against the config and its values (finite); then the base model is resolved (a
relative path inside the mixture folder) and loaded unless the caller gave one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from ..config import CLASSIFIER_WEIGHTS_NAME, XLoraConfig
from ..finite import check_finite_tensors
from ..paths import resolve_inside
from .api import clear_connection_errors
from .fetch import MixtureSource, fetch_mixture, load_base_model, resolve_base_model_ref
from .format import check_classifier_file

__all__ = ["MixtureFiles", "open_mixture"]


@dataclass(frozen=True)
class MixtureFiles:
    """A mixture ready to build: where its files are, its checked config and classifier weights, and the base model.

    ``folder`` is the mixture folder (local, or the Hub snapshot in the cache) that bundled experts are
    resolved against; ``label`` names the mixture in messages (``folder`` or ``repo@commit``).
    """

    source: MixtureSource
    classifier_state: dict[str, Any]
    base_model: Any

    @property
    def folder(self) -> Path:
        return self.source.folder

    @property
    def config(self) -> XLoraConfig:
        return self.source.config

    @property
    def label(self) -> str:
        return self.source.label


def open_mixture(
    repo_id_or_path: str | os.PathLike[str],
    *,
    base_model: Any = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    torch_dtype: Any = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    quantization_config: Any = None,
) -> MixtureFiles:
    """Fetch and check a mixture (folder or Hub repo), read its classifier, and load its base model unless given.

    The options mean what they mean in ``XLoraModel.from_pretrained``; ``torch_dtype``, ``device_map``,
    ``max_memory``, ``offload_folder`` and ``quantization_config`` go to transformers with the base model.
    """
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
        base_ref = resolve_base_model_ref(source)
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
    return MixtureFiles(source=source, classifier_state=state, base_model=base_model)
