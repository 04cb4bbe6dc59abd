"""Lockfile-grade expert references: each Hub expert's weight file recorded by sha256 and size, checked at load.

A pinned commit names a tree, but nothing in ``huggingface_hub`` checks that the bytes it downloads are that
tree's (it names the cached blob after the ETag the server sends, and never hashes the file), so a rewritten
revision or a mirror (``HF_ENDPOINT``) serving other bytes would load another expert. At push the Hub's own
record of the file (its LFS oid: a sha256, and its size, from ``HfApi.get_paths_info``) goes into the config;
at load the downloaded file is hashed once and compared (:func:`check_expert_digest`). The expert's tensor
header is also read remotely (:func:`remote_tensor_header`, a ``Range`` read of the header only), so shapes
and dtypes are checked against the base model before any weight is downloaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

from ..config import ExpertRef
from ..errors import ExpertDigestError, IncompatibleExpertError, InvalidMixtureError
from .api import hub_api

__all__ = [
    "TensorHeader",
    "check_expert_config_digest",
    "check_expert_digest",
    "file_sha256",
    "git_blob_sha1",
    "locked_ref",
    "remote_file_record",
    "remote_tensor_header",
]

TensorHeader = dict[str, tuple[list[int], str]]
"""Tensor name -> (shape, safetensors dtype such as ``"F32"``), read from a safetensors header."""

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file, read once in 1 MiB chunks (never whole into memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1(path: str | os.PathLike[str]) -> str:
    """The git blob id of a file (what the Hub reports as ``blob_id`` for a file not stored in LFS)."""
    size = os.path.getsize(path)
    digest = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_expert_digest(name: str, ref: ExpertRef, path: str | os.PathLike[str], *, revision: str | None) -> None:
    """Refuse a downloaded weight file whose size or sha256 is not what the mixture recorded (no record: no check).

    The error names the expert, its repo and revision and both digests, and says what to do.
    """
    _check_file_digest(name, ref, path, sha256=ref.sha256, size=ref.size, revision=revision)


def check_expert_config_digest(
    name: str, ref: ExpertRef, path: str | os.PathLike[str], *, revision: str | None
) -> None:
    """Refuse a downloaded ``adapter_config.json`` that is not the one the mixture was built with (its ``r``,
    ``lora_alpha``, patterns and target modules decide what the weights compute); no record (older pins): no check."""
    _check_file_digest(name, ref, path, sha256=ref.config_sha256, size=ref.config_size, revision=revision)


def _check_file_digest(
    name: str,
    ref: ExpertRef,
    path: str | os.PathLike[str],
    *,
    sha256: str | None,
    size: int | None,
    revision: str | None,
) -> None:
    """One downloaded file against its recorded ``sha256`` / ``size``: an :class:`ExpertDigestError` naming both."""
    if sha256 is None and size is None:
        return
    got_size = os.path.getsize(path)
    got = file_sha256(path) if sha256 is not None else None
    if (size is None or got_size == size) and (sha256 is None or got == sha256):
        return
    where = f"{ref.repo_id}@{revision or ref.revision or 'main'}" + (
        f" (subfolder {ref.subfolder!r})" if ref.subfolder else ""
    )
    raise ExpertDigestError(
        f"Expert {name!r} ({where}): the downloaded {Path(path).name} has sha256 {got or 'not computed'} "
        f"({got_size:,d} bytes) but the mixture recorded sha256 {sha256 or 'none'}"
        + (f" ({size:,d} bytes)" if size is not None else "")
        + ". These are not the bytes the mixture was made with: the revision was rewritten, or the endpoint "
        "(HF_ENDPOINT, a mirror) or the local cache serves other bytes. Download it again "
        "(`force_download=True`); if it still differs, do not use this mixture until its author pushes it again."
    )


def remote_file_record(api: Any, repo_id: str, path_in_repo: str, *, revision: str) -> tuple[str | None, str, int]:
    """(LFS sha256 or ``None`` for a plain git file, git blob id, size) of one file as the Hub reports it."""
    infos = api.get_paths_info(repo_id, [path_in_repo], revision=revision)
    entry = next((i for i in infos if getattr(i, "path", None) == path_in_repo and hasattr(i, "blob_id")), None)
    if entry is None:
        raise InvalidMixtureError(f"{repo_id}@{revision} has no file {path_in_repo}.")
    lfs = getattr(entry, "lfs", None)
    return (getattr(lfs, "sha256", None) if lfs is not None else None), entry.blob_id, int(entry.size)


def locked_ref(
    api: Any,
    name: str,
    ref: ExpertRef,
    *,
    path_in_repo: str,
    local_file: Path | None,
    config_path_in_repo: str | None = None,
    local_config: Path | None = None,
) -> ExpertRef:
    """``ref`` (pinned to a commit) with the sha256 and size of its weight file as the Hub reports them, and of its
    ``adapter_config.json`` when ``config_path_in_repo`` is given.

    A file the Hub keeps in LFS is recorded by its LFS oid; a plain git file (the config always) by the sha256 of
    the local copy once its git blob id matches the Hub's (a config without a local copy is downloaded: it is
    small). A loaded copy that is not the Hub's file is refused: the mixture would record an expert it was not
    made with.
    """
    assert ref.repo_id is not None and ref.revision is not None
    sha256, size = _file_lock(api, name, ref, path_in_repo, local_file)
    locked = dataclasses.replace(ref, sha256=sha256, size=size)
    if config_path_in_repo is not None:
        if local_config is None:  # a small JSON file: the Hub's own bytes are hashed (a plain git file has no oid)
            local_config = Path(api.hf_hub_download(ref.repo_id, config_path_in_repo, revision=ref.revision))
        config_sha256, config_size = _file_lock(api, name, ref, config_path_in_repo, local_config)
        locked = dataclasses.replace(locked, config_sha256=config_sha256, config_size=config_size)
    return locked


def _file_lock(api: Any, name: str, ref: ExpertRef, path: str, local_file: Path | None) -> tuple[str | None, int]:
    """(sha256, size) to record for one file of a pinned expert (sha256 ``None``: a plain git file, no local copy)."""
    assert ref.repo_id is not None and ref.revision is not None
    sha256, blob_id, size = remote_file_record(api, ref.repo_id, path, revision=ref.revision)
    if local_file is not None:
        local = file_sha256(local_file) if sha256 is not None else None
        same = local == sha256 if sha256 is not None else git_blob_sha1(local_file) == blob_id
        if not same:
            raise InvalidMixtureError(
                f"Expert {name!r}: the copy this mixture was built with ({local_file}) is not {ref.repo_id}@"
                f"{ref.revision}'s {path} (sha256 {local or 'n/a'} vs {sha256 or 'git blob ' + blob_id}); reload the "
                "mixture with `force_download=True` before pushing it. Nothing was pushed."
            )
        if sha256 is None:
            sha256 = file_sha256(local_file)
    return sha256, size


def remote_tensor_header(
    repo_id: str, path_in_repo: str, *, revision: str | None, token: str | bool | None, what: str
) -> TensorHeader:
    """Tensor shapes and dtypes of a safetensors file on the Hub, from its header only (ranged reads: no weight is
    downloaded), through ``HfApi.parse_safetensors_file_metadata``."""
    from huggingface_hub.errors import SafetensorsParsingError

    api = hub_api(token)
    try:
        meta = api.parse_safetensors_file_metadata(repo_id, path_in_repo, revision=revision)
    except SafetensorsParsingError as err:
        raise IncompatibleExpertError(
            f"{what}: {repo_id}@{revision or 'main'}'s {path_in_repo} has no readable safetensors header ({err}). "
            "It is truncated or not a safetensors file; its author must push it again."
        ) from None
    return {key: (list(info.shape), str(info.dtype)) for key, info in meta.tensors.items()}
