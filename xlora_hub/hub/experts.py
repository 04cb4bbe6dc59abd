"""Resolving expert references to local adapter folders: where each expert's files are, and where it came from.

A Hub expert is downloaded from its own repo with ``huggingface_hub`` (only ``adapter_config.json`` and
``adapter_model.safetensors``, at the pinned revision). The commit it resolved to is recorded so a mixture can
be pinned when pushed. A local expert is either a folder the user named or one bundled inside a mixture
folder; :attr:`ResolvedExpert.origin` says which, so saving and pushing know what the mixture already carries.
The checks against the base model live in :mod:`.expert_checks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from ..config import ExpertRef
from ..errors import ExpertNotFoundError, IncompatibleExpertError, InvalidMixtureError
from ..paths import resolve_inside
from ..refs import is_local_argument
from .api import client_identity
from .pins import TensorHeader, check_expert_config_digest, check_expert_digest, remote_tensor_header

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PICKLE_WEIGHTS_NAME",
    "ExpertOrigin",
    "HeaderCheck",
    "ResolvedExpert",
    "cached_commit_sha",
    "config_path_in_repo",
    "resolve_expert",
    "safe_relative_path",
    "snapshot_sha",
    "weights_path_in_repo",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

ExpertOrigin = Literal["hub", "local", "bundled"]
"""Where an expert's files came from: its own Hub repo, a folder the user named, or a mixture folder's ``experts/``."""


@dataclass(frozen=True)
class ResolvedExpert:
    """An expert ready to load: its name, the ref it came from, a local folder holding its files, and its origin.

    ``origin`` is ``"hub"`` for a Hub repo, ``"bundled"`` for a folder inside the mixture it was loaded from
    (a relative path resolved against ``base_dir``), ``"local"`` for any other folder.
    """

    name: str
    ref: ExpertRef
    local_dir: Path
    commit_sha: str | None = None
    origin: ExpertOrigin = "local"

    def pinned_ref(self) -> ExpertRef:
        """The ref pinned to the commit it resolved to (Hub experts only; a recorded digest is kept)."""
        if self.ref.is_hub and self.commit_sha and not self.ref.is_pinned:
            return dataclasses.replace(self.ref, revision=self.commit_sha)
        return self.ref


HeaderCheck = Callable[[ResolvedExpert, TensorHeader], None]
"""Checks a Hub expert (its adapter config downloaded, ``local_dir`` holding it) against the base model from its
weight file's header read remotely, before the weights are downloaded (:func:`resolve_expert`'s ``precheck``)."""


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


def config_path_in_repo(ref: ExpertRef, *, name: str) -> str:
    """Where a Hub expert's ``adapter_config.json`` is inside its repo (its subfolder, checked to stay inside)."""
    if not ref.subfolder:
        return ADAPTER_CONFIG_NAME
    return f"{safe_relative_path(ref.subfolder, what=f'Expert {name!r} subfolder')}/{ADAPTER_CONFIG_NAME}"


def weights_path_in_repo(ref: ExpertRef, *, name: str) -> str:
    """Where a Hub expert's ``adapter_model.safetensors`` is inside its repo (its subfolder, checked to stay inside)."""
    if not ref.subfolder:
        return ADAPTER_WEIGHTS_NAME
    return f"{safe_relative_path(ref.subfolder, what=f'Expert {name!r} subfolder')}/{ADAPTER_WEIGHTS_NAME}"


def cached_commit_sha(repo_id: str, *, cache_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The commit a Hub model was loaded at, read from the local cache (no network); None for local folders."""
    if is_local_argument(repo_id):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    except Exception:  # not a valid repo id, unreadable cache: nothing to pin
        return None
    return snapshot_sha(path) if isinstance(path, str) else None


def snapshot_sha(path: str | os.PathLike[str]) -> str | None:
    """The commit of a file in the Hub cache, read from its ``snapshots/<sha>/`` folder (``None`` elsewhere)."""
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
    precheck: HeaderCheck | None = None,
) -> ResolvedExpert:
    """Find (and for Hub refs, download) the adapter files of one expert.

    ``base_dir`` is the mixture folder that relative ``path`` refs are resolved against. For a Hub expert whose
    weights are not in the cache yet, ``precheck`` is called with the weight file's header read remotely before
    the weights are downloaded; a downloaded file is checked against the ``sha256``/``size`` the ref records.
    """
    if not ref.is_hub:
        return _resolve_local_expert(name, ref, base_dir=base_dir)
    return _resolve_hub_expert(
        name,
        ref,
        precheck=precheck,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
    )


def _resolve_local_expert(name: str, ref: ExpertRef, *, base_dir: str | os.PathLike[str] | None) -> ResolvedExpert:
    """A folder expert: inside the mixture (a relative path under ``base_dir``: bundled) or a folder the user named."""
    assert ref.path is not None
    inside_mixture = base_dir is not None and not os.path.isabs(os.path.expanduser(ref.path))
    if inside_mixture:
        rel = safe_relative_path(ref.path, what=f"Expert {name!r} path")
    else:
        rel = PurePosixPath()
        base_dir = Path(os.path.expanduser(ref.path))  # a folder the user named: links inside it stay inside
    if ref.subfolder:
        rel = rel / safe_relative_path(ref.subfolder, what=f"Expert {name!r} subfolder")
    assert base_dir is not None
    what = f"Expert {name!r}: bundled"
    folder = resolve_inside(base_dir, rel, what=f"{what} folder") if inside_mixture else Path(base_dir) / rel
    if not folder.is_dir():
        raise ExpertNotFoundError(
            f"Expert {name!r}: local folder {str(folder)!r} does not exist. Check the path, or give a Hub repo id "
            "('owner/name')."
        )
    _check_files(name, folder)
    if inside_mixture:  # a bundled expert's files must not lead out of the mixture either
        for filename in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
            resolve_inside(base_dir, rel / filename, what=f"{what} file")
    origin: ExpertOrigin = "bundled" if inside_mixture else "local"
    return ResolvedExpert(name=name, ref=ref, local_dir=folder.resolve(), origin=origin)


def _resolve_hub_expert(name: str, ref: ExpertRef, *, precheck: HeaderCheck | None, **hub: Any) -> ResolvedExpert:
    """A Hub expert: its two adapter files downloaded at one commit (``hub``: token, cache and download options),
    the weights' header checked remotely first (``precheck``) and the downloaded file against the recorded digest."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    subfolder = str(safe_relative_path(ref.subfolder, what=f"Expert {name!r} subfolder")) if ref.subfolder else None
    kwargs: dict[str, Any] = dict(repo_id=ref.repo_id, subfolder=subfolder, **hub, **client_identity())
    where = f"{ref.repo_id}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    with _hub_expert_errors(name, ref, where):
        config_path = hf_hub_download(filename=ADAPTER_CONFIG_NAME, revision=ref.revision, **kwargs)
        sha = snapshot_sha(config_path)
        check_expert_config_digest(name, ref, config_path, revision=sha)  # before the config is read
        try:
            if precheck is not None and _needs_download(name, ref, sha or ref.revision, **hub):
                header = remote_tensor_header(
                    ref.repo_id,
                    weights_path_in_repo(ref, name=name),
                    revision=sha or ref.revision,
                    token=hub.get("token"),
                    what=f"Expert {name!r}",
                )
                found = ResolvedExpert(name, ref, Path(config_path).parent, commit_sha=sha, origin="hub")
                precheck(found, header)  # shapes and dtypes against the base model, no weight downloaded yet
            weights_path = hf_hub_download(filename=ADAPTER_WEIGHTS_NAME, revision=sha or ref.revision, **kwargs)
        except RemoteEntryNotFoundError:  # not LocalEntryNotFoundError, also an EntryNotFoundError
            raise IncompatibleExpertError(
                f"Expert {name!r} ({where}) has no {ADAPTER_WEIGHTS_NAME}. xlora-hub loads safetensors only and never "
                f"unpickles a downloaded {PICKLE_WEIGHTS_NAME}; convert the adapter with peft "
                "(`model.save_pretrained(dir, safe_serialization=True)`) and push it again."
            ) from None
    folder = Path(weights_path).parent
    if Path(config_path).parent != folder:  # pragma: no cover - both live in one snapshot folder
        raise InvalidMixtureError(f"Expert {name!r}: adapter files of {where} were resolved to different commits.")
    check_expert_digest(name, ref, weights_path, revision=sha)  # the bytes the mixture was made with, or an error
    return ResolvedExpert(name=name, ref=ref, local_dir=folder, commit_sha=sha, origin="hub")


def _needs_download(name: str, ref: ExpertRef, revision: str | None, **hub: Any) -> bool:
    """Whether the expert's weights would be downloaded (online, not forced from cache, not cached at ``revision``)."""
    if hub.get("local_files_only"):
        return False
    if hub.get("force_download"):
        return True
    from huggingface_hub import try_to_load_from_cache

    assert ref.repo_id is not None
    cached = try_to_load_from_cache(
        ref.repo_id, weights_path_in_repo(ref, name=name), revision=revision, cache_dir=hub.get("cache_dir")
    )
    return not isinstance(cached, str)


@contextlib.contextmanager
def _hub_expert_errors(name: str, ref: ExpertRef, where: str) -> Iterator[None]:
    """The Hub client's "not found" errors of one expert's download, worded for that expert with the fix."""
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
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


def _check_files(name: str, folder: Path) -> None:
    """The two adapter files a folder expert needs (a pickle-only adapter is refused, naming the fix)."""
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
