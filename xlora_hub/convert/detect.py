"""Which format a checkpoint is in, where its files are, and where its experts are.

A local folder is read where it is; a Hub repo is fetched as JSON and safetensors files only (nothing downloaded
is ever unpickled). A checkpoint downloaded from the Hub was written by a stranger, so its expert locations are
*confined*: only folders inside the downloaded repo, or Hub repo ids; never a path on the downloader's disk
(:func:`expert_refs`). A local checkpoint's own paths are its owner's choice.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from ..config import CONFIG_NAME, ExpertRef
from ..errors import ExpertNotFoundError, InvalidConfigError, InvalidMixtureError, UnsupportedFormatError
from ..hub import ADAPTER_CONFIG_NAME, client_identity, safe_relative_path
from ..refs import has_path_syntax
from .common import FORMAT_ORIGINAL, FORMAT_PEFT, FORMAT_XLORA_HUB, FORMATS, LoadOptions, read_json
from .flat import flat_expert_folder


# ---------------------------------------------------------------------------------------------- the format
def detect_format(folder: str | os.PathLike[str]) -> str:
    """The format of a local checkpoint folder: ``"xlora-hub"``, ``"peft"`` or ``"xlora"``."""
    folder = Path(folder)
    config = folder / CONFIG_NAME
    if config.is_file():
        data = read_json(config, what=str(folder))
        return FORMAT_XLORA_HUB if "format_version" in data else FORMAT_ORIGINAL
    adapter = folder / ADAPTER_CONFIG_NAME
    if adapter.is_file():
        data = read_json(adapter, what=str(folder))
        peft_type = str(data.get("peft_type", "")).upper()
        if peft_type == "XLORA":
            return FORMAT_PEFT
        raise UnsupportedFormatError(
            f"{folder}: {ADAPTER_CONFIG_NAME} is a {peft_type or 'peft'} adapter, not an X-LoRA checkpoint. "
            "Use it as an expert of a mixture instead (`XLoraConfig(experts={...})`)."
        )
    raise UnsupportedFormatError(
        f"{folder}: neither {CONFIG_NAME} nor {ADAPTER_CONFIG_NAME} found; not an X-LoRA checkpoint in a known format "
        f"({', '.join(FORMATS)})."
    )


def source_folder(
    source: str | os.PathLike[str], *, revision: str | None, options: LoadOptions
) -> tuple[Path | None, str]:
    """``(folder, format)``: a local folder, or a Hub repo's JSON/safetensors files in the cache (``folder`` is
    ``None`` for an xlora-hub repo, which :func:`~xlora_hub.hub.load_mixture` fetches itself)."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        if revision is not None:
            raise InvalidMixtureError(f"`revision` applies to Hub repos only; {text!r} is a local folder.")
        return path, detect_format(path)
    if has_path_syntax(source):
        raise InvalidMixtureError(f"Checkpoint folder {text!r} does not exist.")
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    kwargs: dict[str, Any] = dict(revision=revision, **options.fetch_kwargs(), **client_identity())
    try:
        data = read_json(Path(hf_hub_download(text, CONFIG_NAME, **kwargs)), what=text)
        if "format_version" in data:
            return None, FORMAT_XLORA_HUB
    except RemoteEntryNotFoundError:
        try:
            hf_hub_download(text, ADAPTER_CONFIG_NAME, **kwargs)
        except RemoteEntryNotFoundError:
            raise UnsupportedFormatError(
                f"Hub repo {text!r} has neither {CONFIG_NAME} nor {ADAPTER_CONFIG_NAME}: not an X-LoRA checkpoint."
            ) from None
    # Only JSON and safetensors files: nothing downloaded is ever unpickled.
    folder = Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors"], **kwargs))
    return folder, detect_format(folder)


# ---------------------------------------------------------------------------------------------- expert refs
def _identifier(name: str, taken: set[str]) -> str:
    """A Python identifier for an expert name from another format (peft uses "0", "1"...)."""
    ident = re.sub(r"\W", "_", str(name))
    if not ident or not (ident[0].isalpha() or ident[0] == "_"):
        ident = f"expert_{ident}"
    base, n = ident, 2
    while ident in taken:
        ident, n = f"{base}_{n}", n + 1
    taken.add(ident)
    return ident


def _is_numbered_peft_folder(path: Path, folder: Path) -> bool:
    """Whether ``path`` is one of the ``0/``, ``1/`` folders peft writes at the top of its checkpoint."""
    try:
        rel = path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return len(rel.parts) == 1 and rel.parts[0].isdigit()


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, every link resolved, is ``folder`` or below it."""
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _is_absolute_anywhere(value: str) -> bool:
    """An absolute path on any machine: POSIX ``/``, ``~``, a Windows drive (``C:``) or root (``\\``)."""
    return os.path.isabs(value) or value.startswith("~") or bool(PureWindowsPath(value).anchor)


def _confined_ref(name: str, value: str, folder: Path, *, what: str) -> ExpertRef | None:
    """An ``adapters`` value of a checkpoint downloaded from the Hub: a folder inside the downloaded repo, else
    ``None`` (then only a Hub repo id is accepted). A stranger's absolute path, ``~``, ``..`` or a link out of
    the snapshot would import files from the downloader's own disk: refused, naming the expert and the path."""
    fix = f"Pass `adapters={{{name!r}: 'owner/repo' or './folder'}}` (`--adapter {name}=REF`) to say where it is."
    if _is_absolute_anywhere(value):
        raise ExpertNotFoundError(
            f"{what}: expert {name!r} has the absolute path {value!r}. A checkpoint from the Hub may only name "
            f"folders inside its own repo or Hub repo ids; a path on the author's machine is never read. {fix}"
        )
    if ".." in PurePosixPath(value.replace("\\", "/")).parts:
        raise ExpertNotFoundError(
            f"{what}: expert {name!r} path {value!r} leaves the downloaded repo ('..'); it is never followed. {fix}"
        )
    try:
        rel = safe_relative_path(value, what=f"{what}: expert {name!r} path")
    except InvalidMixtureError:
        return None  # not a relative path (for example 'repo:subfolder'): only a Hub repo id can match
    candidate = folder / rel
    if not (candidate / ADAPTER_CONFIG_NAME).exists() and not candidate.is_symlink():
        return None
    if not _inside(candidate, folder):
        raise ExpertNotFoundError(
            f"{what}: expert {name!r} path {value!r} is a link that leaves the downloaded repo; it is never "
            f"followed. {fix}"
        )
    return _checked_folder_ref(name, value, candidate, folder, what=what)


def _checked_folder_ref(name: str, value: str, candidate: Path, folder: Path, *, what: str) -> ExpertRef:
    """The ref of an expert folder found at ``candidate`` (never one of peft's numbered whole-model folders)."""
    if _is_numbered_peft_folder(candidate, folder):
        raise ExpertNotFoundError(
            f"{what}: expert {name!r} points at {value!r}, one of the numbered folders peft writes; they hold "
            "a whole model's tensors, not a usable expert. Pass "
            f"`adapters={{{name!r}: 'owner/repo' or './folder'}}` with the original expert."
        )
    return ExpertRef(path=str(candidate.resolve()))


def _local_candidates(name: str, value: str, folder: Path, *, what: str) -> list[Path]:
    """Where a local checkpoint's ``adapters`` value may be: as given, then relative to the checkpoint."""
    candidates = [Path(value).expanduser()]
    if not os.path.isabs(value):
        try:
            candidates.append(folder / safe_relative_path(value, what=f"{what}: expert {name!r} path"))
        except InvalidMixtureError:
            pass
    return candidates


def _hub_ref(value: str, *, confined: bool) -> ExpertRef | None:
    """``value`` read as a Hub ref (``owner/repo[@rev][:sub]`` or ``owner/repo/sub/folder``), else ``None``.
    ``confined``: a bare folder name of the working directory never counts."""
    if has_path_syntax(value):
        return None
    try:
        ref = ExpertRef.parse(value)
    except InvalidConfigError:
        parts = value.strip("/").split("/")
        if len(parts) > 2 and "@" not in value and ":" not in value:  # "owner/repo/sub/folder"
            return ExpertRef(repo_id="/".join(parts[:2]), subfolder="/".join(parts[2:]))
        return None
    return ref if ref.is_hub or not confined else None


def _ref_from_value(name: str, value: Any, folder: Path, *, what: str, confined: bool = False) -> ExpertRef:
    """Resolve an ``adapters`` value: a local folder (as given, or relative to the checkpoint) or a Hub repo.

    ``confined`` (a checkpoint downloaded from the Hub): only a folder inside the checkpoint or a Hub repo id,
    see :func:`_confined_ref`. A local checkpoint's own paths, absolute ones included, are its owner's choice.
    """
    if not isinstance(value, str) or not value.strip():
        raise InvalidConfigError(f"{what}: expert {name!r} has location {value!r}; expected a folder or a Hub repo id.")
    value = value.strip()
    if confined:
        ref = _confined_ref(name, value, folder, what=what)
        if ref is not None:
            return ref
    else:
        for candidate in _local_candidates(name, value, folder, what=what):
            if (candidate / ADAPTER_CONFIG_NAME).is_file():
                return _checked_folder_ref(name, value, candidate, folder, what=what)
    ref = _hub_ref(value, confined=confined)
    if ref is not None:
        return ref
    raise ExpertNotFoundError(
        f"{what}: expert {name!r} points at {value!r}, which is neither a folder holding {ADAPTER_CONFIG_NAME} "
        + ("inside the downloaded repo " if confined else "")
        + f"nor a Hub repo id. Pass `adapters={{{name!r}: 'owner/repo' or './folder'}}` to say where it is."
    )


def _adapter_items(adapters: Any, *, what: str) -> list[tuple[Any, Any]]:
    """``(name, location or None)`` pairs from an ``adapters`` list (names) or dict (name -> location)."""
    if isinstance(adapters, Mapping):
        items = list(adapters.items())
    elif isinstance(adapters, (list, tuple)):
        items = [(name, None) for name in adapters]
    else:
        raise InvalidConfigError(
            f"{what}: `adapters` must be a list of expert names or a dict of name -> location, got {adapters!r}."
        )
    if not items:
        raise InvalidConfigError(f"{what}: `adapters` is empty; an X-LoRA mixture needs at least one expert.")
    return items


def _subfolder_ref(name: str, folder: Path, *, what: str, confined: bool) -> ExpertRef | None:
    """The original package's layout: the expert in ``<name>/`` or ``adapters/<name>/`` of the checkpoint; else
    mistral.rs' flat ``<name>_adapter_config.json`` / ``<name>_adapter_model.safetensors`` (:mod:`.flat`)."""
    rel = safe_relative_path(name, what=f"{what}: expert {name!r} folder")
    for candidate in (folder / rel, folder / "adapters" / rel):
        if (candidate / ADAPTER_CONFIG_NAME).is_file() and (not confined or _inside(candidate, folder)):
            return ExpertRef(path=str(candidate.resolve()))
    flat = flat_expert_folder(folder, name, what=what)
    return None if flat is None else ExpertRef(path=str(flat.resolve()))


def expert_refs(
    adapters: Any, folder: Path, *, what: str, subfolders: bool, confined: bool = False
) -> dict[str, ExpertRef]:
    """Expert refs from an ``adapters`` list (names) or dict (name -> location); ``subfolders`` first looks for
    ``<name>/`` and ``adapters/<name>/`` inside the checkpoint (the original package's layout). ``confined``:
    the checkpoint was downloaded from the Hub, so its locations must stay inside it (see :func:`_confined_ref`)."""
    taken: set[str] = set()
    refs: dict[str, ExpertRef] = {}
    for name, value in _adapter_items(adapters, what=what):
        if not isinstance(name, str) or not name:
            raise InvalidConfigError(f"{what}: expert name {name!r} must be a non-empty string.")
        ref = _subfolder_ref(name, folder, what=what, confined=confined) if subfolders else None
        if ref is None:
            if value is None:
                raise ExpertNotFoundError(
                    f"{what}: expert {name!r} has no {name}/{ADAPTER_CONFIG_NAME} in the checkpoint and the config "
                    f"gives no location. Pass `adapters={{{name!r}: 'owner/repo' or './folder'}}`."
                )
            ref = _ref_from_value(name, value, folder, what=what, confined=confined)
        if name.isdigit() and ref.path is not None and Path(ref.path).parent == folder.resolve():
            name = Path(ref.path).name  # peft needs the keys "0".."n-1"; export_peft keeps the names as folder names
        refs[_identifier(name, taken)] = ref
    return refs


def checkpoint_experts(
    raw: Mapping[str, Any], adapters: Any, folder: Path, *, what: str, subfolders: bool, from_hub: bool
) -> dict[str, ExpertRef]:
    """A foreign checkpoint's experts: the caller's ``adapters`` when given (the caller's choice, never confined),
    else the config's own ``adapters``, confined to the checkpoint when it was downloaded (``from_hub``)."""
    if adapters is not None:
        return expert_refs(adapters, folder, what=what, subfolders=subfolders)
    return expert_refs(raw.get("adapters"), folder, what=what, subfolders=subfolders, confined=from_hub)
