"""``inspect_mixture``: what a mixture is made of, read from its config and file sizes, with no weights loaded."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from .config import CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME, BaseModelRef, ExpertRef
from .experts import ADAPTER_WEIGHTS_NAME, safe_relative_path
from .jsonfile import read_json_object
from .mixture_format import expected_classifier_shapes, settings_dict

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
    from .hub import _hub_api, fetch_mixture  # hub re-exports this module's names

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
    else:
        wanted = [CLASSIFIER_WEIGHTS_NAME] + [
            f"{bundled_path(ref)}/{ADAPTER_WEIGHTS_NAME}" for ref in config.experts.values() if not ref.is_hub
        ]
        at = source.commit or revision
        if api is not None:
            sizes = _remote_sizes(api, source.repo_id, wanted, at)
        else:
            sizes = _cached_sizes(source.repo_id, wanted, at, cache_dir)
        classifier_size = sizes.get(CLASSIFIER_WEIGHTS_NAME)
        bundled_sizes = {
            path.rsplit("/", 1)[0]: size for path, size in sizes.items() if path != CLASSIFIER_WEIGHTS_NAME
        }

    experts = []
    for name, ref in config.experts.items():
        if ref.is_hub:
            path = f"{ref.subfolder}/{ADAPTER_WEIGHTS_NAME}" if ref.subfolder else ADAPTER_WEIGHTS_NAME
            if api is not None:
                size = _remote_sizes(api, ref.repo_id, [path], ref.revision).get(path)
            else:
                size = _cached_sizes(ref.repo_id, [path], ref.revision, cache_dir).get(path)
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
