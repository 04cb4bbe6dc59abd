"""``inspect_mixture``: what a mixture is made of, read from its config and file sizes, with no weights loaded."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..config import CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME, BaseModelRef, ExpertRef
from ..jsonfile import read_json_object
from .api import hub_api
from .experts import ADAPTER_WEIGHTS_NAME, safe_relative_path
from .fetch import MixtureSource, fetch_mixture
from .format import expected_classifier_shapes, settings_dict

__all__ = [
    "ExpertSummary",
    "MixtureSummary",
    "inspect_mixture",
]

logger = logging.getLogger(__name__)


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
    """Sizes of files in a Hub repo from its file metadata (nothing downloaded); none when the Hub will not say."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        infos = api.get_paths_info(repo_id, paths, revision=revision)
    except (HfHubHTTPError, OSError) as err:
        logger.info("Could not read file sizes of %s: %s", repo_id, err)
        return {}
    return {info.path: info.size for info in infos if getattr(info, "size", None) is not None}


def _cached_sizes(
    repo_id: str, paths: list[str], revision: str | None, cache_dir: str | os.PathLike[str] | None
) -> dict[str, int]:
    """Sizes of the files already in the local Hub cache (offline: what `xlora-hub pull` downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    sizes = {}
    for path in paths:
        cached = try_to_load_from_cache(repo_id, path, cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str) and os.path.isfile(cached):
            sizes[path] = os.path.getsize(cached)
    return sizes


def inspect_mixture(
    repo_id_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> MixtureSummary:
    """Summarise a mixture (experts, revisions, sizes, settings) from its config alone: no weights are downloaded.

    Sizes come from the folder, from the Hub's file metadata, or offline from the local cache (``None``
    when a file is in none of them).
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

    def sizes_of(repo_id: str, paths: list[str], at: str | None) -> dict[str, int]:
        if local_files_only:
            return _cached_sizes(repo_id, paths, at, cache_dir)
        return _remote_sizes(api, repo_id, paths, at)

    api = hub_api(token) if not local_files_only else None
    classifier_size, bundled_sizes = _mixture_sizes(source, revision, sizes_of)
    experts = [_expert_summary(name, ref, bundled_sizes, sizes_of) for name, ref in config.experts.items()]
    shapes = expected_classifier_shapes(config)
    return MixtureSummary(
        source=source.repo_id or str(source.folder),
        commit=source.commit,
        format_version=read_json_object(source.folder / CONFIG_NAME)["format_version"],
        base_model=config.base_model,
        hidden_size=config.hidden_size,
        n_layers=len(config.layer_names or []),
        n_experts=config.n_experts,
        experts=experts,
        settings=settings_dict(config),
        classifier_parameters=sum(int(torch.Size(s).numel()) for s in shapes.values()),
        classifier_size_bytes=classifier_size,
    )


def _bundled_path(ref: ExpertRef) -> str:
    """Where a bundled expert's files are inside the mixture (its path, then its subfolder)."""
    rel = str(safe_relative_path(ref.path or "", what="expert path"))
    return f"{rel}/{ref.subfolder}" if ref.subfolder else rel


def _mixture_sizes(
    source: MixtureSource, revision: str | None, sizes_of: Callable[[str, list[str], str | None], dict[str, int]]
) -> tuple[int | None, dict[str, int]]:
    """The classifier's size and each bundled expert's weights size (by its path), from the folder or the Hub."""
    bundled = [_bundled_path(ref) for ref in source.config.experts.values() if not ref.is_hub]
    if source.repo_id is None:
        file = source.folder / CLASSIFIER_WEIGHTS_NAME
        sizes = {}
        for rel in bundled:
            weights = source.folder / rel / ADAPTER_WEIGHTS_NAME
            if weights.is_file():
                sizes[rel] = weights.stat().st_size
        return (file.stat().st_size if file.is_file() else None), sizes
    wanted = [CLASSIFIER_WEIGHTS_NAME] + [f"{rel}/{ADAPTER_WEIGHTS_NAME}" for rel in bundled]
    found = sizes_of(source.repo_id, wanted, source.commit or revision)
    sizes = {path.rsplit("/", 1)[0]: size for path, size in found.items() if path != CLASSIFIER_WEIGHTS_NAME}
    return found.get(CLASSIFIER_WEIGHTS_NAME), sizes


def _expert_summary(
    name: str,
    ref: ExpertRef,
    bundled_sizes: dict[str, int],
    sizes_of: Callable[[str, list[str], str | None], dict[str, int]],
) -> ExpertSummary:
    """One expert's line: a Hub ref with its weights' size from its own repo, or a bundled path."""
    if not ref.is_hub:
        size = bundled_sizes.get(_bundled_path(ref))
        return ExpertSummary(name, "bundled", None, None, ref.subfolder, ref.path, True, size)
    assert ref.repo_id is not None
    path = f"{ref.subfolder}/{ADAPTER_WEIGHTS_NAME}" if ref.subfolder else ADAPTER_WEIGHTS_NAME
    size = sizes_of(ref.repo_id, [path], ref.revision).get(path)
    return ExpertSummary(name, "hub", ref.repo_id, ref.revision, ref.subfolder, None, ref.is_pinned, size)
