"""The one answer to "is this a local folder, a Hub repo id, a commit sha, a Hub URL?".

Every place that decides between a local folder and a Hub repo asks here, so the answer cannot depend on
which module asks. Two questions are kept apart on purpose:

* what a *stored* string means (a ref inside a config file or a model card): decided by its syntax alone,
  never by what happens to exist in the current working directory;
* what a *user-typed* argument means (CLI, ``from_pretrained``): an existing folder wins, then path syntax,
  then a Hub repo id, as ``transformers`` and ``huggingface_hub`` do.

Repo ids are checked with ``huggingface_hub.utils.validate_repo_id``, the Hub client's own rule.
"""

from __future__ import annotations

import os
import re

__all__ = [
    "has_path_syntax",
    "hub_url",
    "is_commit_sha",
    "is_hub_repo_id",
    "is_local_argument",
    "is_sha256",
    "is_stored_hub_id",
    "loaded_base_folder",
    "stored_base_hub_id",
]

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")


def is_commit_sha(value: object) -> bool:
    """True for a full 40-hex lowercase git commit sha (what the Hub reports as ``sha``)."""
    return isinstance(value, str) and _COMMIT_SHA.fullmatch(value) is not None


def is_sha256(value: object) -> bool:
    """True for a 64-hex lowercase sha256 digest (what the Hub reports as a file's LFS oid)."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


def is_hub_repo_id(value: object) -> bool:
    """True when ``value`` is a syntactically valid Hub repo id (``name`` or ``owner/name``)."""
    if not isinstance(value, str) or not value:
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def has_path_syntax(value: str | os.PathLike[str]) -> bool:
    """True when the text itself says "path": a ``PathLike``, ``./``, ``../``, ``/``, ``~``, ``.``, ``..``, a drive."""
    if isinstance(value, os.PathLike):
        return True
    return value.startswith(_PATH_PREFIXES) or value in (".", "..") or os.path.isabs(value)


def is_stored_hub_id(value: object) -> bool:
    """How a ref *stored* in a file is read: a Hub repo id unless its syntax says path (the cwd never matters)."""
    return isinstance(value, str) and not has_path_syntax(value) and is_hub_repo_id(value)


def loaded_base_folder(model: object) -> str | None:
    """The absolute folder a loaded transformers model came from (its ``config._name_or_path``), else ``None``.

    A mixture's base named ``./base_model`` or ``base_model`` is loaded from the folder inside the mixture, so
    this, not the stored text, says where that base is once the config has been resolved by a load.
    """
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(name, str) or not name:
        return None
    name = os.path.expanduser(name)
    return os.path.realpath(name) if os.path.isabs(name) and os.path.isdir(name) else None


def stored_base_hub_id(stored: str | None, *, loaded_from: str | None) -> str | None:
    """The Hub repo id a mixture's stored base model ref names, or ``None`` when that base is local.

    Local: path syntax (``./base_model``, an absolute path), or a bare name (``base_model``, ``org/base``) that the
    base was loaded from as a folder ending in that name (a folder of the mixture, which a load prefers to a Hub
    repo of the same name). ``loaded_from`` is :func:`loaded_base_folder` of the loaded base. Every exporter and
    the evidence ask here, so a folder inside a mixture is never published as a Hub id.
    """
    if stored is None or not is_stored_hub_id(stored):
        return None
    if loaded_from:
        parts = tuple(stored.split("/"))
        if tuple(os.path.normpath(loaded_from).split(os.sep))[-len(parts) :] == parts:
            return None
    return stored


def is_local_argument(value: str | os.PathLike[str]) -> bool:
    """How a *user-typed* argument is read: an existing file or folder, or path syntax, is local.

    ``os.path.exists`` answers ``False`` for a name the OS cannot even stat (too long, a NUL byte) rather than
    raising, so a hostile argument reads as "not local" and is then refused as a repo id with a clear message.
    """
    return has_path_syntax(value) or os.path.exists(os.path.expanduser(os.fspath(value)))


def hub_url(
    repo_id: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    repo_type: str = "model",
    endpoint: str | None = None,
) -> str:
    """The browser URL of a repo (at ``revision``, inside ``subfolder``) on the configured Hub endpoint."""
    from huggingface_hub import constants

    base = (endpoint or constants.ENDPOINT).rstrip("/")
    prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
    url = f"{base}/{prefix}{repo_id}"
    if revision or subfolder:
        url += f"/tree/{revision or 'main'}"
        if subfolder:
            url += f"/{subfolder.strip('/')}"
    return url
