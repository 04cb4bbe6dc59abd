"""Experts stored flat, as mistral.rs needs them: ``<name>_adapter_config.json`` and ``<name>_adapter_model.safetensors``.

mistral.rs lists only the top level of a local X-LoRA folder and gives each file to the first expert whose name
occurs in the file's name, so :func:`~xlora_hub.convert.export_mistralrs` writes each expert as two flat files
beside the classifier. peft (and so xlora-hub) loads an adapter from a folder holding ``adapter_config.json`` and
``adapter_model.safetensors``; to read a flat export back, :func:`flat_expert_folder` copies an expert's two files
into such a folder in xlora-hub's cache (named by their content, so reading the same export twice copies nothing).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from ..hub import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from ..paths import resolve_inside
from ..staging import replace_folder, staging_folder

CACHE_ENV = "XLORA_HUB_CACHE"
"""The cache root's environment variable (the same one the demo mixture's cache reads)."""


def flat_file_names(name: str) -> tuple[str, str]:
    """``(config file, weights file)`` of expert ``name`` in a flat (mistral.rs) folder."""
    return f"{name}_{ADAPTER_CONFIG_NAME}", f"{name}_{ADAPTER_WEIGHTS_NAME}"


def _cache_root() -> Path:
    """``$XLORA_HUB_CACHE``, else ``$XDG_CACHE_HOME/xlora-hub``, else ``~/.cache/xlora-hub`` (as the demo cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "xlora-hub"


def _digest(paths: tuple[Path, Path]) -> str:
    """A content digest of the two files (the cache folder's name)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def flat_expert_folder(folder: Path, name: str, *, what: str) -> Path | None:
    """A peft adapter folder holding expert ``name``'s flat files from ``folder``, or ``None`` when it has none.

    The files are read through :func:`~xlora_hub.paths.resolve_inside` (no link out of the checkpoint) and copied
    into ``<cache>/flat-experts/<digest>/``, written whole through :mod:`xlora_hub.staging`.
    """
    config_name, weights_name = flat_file_names(name)
    if not (folder / config_name).is_file() or not (folder / weights_name).is_file():
        return None
    sources = (
        resolve_inside(folder, config_name, what=f"{what}: expert {name!r} file"),
        resolve_inside(folder, weights_name, what=f"{what}: expert {name!r} file"),
    )
    target = _cache_root() / "flat-experts" / _digest(sources)
    if (target / ADAPTER_CONFIG_NAME).is_file() and (target / ADAPTER_WEIGHTS_NAME).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with staging_folder(target) as tmp:
        shutil.copyfile(sources[0], tmp / ADAPTER_CONFIG_NAME)
        shutil.copyfile(sources[1], tmp / ADAPTER_WEIGHTS_NAME)
        replace_folder(tmp, target)
    return target
